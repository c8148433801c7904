"""Start, drive and stop the real peer programs that integration tests talk to.

Everything binds 127.0.0.1, every wait has a deadline, and a peer program that
is not installed fails the test (CI installs them; a skip would hide that).
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.message
import email.policy
import enum
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self, TypeVar

import dns.exception
import dns.message
import dns.query
import pytest

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Which Debian package brings each program the tests run; .ci/run installs them.
DEBIAN_PACKAGES: dict[str, str] = {
    "ss": "iproute2",
    "smtp-sink": "postfix",
    "smtp-source": "postfix",
    "postfix": "postfix",
    "postqueue": "postfix",
    "swaks": "swaks",
    "innd": "inn2",
    "ctlinnd": "inn2",
    "rc.news": "inn2",
    "unbound": "unbound",
    "unbound-checkconf": "unbound",
    "dnsdist": "dnsdist",
    "nginx": "nginx-light",
    "dnsperf": "dnsperf",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "dig": "dnsutils",
    "kdig": "knot-dnsutils",
    "curl": "curl",
    "openssl": "openssl",
    "pypy3": "pypy3",
    "systemd-socket-activate": "systemd",
    "systemd-analyze": "systemd",
}

# Daemons live outside an ordinary user's PATH.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/lib/news/bin")

_POLL = 0.02


# --------------------------------------------------------------------------- sockets


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` for the test, unmounted afterwards."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"cannot mount a {size} tmpfs on {path}: {mounted.stderr.strip()}. This test needs"
            " root with CAP_SYS_ADMIN (CI runs as root); run it as root or in a privileged"
            " container.",
            pytrace=False,
        )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def free_port(kind: Literal["tcp", "udp"] = "tcp") -> int:
    """Return a port on 127.0.0.1 that was free a moment ago.

    Another process may take it before the caller binds it; the peers below
    retry with a new port when that happens.
    """
    sock_type = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}[kind]
    while True:
        with socket.socket(socket.AF_INET, sock_type) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        # The kernel may hand the same port out again at once: a test that asks for
        # two ports (a listener and the admin site) must get two different ones.
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            del _HANDED_OUT[:-256]
            return port


_HANDED_OUT: list[int] = []  # the ports free_port returned last, newest at the end


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_T = TypeVar("_T")


def wait_until(
    check: Callable[[], _T | None], what: str, timeout: float = 20.0, *, interval: float = 0.2
) -> _T:
    """Call ``check`` every ``interval`` seconds until it returns something true; return that.

    Raises TimeoutError naming ``what`` once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP connection to host:port succeeds, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while not port_accepts(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"nothing accepted TCP connections on {host}:{port} within {timeout} s"
            )
        time.sleep(_POLL)


def wait_for_port_closed(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until connections to host:port are refused, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while port_accepts(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} still accepts connections after {timeout} s")
        time.sleep(_POLL)


def pid_listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds the TCP socket listening on 127.0.0.1:port.

    Unlike a connection test, this is not fooled by another program that took
    the port first.
    """
    wanted = f"0100007F:{port:04X}"
    inodes = set()
    with contextlib.suppress(FileNotFoundError), open("/proc/net/tcp") as table:
        for row in table.readlines()[1:]:
            fields = row.split()
            if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or not ours to look at
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
    return False


def require_binary(name: str) -> str:
    """Return the full path of program `name`, or fail the test naming its package."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_BIN_DIRS])
    found = shutil.which(name, path=search)
    if found is None:
        package = DEBIAN_PACKAGES.get(name, name)
        pytest.fail(
            f"{name} is not installed. Install the Debian package {package!r} "
            f"(apt-get install --no-install-recommends {package}); .ci/run does this in CI.",
            pytrace=False,
        )
    return found


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log file {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def _end_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL to the whole process group if it does not exit; reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Our children run in their own session, so the group id is the pid.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return proc.returncode


# --------------------------------------------------------------------------- smtp-sink

# smtp-sink appends a random 8-digit hex id to this and creates the file with
# O_EXCL, retrying on a clash, so names are unique however fast mail arrives.
SINK_DUMP_TEMPLATE = "%Y%m%d%H%M%S."

# The command names smtp-sink's -f/-r/-q/-Q accept; "." is the end of the data.
SINK_COMMANDS = frozenset(
    {"connect", "helo", "ehlo", "lhlo", "mail", "rcpt", "data", ".", "rset", "noop", "vrfy"}
    | {"quit", "xclient", "xforward", "auth"}
)


def _angle_address(args: str) -> str:
    """The address in MAIL/RCPT arguments: '<a@b> SIZE=1' -> 'a@b', '<>' -> ''."""
    args = args.strip()
    if args.startswith("<"):
        end = args.find(">")
        return args[1:end] if end != -1 else args[1:]
    return args.split(" ", 1)[0]


@dataclass(frozen=True)
class SinkMessage:
    """One mail transaction as smtp-sink captured it.

    `raw` is the message as the client sent it between DATA and the final dot,
    with smtp-sink's transformations: dot-unstuffed, CRLF turned into LF, and
    every CR dropped (also a bare CR inside a line).
    """

    path: Path
    sender: str
    recipients: list[str]
    raw: bytes
    mail_args: str
    rcpt_args: list[str]
    helo: str | None
    client_addr: str
    client_proto: str
    sink_id: str
    headers: email.message.Message = field(repr=False)
    body: bytes = field(repr=False)

    @classmethod
    def from_dump(cls, path: Path) -> SinkMessage:
        data = path.read_bytes()
        pseudo: list[tuple[str, str]] = []
        pos = 0
        while True:
            end = data.find(b"\n", pos)
            if end == -1:
                raise ValueError(f"{path}: no Received: line from smtp-sink")
            line = data[pos:end].decode("utf-8", "replace")
            pos = end + 1
            if line.startswith("Received: "):
                break
            name, _, value = line.partition(": ")
            pseudo.append((name, value))
        # smtp-sink's Received: header is always three lines; the id is in the second.
        second_end = data.find(b"\n", pos)
        third_end = data.find(b"\n", second_end + 1)
        if second_end == -1 or third_end == -1:
            raise ValueError(f"{path}: truncated Received: line")
        id_match = re.search(rb" id ([0-9a-f]+);", data[pos:second_end])
        rest = data[third_end + 1 :]
        # The LF of the final ".\r\n" is written too: drop it.
        if not rest.endswith(b"\n"):
            raise ValueError(f"{path}: capture file does not end with the final dot's LF")
        raw = rest[:-1]
        if raw.startswith(b"\n"):
            body = raw[1:]
        else:
            split = raw.find(b"\n\n")
            body = b"" if split == -1 else raw[split + 2 :]
        values: dict[str, list[str]] = {}
        for name, value in pseudo:
            values.setdefault(name, []).append(value)
        mail_args = values.get("X-Mail-Args", [""])[0]
        rcpt_args = values.get("X-Rcpt-Args", [])
        return cls(
            path=path,
            sender=_angle_address(mail_args),
            recipients=[_angle_address(a) for a in rcpt_args],
            raw=raw,
            mail_args=mail_args,
            rcpt_args=rcpt_args,
            helo=values.get("X-Helo-Args", [None])[0],
            client_addr=values.get("X-Client-Addr", [""])[0],
            client_proto=values.get("X-Client-Proto", [""])[0],
            sink_id=id_match.group(1).decode() if id_match else "",
            headers=email.message_from_bytes(raw, policy=email.policy.compat32),
            body=body,
        )


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, capturing one file per accepted transaction.

    Failure modes, each a list of SMTP command names (connect, helo, ehlo, mail,
    rcpt, data, ".", rset, noop, vrfy, quit; "." is the end of the message data):

    * hard_reject (-f): answer 5xx, by default "500 5.3.0 Error: command failed"
      (hard_reply, -B, changes the text; it must start with 5 and three digits).
    * soft_reject (-r): answer 4xx, by default "450 4.3.0 Error: command failed"
      (soft_reply, -b).
    * close_421 (-Q): answer "421 4.0.0 Server closing connection" and hang up.
    * disconnect (-q): hang up without answering.

    A rejected RCPT or DATA leaves no capture file. A rejected "." does: smtp-sink
    writes the file before it answers the dot, so `messages()` returns nothing
    while "." is refused and `captured()` shows what was refused.
    Other knobs go in extra_args, e.g. ["-w", "5"] (delay the DATA answer),
    ["-W", "rcpt:3"] (delay RCPT answers), ["-A", "0"] (550 right after DATA).
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        hostname: str = "sink.localdomain",
        hard_reject: Iterable[str] = (),
        soft_reject: Iterable[str] = (),
        close_421: Iterable[str] = (),
        disconnect: Iterable[str] = (),
        hard_reply: str | None = None,
        soft_reply: str | None = None,
        extra_args: Sequence[str] = (),
        backlog: int = 256,
    ) -> None:
        self.directory = Path(directory)
        self.dump_dir = self.directory / "mail"
        self.log_path = self.directory / "smtp-sink.log"
        self.host = LOOPBACK
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self.hostname = hostname
        self.hard_reject = self._commands(hard_reject, "hard_reject")
        self.soft_reject = self._commands(soft_reject, "soft_reject")
        self.close_421 = self._commands(close_421, "close_421")
        self.disconnect = self._commands(disconnect, "disconnect")
        for reply, first in ((hard_reply, "5"), (soft_reply, "4")):
            if reply is not None and not re.fullmatch(rf"{first}\d\d( .*)?", reply):
                raise ValueError(f"smtp-sink needs a {first}xx reply, got {reply!r}")
        self.hard_reply = hard_reply
        self.soft_reply = soft_reply
        self.extra_args = list(extra_args)
        self.backlog = backlog
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        # Capture files still open when smtp-sink was stopped: never complete.
        self._incomplete: set[str] = set()

    @staticmethod
    def _commands(names: Iterable[str], what: str) -> tuple[str, ...]:
        result = tuple(name.lower() for name in names)
        unknown = sorted(set(result) - SINK_COMMANDS)
        if unknown:
            raise ValueError(
                f"{what}: smtp-sink knows no command {', '.join(unknown)}; "
                f"use some of {', '.join(sorted(SINK_COMMANDS))}"
            )
        return result

    @property
    def rejects_end_of_data(self) -> bool:
        """Whether the client never gets a 250 for its message."""
        refused = (*self.hard_reject, *self.soft_reject, *self.close_421, *self.disconnect)
        return "." in refused

    def argv(self) -> list[str]:
        argv = [require_binary("smtp-sink")]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += ["-c", "-h", self.hostname]
        for flag, commands in (
            ("-f", self.hard_reject),
            ("-r", self.soft_reject),
            ("-Q", self.close_421),
            ("-q", self.disconnect),
        ):
            if commands:
                argv += [flag, ",".join(commands)]
        if self.hard_reply is not None:
            argv += ["-B", self.hard_reply]
        if self.soft_reply is not None:
            argv += ["-b", self.soft_reply]
        # Relative to the working directory: smtp-sink opens files after it
        # drops to nobody, who could not walk a 0700 parent such as pytest's.
        argv += ["-d", SINK_DUMP_TEMPLATE, *self.extra_args]
        argv += [f"{self.host}:{self.port}", str(self.backlog)]
        return argv

    def start(self, timeout: float = 10.0) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"smtp-sink is already running on port {self.port}")
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dump_dir, nobody.pw_uid, nobody.pw_gid)
        for _attempt in range(5):
            self._log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=self.dump_dir,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    self._log.close()
                    log = _tail(self.log_path)
                    if self._auto_port and "Address already in use" in log:
                        self.port = free_port()
                        break
                    raise RuntimeError(
                        f"smtp-sink exited with status {self.proc.returncode} before "
                        f"listening on {self.host}:{self.port}; its log:\n{log}"
                    )
                if pid_listens_on(self.proc.pid, self.port):
                    return self
                if time.monotonic() >= deadline:
                    self.stop()
                    raise TimeoutError(
                        f"smtp-sink did not listen on {self.host}:{self.port} within "
                        f"{timeout} s; its log:\n{_tail(self.log_path)}"
                    )
                time.sleep(_POLL)
        raise RuntimeError(f"smtp-sink found no free port; its log:\n{_tail(self.log_path)}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop smtp-sink and wait until its port refuses connections."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._incomplete |= self._open_dump_files()
        _end_process(self.proc, timeout)
        if self._log is not None:
            self._log.close()
        wait_for_port_closed(self.host, self.port, timeout)

    def __enter__(self) -> Self:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _open_dump_files(self) -> set[str]:
        """Names of capture files smtp-sink is still writing."""
        if self.proc is None or self.proc.poll() is not None:
            return set()
        names = set()
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        dump_dir = self.dump_dir.resolve()
        try:
            fds = list(fd_dir.iterdir())
        except FileNotFoundError:
            return set()
        for fd in fds:
            with contextlib.suppress(OSError):
                target = Path(os.readlink(fd))
                if target.parent == dump_dir:
                    names.add(target.name)
        return names

    def captured(self) -> list[SinkMessage]:
        """Every transaction that got as far as the final dot, in order of completion.

        smtp-sink creates the file at MAIL and writes it as data arrives, so a
        file still open in smtp-sink is skipped. List first, then look at the
        open files: a file not open by then is complete.
        """
        try:
            entries = list(os.scandir(self.dump_dir))
        except FileNotFoundError:
            return []
        busy = self._open_dump_files() | self._incomplete
        done: list[tuple[int, str, SinkMessage]] = []
        for entry in entries:
            if entry.name in busy or not entry.is_file():
                continue
            try:
                mtime = entry.stat().st_mtime_ns
                message = SinkMessage.from_dump(Path(entry.path))
            except FileNotFoundError:
                continue  # RSET or a lost connection removed it just now
            done.append((mtime, entry.name, message))
        done.sort(key=lambda item: (item[0], item[1]))
        return [message for _, _, message in done]

    def messages(self) -> list[SinkMessage]:
        """Messages smtp-sink accepted (answered 250 to the final dot)."""
        return [] if self.rejects_end_of_data else self.captured()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        """Wait until at least `count` messages were accepted; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"smtp-sink on port {self.port} has {len(found)} of {count} "
                    f"messages after {timeout} s; its log:\n{_tail(self.log_path)}"
                )
            time.sleep(_POLL)

    def clear(self) -> None:
        """Forget every complete capture file, so later checks see only new mail."""
        for message in self.captured():
            message.path.unlink(missing_ok=True)


def smtp_source(
    port: int,
    *,
    sessions: int = 4,
    messages: int = 50,
    size: int = 1024,
    sender: str = "from@a.test",
    recipient: str = "to@b.test",
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Send `messages` generated messages over `sessions` parallel sessions."""
    argv = [
        require_binary("smtp-source"),
        "-s", str(sessions), "-m", str(messages), "-l", str(size),
        "-f", sender, "-t", recipient, *extra_args, f"{LOOPBACK}:{port}",
    ]  # fmt: skip
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- swaks


class SwaksExit(enum.IntEnum):
    """swaks's exit status (man swaks, EXIT CODES)."""

    OK = 0
    BAD_OPTIONS = 1
    CONNECT_FAILED = 2
    UNKNOWN_CONNECTION_TYPE = 3
    CONNECTION_CLOSED = 6  # closed unexpectedly after a 2xx/3xx answer
    PREREQUISITE_MISSING = 10
    BANNER_ERROR = 21  # the greeting was not 2xx (or could not be read)
    HELO_REJECTED = 22
    MAIL_REJECTED = 23
    RCPT_REJECTED = 24  # no RCPT accepted
    DATA_REJECTED = 25  # the DATA command itself
    MESSAGE_REJECTED = 26  # the answer to the final dot
    QUIT_REJECTED = 27
    AUTH_FAILED = 28
    TLS_FAILED = 29


_SENT_HINTS = (" ->", " ~>", "**>", "*~>")
_RECEIVED_HINTS = ("<- ", "<~ ", "<**", "<~*")
_REPLY_LINE = re.compile(r"(\d{3})([ -]?)(.*)")


@dataclass(frozen=True)
class SmtpExchange:
    """One command from a swaks transcript and the server's answer to it.

    command is "" for the greeting and "." for the end of the message data.
    """

    command: str
    code: int
    lines: list[str]

    @property
    def verb(self) -> str:
        return self.command.split(" ", 1)[0].split(":", 1)[0].upper()


def swaks(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run swaks; stdout holds the whole transcript (stderr merged, in order)."""
    return subprocess.run(
        [require_binary("swaks"), *args],
        stdin=subprocess.DEVNULL,  # swaks prompts for anything missing
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )


def swaks_send(
    port: int,
    to: str | Sequence[str],
    *,
    sender: str = "sender@client.test",
    headers: Mapping[str, str] | None = None,
    body: str | None = None,
    data: str | bytes | None = None,
    data_fixup: bool = True,
    helo: str = "client.test",
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> tuple[int, str]:
    """Send one message with swaks to 127.0.0.1:port; return (exit status, transcript).

    headers replace swaks's own (Subject, From, ...) or are added. data is the
    whole DATA content: swaks adds CRLF and the final dot, but with
    data_fixup=False it sends data exactly, so data must end with b"\r\n.\r\n".
    """
    recipients = to if isinstance(to, str) else ",".join(to)
    argv = [
        "--server", f"{LOOPBACK}:{port}",
        "--to", recipients,
        "--from", sender,
        "--helo", helo,
        "--timeout", f"{max(1, int(timeout))}s",
    ]  # fmt: skip
    for name, value in (headers or {}).items():
        argv += ["--header", f"{name}: {value}"]
    if body is not None:
        argv += ["--body", body]
    with tempfile.TemporaryDirectory(prefix="swaks-") as scratch:
        if data is not None:
            data_file = Path(scratch) / "data.eml"
            data_file.write_bytes(data.encode() if isinstance(data, str) else data)
            argv += ["--data", f"@{data_file}"]
            if not data_fixup:
                argv.append("--no-data-fixup")
        result = swaks(*argv, *extra_args, timeout=timeout + 10)
    return result.returncode, result.stdout


def smtp_exchanges(transcript: str) -> list[SmtpExchange]:
    """Pair each command in a swaks transcript with the reply to it."""
    exchanges: list[SmtpExchange] = []
    pending: deque[str] = deque()
    in_data = False
    reply: list[str] = []
    for line in transcript.splitlines():
        hint, text = line[:3], line[4:]
        if hint in _SENT_HINTS:
            if in_data:
                if text == ".":
                    pending.append(".")
                    in_data = False
                continue
            pending.append(text)
        elif hint in _RECEIVED_HINTS:
            match = _REPLY_LINE.fullmatch(text)
            if match is None:
                continue
            reply.append(text)
            if match.group(2) == "-":
                continue
            command = pending.popleft() if pending else ""
            code = int(match.group(1))
            exchanges.append(SmtpExchange(command, code, reply))
            reply = []
            if code == 354:
                in_data = True
    return exchanges


def reply_codes(transcript: str, verb: str) -> list[int]:
    """Reply codes to every command with this verb ("MAIL", "RCPT", "DATA", ".", ...)."""
    return [x.code for x in smtp_exchanges(transcript) if x.verb == verb.upper()]


def rcpt_reply_codes(transcript: str) -> list[int]:
    """The reply code to each RCPT TO, in order."""
    return reply_codes(transcript, "RCPT")


def data_reply_code(transcript: str) -> int | None:
    """The last answer of the DATA phase: to the final dot, else to DATA, else None."""
    for exchange in reversed(smtp_exchanges(transcript)):
        if exchange.verb in (".", "DATA"):
            return exchange.code
    return None


# --------------------------------------------------------------------------- raw SMTP

_FINAL_REPLY_LINE = re.compile(rb"^(\d{3})(?: .*)?$")


def _final_codes(data: bytes) -> list[int]:
    """Codes of the complete last lines of replies in `data`."""
    codes = []
    for line in data.split(b"\n")[:-1]:
        match = _FINAL_REPLY_LINE.match(line.rstrip(b"\r"))
        if match:
            codes.append(int(match.group(1)))
    return codes


def sendmail_raw(
    port: int,
    lines: bytes,
    *,
    until: int | None = 221,
    wait_greeting: bool = True,
    timeout: float = 10.0,
    host: str = LOOPBACK,
) -> bytes:
    """Speak raw bytes to an SMTP server and return everything it answered.

    Waits for the greeting (unless wait_greeting is false), sends `lines` in
    one write, then reads until a reply with code `until` is complete or the
    server closes. With until=None it reads until the server closes or
    `timeout` passes, and returns what came. Otherwise a timeout raises.
    """
    deadline = time.monotonic() + timeout
    received = b""

    def read_until(done: Callable[[bytes], bool]) -> bool:
        nonlocal received
        while not done(received):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            received += chunk
        return True

    with socket.create_connection((host, port), timeout=timeout) as sock:
        if wait_greeting and not read_until(lambda data: bool(_final_codes(data))):
            raise TimeoutError(
                f"no SMTP greeting from {host}:{port} within {timeout} s; got {received!r}"
            )
        greeting_len = len(received)
        sock.sendall(lines)

        def finished(data: bytes) -> bool:
            return until is not None and until in _final_codes(data[greeting_len:])

        if not read_until(finished) and until is not None:
            raise TimeoutError(
                f"no {until} reply from {host}:{port} within {timeout} s; got {received!r}"
            )
    return received


# --------------------------------------------------------------------------- the gateway


class GatewayProcess:
    """The gateway as a real process: `python -m gateway run -c CONFIG`.

    Runs in the config's folder with stdout and stderr in one log file.
    `argv` replaces the command (tests of this class use a stand-in server).
    """

    def __init__(
        self,
        config_path: Path,
        *,
        argv: Sequence[str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.cwd = Path(cwd) if cwd is not None else self.config_path.parent
        self.argv = (
            list(argv)
            if argv is not None
            else [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path)]
        )
        self.log_path = Path(log_path) if log_path is not None else self.cwd / "gateway.log"
        self.env = dict(os.environ if env is None else env)
        # This checkout's gateway, even when another copy is installed; and
        # unbuffered output so wait_for_log sees lines as they are printed.
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        self.env["PYTHONUNBUFFERED"] = "1"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0

    @property
    def pid(self) -> int:
        return self._running_proc().pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _running_proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("the gateway process was never started")
        return self.proc

    def start(self, wait_port: int | Sequence[int], timeout: float = 15.0) -> Self:
        """Start the process and wait until each TCP port on 127.0.0.1 accepts."""
        if self.is_running():
            raise RuntimeError(f"the gateway is already running as pid {self.pid}")
        ports = [wait_port] if isinstance(wait_port, int) else list(wait_port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is not None:
            self._log.close()
        self._log = self.log_path.open("ab")
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        for port in ports:
            while not port_accepts(LOOPBACK, port):
                if self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"the gateway exited with status {self.proc.returncode} before "
                        f"listening on {LOOPBACK}:{port}; command {self.argv}; "
                        f"log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                if time.monotonic() >= deadline:
                    self.stop()
                    raise TimeoutError(
                        f"the gateway did not listen on {LOOPBACK}:{port} within "
                        f"{timeout} s; command {self.argv}; "
                        f"log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                time.sleep(_POLL)
        return self

    def send_signal(self, signum: int) -> None:
        proc = self._running_proc()
        if proc.poll() is not None:
            raise RuntimeError(
                f"the gateway already exited with status {proc.returncode}; "
                f"log:\n{_tail(self.log_path)}"
            )
        proc.send_signal(signum)

    def hup(self) -> None:
        self.send_signal(signal.SIGHUP)

    def term(self) -> None:
        self.send_signal(signal.SIGTERM)

    def queue(self, *args: str) -> list[dict[str, object]]:
        """``gateway queue --json ARGS`` on this gateway's configuration (list, dead ...)."""
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "queue", "-c", str(self.config_path), "--json",
             *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"gateway queue {' '.join(args)} failed: {done.stderr}")
        result: list[dict[str, object]] = json.loads(done.stdout)
        return result

    def kill9(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the process to exit; its status (negative: killed by that signal)."""
        proc = self._running_proc()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"the gateway (pid {proc.pid}) is still running after {timeout} s; "
                f"log:\n{_tail(self.log_path)}"
            ) from None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status, None if never started."""
        if self.proc is None:
            return None
        status = _end_process(self.proc, timeout)
        if self._log is not None:
            self._log.close()
        return status

    def log_mark(self) -> int:
        """The log's current length, to pass as `since` to wait_for_log."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, since: int = 0) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(since)
            return log.read().decode("utf-8", "replace")

    def wait_for_log(
        self, substring: str, timeout: float = 10.0, *, since: int | None = None
    ) -> str:
        """Wait until `substring` is logged after `since` (default: the last start).

        Returns the log from `since` on. Fails early if the process exits.
        """
        start = self._log_start if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            # Look at the exit first: lines written just before exiting still count.
            exited = self.proc is not None and self.proc.poll() is not None
            text = self.log_text(start)
            if substring in text:
                return text
            if exited or time.monotonic() >= deadline:
                why = (
                    f"the gateway exited with status {self.returncode}"
                    if exited
                    else f"{timeout} s passed"
                )
                raise TimeoutError(
                    f"{substring!r} was not logged ({why}); log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(_POLL)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- DNS peers

# Names under this suffix are the fixtures' own probes (readiness checks and
# dnsdist's health checks); Unbound.query_count leaves them out.
PROBE_SUFFIX = "peers.invalid."
READY_PROBE_NAME = f"ready.{PROBE_SUFFIX}"
HEALTH_PROBE_NAME = f"dnsdist-health.{PROBE_SUFFIX}"

_PROBE_TIMEOUT = 0.2


def free_udp_tcp_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago for both TCP and UDP (DNS needs both)."""
    for _attempt in range(100):
        port = free_port("tcp")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    raise RuntimeError("found no port on 127.0.0.1 free for both TCP and UDP in 100 tries")


def _absolute_name(name: str) -> str:
    return name if name.endswith(".") else f"{name}."


def _run_tool(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )


_CERTS: dict[Path, tuple[Path, Path]] = {}


def make_tls_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, 127.0.0.1 and ::1: (cert.pem, key.pem) in directory.

    The certificate is its own CA: clients pass cert.pem as the CA file. Made
    once per directory; later calls return the same files.
    """
    directory = Path(directory).resolve()
    cert, key = directory / "cert.pem", directory / "key.pem"
    if _CERTS.get(directory) == (cert, key) and cert.exists() and key.exists():
        return cert, key
    if not (cert.exists() and key.exists()):
        directory.mkdir(parents=True, exist_ok=True)
        cert_tmp, key_tmp = directory / "cert.pem.tmp", directory / "key.pem.tmp"
        argv = [
            require_binary("openssl"), "req", "-x509",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "3650",
            "-keyout", str(key_tmp), "-out", str(cert_tmp),
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
        ]  # fmt: skip
        result = _run_tool(argv, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(
                f"openssl could not make a test certificate (status {result.returncode}):\n"
                f"{result.stderr}"
            )
        # The key first: a cert.pem that exists always has its key next to it.
        os.replace(key_tmp, key)
        os.replace(cert_tmp, cert)
    _CERTS[directory] = (cert, key)
    return cert, key


def dns_probe(port: int, name: str = READY_PROBE_NAME, timeout: float = _PROBE_TIMEOUT) -> bool:
    """Whether a DNS server on 127.0.0.1:port answers a UDP query for `name` (any rcode)."""
    query = dns.message.make_query(name, "A")
    try:
        dns.query.udp(query, LOOPBACK, timeout=timeout, port=port)
    except (dns.exception.DNSException, OSError):
        return False
    return True


def tls_accepts(port: int, cafile: Path, timeout: float = 1.0) -> bool:
    """Whether a TLS handshake with 127.0.0.1:port succeeds, verifying against cafile."""
    context = ssl.create_default_context(cafile=str(cafile))
    try:
        with (
            socket.create_connection((LOOPBACK, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=LOOPBACK),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def _unbound_quote(value: str) -> str:
    """A string as unbound.conf reads it: in double quotes, or single ones if it holds a double."""
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise ValueError(f"unbound.conf cannot quote a value with both kinds of quotes: {value!r}")


def _has_soa(records: Iterable[str], zone: str) -> bool:
    for record in records:
        fields = record.split()
        if (
            fields
            and _absolute_name(fields[0]).lower() == zone.lower()
            and "SOA" in (f.upper() for f in fields[1:4])
        ):
            return True
    return False


# unbound's log line for each query it parsed, with log-queries and
# log-tag-queryreply: "[1795624162] unbound[18130:0] query: 127.0.0.1 www.example.test. A IN".
# It is written (and flushed) before the answer is sent.
_UNBOUND_QUERY_LINE = re.compile(
    r"^\[\d+\] unbound\[\d+:[0-9a-f]+\] query: "
    r"(?P<client>[0-9A-Fa-f.:]+) (?P<name>\S+) (?P<type>\S+) (?P<cls>\S+)$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class LoggedQuery:
    """One query as unbound logged it: client address, name (absolute, as unbound prints it), type, class."""

    client: str
    name: str
    rdtype: str
    rdclass: str

    @property
    def is_probe(self) -> bool:
        return self.name.lower().endswith(f".{PROBE_SUFFIX}")


class Unbound:
    """unbound on 127.0.0.1 as an offline upstream that answers only from its own data.

    Each zone is a static local zone (with a SOA unless `records` gives one),
    `records` are its local-data lines ("www.example.test. 300 IN A 192.0.2.10"),
    every other name is REFUSED (names under test. and invalid. outside the
    zones get NXDOMAIN: unbound's built-in zones). With `whoami`, the TXT record
    whoami.test. holds it, to tell instances apart. extra_config goes at the
    end of the server: clause. Every query unbound parses is logged, so
    query_count() tells how many reached it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        records: Sequence[str] = (),
        zones: Sequence[str] = ("example.test.",),
        whoami: str | None = None,
        extra_config: str = "",
    ) -> None:
        self.directory = Path(directory).resolve()
        self.config_path = self.directory / "unbound.conf"
        self.log_path = self.directory / "unbound.log"
        self.stderr_path = self.directory / "unbound.stderr"
        self.host = LOOPBACK
        self._auto_port = port is None
        self.port = free_udp_tcp_port() if port is None else port
        self.zones = tuple(_absolute_name(zone) for zone in zones)
        if "." in self.zones:
            raise ValueError("the root zone is always refused; give unbound zones below it")
        if whoami is not None and any(c in whoami for c in "\"'\\"):
            raise ValueError(f"whoami must hold no quotes or backslashes, got {whoami!r}")
        self.records = tuple(records)
        self.whoami = whoami
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def config_text(self) -> str:
        zones = list(dict.fromkeys(self.zones))
        records = list(self.records)
        if self.whoami is not None:
            if "whoami.test." not in zones:
                zones.append("whoami.test.")
            records.append(f'whoami.test. 300 IN TXT "{self.whoami}"')
        lines = [
            "server:",
            f"    interface: {self.host}@{self.port}",
            "    num-threads: 1",
            # A second server on the same port must fail, not share the queries.
            "    so-reuseport: no",
            '    chroot: ""',
            '    username: ""',
            f"    directory: {_unbound_quote(str(self.directory))}",
            f"    pidfile: {_unbound_quote(str(self.directory / 'unbound.pid'))}",
            "    use-syslog: no",
            f"    logfile: {_unbound_quote(str(self.log_path))}",
            "    log-time-ascii: no",
            "    verbosity: 1",
            "    log-queries: yes",
            # Query lines say "query:" instead of "info:", so counting them is exact.
            "    log-tag-queryreply: yes",
            # No validator, so no trust anchor to fetch from outside.
            '    module-config: "iterator"',
            # Nothing is ever looked up outside this machine.
            '    local-zone: "." refuse',
        ]
        for zone in zones:
            lines.append(f"    local-zone: {_unbound_quote(zone)} static")
            if not _has_soa(records, zone):
                # Real zones have one, and NXDOMAIN answers carry it.
                soa = f"{zone} 3600 IN SOA ns.{zone} hostmaster.{zone} 1 3600 900 604800 300"
                lines.append(f"    local-data: {_unbound_quote(soa)}")
        lines += [f"    local-data: {_unbound_quote(record)}" for record in records]
        lines += [f"    {line}" for line in self.extra_config.splitlines()]
        lines += ["remote-control:", "    control-enable: no", ""]
        return "\n".join(lines)

    def _check_config(self) -> None:
        result = _run_tool([require_binary("unbound-checkconf"), str(self.config_path)], 30)
        if result.returncode != 0:
            raise RuntimeError(
                f"unbound-checkconf rejects {self.config_path}:\n{result.stdout}{result.stderr}"
            )

    def _output(self, since: int = 0) -> str:
        try:
            with self.stderr_path.open("rb") as out:
                out.seek(since)
                return out.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _failure_report(self) -> str:
        return (
            f"its output {self.stderr_path}:\n{_tail(self.stderr_path)}\n"
            f"its log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def start(self, timeout: float = 10.0) -> Self:
        """Start unbound and wait until it answers a query on its port."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"unbound is already running on port {self.port}")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):
            self.config_path.write_text(self.config_text())
            self._check_config()
            self._stderr = self.stderr_path.open("ab")
            since = self._stderr.tell()
            self.proc = subprocess.Popen(
                [require_binary("unbound"), "-d", "-p", "-c", str(self.config_path)],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    self._stderr.close()
                    # Bind errors come before the log file is open: on stderr.
                    # UDP says "bind: address already in use", TCP "Address already in use".
                    clash = "address already in use" in self._output(since).lower()
                    if self._auto_port and clash:
                        self.port = free_udp_tcp_port()
                        break
                    raise RuntimeError(
                        f"unbound exited with status {self.proc.returncode} before answering "
                        f"on {self.host}:{self.port}; {self._failure_report()}"
                    )
                if pid_listens_on(self.proc.pid, self.port) and dns_probe(self.port):
                    return self
                if time.monotonic() >= deadline:
                    self.stop()
                    raise TimeoutError(
                        f"unbound did not answer on {self.host}:{self.port} within {timeout} s; "
                        f"{self._failure_report()}"
                    )
                time.sleep(_POLL)
        raise RuntimeError(f"unbound found no free port; {self._failure_report()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop unbound, reap it and wait until its port refuses connections."""
        if self.proc is None:
            return
        _end_process(self.proc, timeout)
        if self._stderr is not None:
            self._stderr.close()
        wait_for_port_closed(self.host, self.port, timeout)

    def __enter__(self) -> Self:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def queries(self, *, include_probes: bool = False) -> list[LoggedQuery]:
        """Every query unbound logged (over all its runs), oldest first."""
        text = self.log_text()
        # A line unbound is writing right now is not a query yet.
        text = text[: text.rfind("\n") + 1]
        found = [
            LoggedQuery(m["client"], m["name"], m["type"], m["cls"])
            for m in _UNBOUND_QUERY_LINE.finditer(text)
        ]
        return found if include_probes else [q for q in found if not q.is_probe]

    def query_count(
        self, name: str | None = None, rdtype: str | None = None, *, include_probes: bool = False
    ) -> int:
        """How many queries reached unbound, optionally only for one name and/or type.

        Probes of the fixtures (names under PROBE_SUFFIX) are left out unless
        include_probes. unbound logs a query (line-buffered) once it has parsed
        the question and before it answers, so the count is exact as soon as
        the client has its answer. Queries it drops unparsed (or FORMERR) are
        not counted.
        """
        wanted_name = None if name is None else _absolute_name(name).lower()
        wanted_type = None if rdtype is None else rdtype.upper()
        return sum(
            1
            for q in self.queries(include_probes=include_probes)
            if (wanted_name is None or q.name.lower() == wanted_name)
            and (wanted_type is None or q.rdtype.upper() == wanted_type)
        )


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


_DNSDIST_BIND_ERROR = re.compile(
    r"binding socket to [0-9.]+:(\d+): Address already in use", re.IGNORECASE
)


class Dnsdist:
    """dnsdist on 127.0.0.1: a forwarder to unbound instances and a DoH server.

    Plain DNS (UDP and TCP) on dns_port, DoH on https://127.0.0.1:doh_port/dns-query
    with a self-signed certificate (`cert` is the CA file for clients). With
    cache, a packet cache answers repeated queries without asking the
    upstreams. dnsdist answers the fixture's readiness probe itself, and its
    health checks ask for HEALTH_PROBE_NAME, so neither shows in
    Unbound.query_count. extra_lua goes at the end of the configuration.
    """

    def __init__(
        self,
        directory: Path,
        *,
        upstreams: Sequence[int],
        dns_port: int | None = None,
        doh_port: int | None = None,
        cache: bool = False,
        extra_lua: str = "",
    ) -> None:
        if not upstreams:
            raise ValueError("dnsdist needs at least one upstream port (an Unbound's .port)")
        self.directory = Path(directory).resolve()
        self.config_path = self.directory / "dnsdist.conf"
        self.log_path = self.directory / "dnsdist.log"
        self.host = LOOPBACK
        self.upstreams = tuple(int(port) for port in upstreams)
        self._auto_dns_port = dns_port is None
        self._auto_doh_port = doh_port is None
        self.dns_port = free_udp_tcp_port() if dns_port is None else dns_port
        self.doh_port = free_port() if doh_port is None else doh_port
        self.cache = cache
        self.extra_lua = extra_lua
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._cert: tuple[Path, Path] | None = None

    @property
    def cert(self) -> Path:
        """The certificate DoH clients verify against (it is its own CA)."""
        return self._cert_and_key()[0]

    @property
    def key(self) -> Path:
        return self._cert_and_key()[1]

    def _cert_and_key(self) -> tuple[Path, Path]:
        if self._cert is None:
            self._cert = make_tls_cert(self.directory)
        return self._cert

    @property
    def doh_url(self) -> str:
        return f"https://{self.host}:{self.doh_port}/dns-query"

    def config_text(self) -> str:
        lines = [
            # No security-status look-ups to the outside.
            "setSecurityPollSuffix('')",
            f"setLocal({_lua_string(f'{self.host}:{self.dns_port}')})",
            "setACL({'127.0.0.0/8', '::1/128'})",
            f"addAction(QNameRule({_lua_string(READY_PROBE_NAME)}), RCodeAction(DNSRCode.REFUSED))",
        ]
        for port in self.upstreams:
            lines.append(
                f"newServer({{address={_lua_string(f'{self.host}:{port}')}, "
                f"name={_lua_string(f'unbound-{port}')}, "
                f"checkName={_lua_string(HEALTH_PROBE_NAME)}}})"
            )
        lines.append(
            f"addDOHLocal({_lua_string(f'{self.host}:{self.doh_port}')}, "
            f"{_lua_string(str(self.cert))}, {_lua_string(str(self.key))}, '/dns-query')"
        )
        if self.cache:
            lines += ["pc = newPacketCache(100000, {})", "getPool(''):setCache(pc)"]
        lines += [*self.extra_lua.splitlines(), ""]
        return "\n".join(lines)

    def _check_config(self) -> None:
        argv = [require_binary("dnsdist"), "--check-config", "-C", str(self.config_path)]
        result = _run_tool(argv, 30)
        # A config it cannot read is "OK" too, and dnsdist would then run on
        # its defaults: port 53 and security polling out to the internet.
        if result.returncode != 0 or "Unable to read configuration" in result.stdout:
            raise RuntimeError(
                f"dnsdist --check-config rejects {self.config_path}:\n"
                f"{result.stdout}{result.stderr}\nThe configuration:\n{self.config_text()}"
            )

    def _log_since(self, since: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(since)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _ready(self) -> bool:
        assert self.proc is not None
        return (
            pid_listens_on(self.proc.pid, self.dns_port)
            and pid_listens_on(self.proc.pid, self.doh_port)
            and dns_probe(self.dns_port)
            and tls_accepts(self.doh_port, self.cert)
        )

    def start(self, timeout: float = 15.0) -> Self:
        """Start dnsdist; wait until it answers DNS on dns_port and TLS on doh_port."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"dnsdist is already running on port {self.dns_port}")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):
            self.config_path.write_text(self.config_text())
            self._check_config()
            self._log = self.log_path.open("ab")
            since = self._log.tell()
            argv = [
                require_binary("dnsdist"), "--supervised", "--disable-syslog",
                "-C", str(self.config_path),
            ]  # fmt: skip
            self.proc = subprocess.Popen(
                argv,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    self._log.close()
                    clash = _DNSDIST_BIND_ERROR.search(self._log_since(since))
                    if clash and self._retry_with_new_port(int(clash.group(1))):
                        break
                    raise RuntimeError(
                        f"dnsdist exited with status {self.proc.returncode} before serving "
                        f"DNS on {self.host}:{self.dns_port} and DoH on {self.doh_url}; "
                        f"its log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                if self._ready():
                    return self
                if time.monotonic() >= deadline:
                    self.stop()
                    raise TimeoutError(
                        f"dnsdist did not serve DNS on {self.host}:{self.dns_port} and DoH on "
                        f"{self.doh_url} within {timeout} s; "
                        f"its log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                time.sleep(_POLL)
        raise RuntimeError(f"dnsdist found no free ports; its log:\n{_tail(self.log_path)}")

    def _retry_with_new_port(self, taken: int) -> bool:
        """Pick a new port for `taken` if the fixture chose it; False if the caller did."""
        if taken == self.dns_port and self._auto_dns_port:
            self.dns_port = free_udp_tcp_port()
            return True
        if taken == self.doh_port and self._auto_doh_port:
            self.doh_port = free_port()
            return True
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dnsdist, reap it and wait until its ports refuse connections."""
        if self.proc is None:
            return
        _end_process(self.proc, timeout)
        if self._log is not None:
            self._log.close()
        wait_for_port_closed(self.host, self.dns_port, timeout)
        wait_for_port_closed(self.host, self.doh_port, timeout)

    def __enter__(self) -> Self:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --------------------------------------------------------------------------- DNS clients


def dig(*args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run dig (no ~/.digrc; 2 s per try, one try unless args say otherwise).

    Always give it a server: "@127.0.0.1", "-p", str(port).
    """
    return _run_tool([require_binary("dig"), "-r", "+time=2", "+tries=1", *args], timeout)


def kdig(*args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run kdig (2 s timeout, no retry unless args say otherwise).

    DoH: kdig @127.0.0.1 -p PORT +https +tls-ca=CERT NAME (+https=/path for another path).
    """
    return _run_tool([require_binary("kdig"), "+time=2", "+retry=0", *args], timeout)


def curl(*args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run curl quietly (errors still on stderr), never through a proxy, bounded by timeout."""
    argv = [
        require_binary("curl"), "--silent", "--show-error", "--noproxy", "*",
        "--max-time", str(max(1, int(timeout) - 1)), *args,
    ]  # fmt: skip
    return _run_tool(argv, timeout)


@dataclass(frozen=True)
class DohResponse:
    """One DoH answer fetched with curl: HTTP status, headers (names in lower case), body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def message(self) -> dns.message.Message:
        return dns.message.from_wire(self.body)


def doh_query(
    url: str,
    query: dns.message.Message | bytes,
    *,
    cacert: Path,
    method: Literal["POST", "GET"] = "POST",
    http_version: Literal["1.1", "2"] = "2",
    timeout: float = 15.0,
) -> DohResponse:
    """Send one DNS query over DoH with curl (RFC 8484 POST or GET ?dns=) and return the answer."""
    wire = query.to_wire() if isinstance(query, dns.message.Message) else query
    with tempfile.TemporaryDirectory(prefix="doh-") as scratch:
        body_path = Path(scratch) / "answer.bin"
        headers_path = Path(scratch) / "headers.txt"
        argv = [
            "--cacert", str(cacert),
            "--http2" if http_version == "2" else "--http1.1",
            "-H", "accept: application/dns-message",
            "--output", str(body_path), "--dump-header", str(headers_path),
            "--write-out", "%{http_code}",
        ]  # fmt: skip
        if method == "POST":
            query_path = Path(scratch) / "query.bin"
            query_path.write_bytes(wire)
            argv += ["-H", "content-type: application/dns-message"]
            argv += ["--data-binary", f"@{query_path}", url]
        else:
            encoded = base64.urlsafe_b64encode(wire).rstrip(b"=").decode()
            argv.append(f"{url}?dns={encoded}")
        result = curl(*argv, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"curl could not fetch {url} (status {result.returncode}): {result.stderr.strip()}"
            )
        headers: dict[str, str] = {}
        # Only the last response's headers (a 100 Continue may come first).
        for line in headers_path.read_text(errors="replace").splitlines():
            if line.startswith("HTTP/"):
                headers = {}
            name, sep, value = line.partition(":")
            if sep and not line.startswith("HTTP/"):
                headers[name.strip().lower()] = value.strip()
        body = body_path.read_bytes() if body_path.exists() else b""
    return DohResponse(int(result.stdout.strip() or 0), headers, body)


# --- Postfix as a relay (for STARTTLS and as a real SMTP server) -----------------------

_POSTFIX_MASTER_CF = """\
# A private Postfix for tests: nothing chrooted, smtpd on loopback only.
{listen} inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


class PostfixRelay:
    """A private Postfix (``postfix -c DIR``) on 127.0.0.1 relaying ``relay_domains`` to a sink.

    The recipe of PEERS.md: its own queue and data folders, relayhost = the
    sink, logging to a file (there is no syslog). With ``tls=True`` its smtpd
    offers STARTTLS with a self-signed certificate (``cert``), so a client's
    TLS shows in the log ("TLS connection established from ..."). ``client_tls``
    is its smtp_tls_security_level towards ``relay_to`` ("encrypt": STARTTLS or
    no delivery; the log says "TLS connection established to ...").
    """

    def __init__(
        self,
        directory: Path,
        *,
        relay_to: int,
        relay_domains: str = "relay.test",
        tls: bool = False,
        client_tls: str = "none",
    ) -> None:
        # Postfix's daemons run as user postfix and must reach their queue: pytest's
        # tmp_path sits below a mode-0700 folder, so the instance lives in a folder of
        # its own under /tmp (``directory`` is only the parent it is named after).
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=f"postfix-{Path(directory).name}-"))
        self.directory.chmod(0o755)
        self.conf = self.directory / "conf"
        self.queue = self.directory / "queue"
        self.data = self.directory / "data"
        self.logdir = self.directory / "log"
        self.log_path = self.logdir / "postfix.log"
        self.relay_to = relay_to
        self.relay_domains = relay_domains
        self.tls = tls
        self.client_tls = client_tls  # smtp_tls_security_level towards relay_to
        self.port = 0
        self.cert: Path | None = None
        self.started = False
        self._last_log = ""

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [require_binary("postfix"), "-c", str(self.conf), *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
            timeout=60, check=False,
        )  # fmt: skip

    def _write_config(self) -> None:
        for path in (self.conf, self.queue, self.data, self.logdir):
            path.mkdir(parents=True, exist_ok=True)
        user = pwd.getpwnam("postfix")
        os.chown(self.data, user.pw_uid, user.pw_gid)
        self.data.chmod(0o700)
        tls_lines = "smtpd_tls_security_level = none\n"
        if self.tls:
            cert, key = make_tls_cert(self.directory / "tls")
            self.cert = cert
            # smtpd reads the key as root before dropping privileges; keep it private.
            tls_lines = (
                "smtpd_tls_security_level = may\n"
                f"smtpd_tls_cert_file = {cert}\n"
                f"smtpd_tls_key_file = {key}\n"
                "smtpd_tls_loglevel = 1\n"
            )
        (self.conf / "main.cf").write_text(
            f"compatibility_level = 3.6\n"
            f"queue_directory = {self.queue}\n"
            f"data_directory = {self.data}\n"
            f"maillog_file = {self.log_path}\n"
            f"maillog_file_prefixes = /var, /dev/stdout, {self.logdir}\n"
            "myhostname = relay.peers.localdomain\n"
            f"inet_interfaces = {LOOPBACK}\n"
            "inet_protocols = ipv4\n"
            "mynetworks = 127.0.0.0/8\n"
            f"relay_domains = {self.relay_domains}\n"
            f"relayhost = [{LOOPBACK}]:{self.relay_to}\n"
            "mydestination =\nalias_maps =\nalias_database =\nlocal_recipient_maps =\n"
            "smtp_dns_support_level = disabled\nsmtp_host_lookup = native\n"
            f"smtp_tls_security_level = {self.client_tls}\n"
            "smtp_tls_loglevel = 1\n"
            f"{tls_lines}"
            "biff = no\nsmtputf8_enable = no\n"
        )
        (self.conf / "master.cf").write_text(
            _POSTFIX_MASTER_CF.format(listen=f"{LOOPBACK}:{self.port}")
        )

    def _master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self, timeout: float = 30.0) -> Self:
        if os.geteuid() != 0:
            pytest.fail("a private Postfix instance needs root")
        self.port = free_port()
        self._write_config()
        check = self._postfix("check")
        if check.returncode != 0:
            pytest.fail(f"postfix check failed:\n{check.stdout}{check.stderr}")
        started = self._postfix("start")
        if started.returncode != 0:
            pytest.fail(
                f"postfix start failed:\n{started.stdout}{started.stderr}\n{_tail(self.log_path)}"
            )
        self.started = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self._master_pid()
            if pid is not None and port_accepts(LOOPBACK, self.port):
                return self
            time.sleep(0.1)
        self.stop()
        pytest.fail(
            f"Postfix did not listen on {LOOPBACK}:{self.port} within {timeout}s:\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        self._postfix("stop")
        try:
            wait_for_port_closed(LOOPBACK, self.port, 15)
        except TimeoutError:
            self._postfix("abort")
        self._last_log = self.log_text()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return self._last_log

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if text in log:
                return log
            time.sleep(0.1)
        raise TimeoutError(f"{text!r} did not appear in Postfix's log:\n{_tail(self.log_path)}")

    def __enter__(self) -> Self:
        return self.start() if not self.started else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- testssl.sh


def make_ca_signed_cert(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, chain.pem, key.pem): a test CA and a server certificate for localhost and
    127.0.0.1 that it signed, with a CRL and an OCSP address (never fetched) so that
    testssl.sh does not rate the certificate itself (no revocation info is HIGH)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    key, request, cert, chain = (
        directory / "key.pem",
        directory / "req.pem",
        directory / "cert.pem",
        directory / "chain.pem",
    )
    extensions = directory / "ext.cnf"
    extensions.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "crlDistributionPoints=URI:http://127.0.0.1:9/ca.crl\n"
        "authorityInfoAccess=OCSP;URI:http://127.0.0.1:9/ocsp\n"
    )
    openssl = require_binary("openssl")
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "90",
         "-subj", "/O=test CA/CN=test CA", "-keyout", str(ca_key), "-out", str(ca)],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/O=test/CN=localhost",
         "-keyout", str(key), "-out", str(request)],
        [openssl, "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "90", "-extfile", str(extensions), "-out", str(cert)],
    ]  # fmt: skip
    for argv in steps:
        result = _run_tool(argv, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"openssl failed: {' '.join(argv)}\n{result.stderr}")
    chain.write_bytes(cert.read_bytes() + ca.read_bytes())
    return ca, chain, key


# Findings of testssl.sh that say nothing about the server: Debian's OpenSSL 3 has no GOST
# engine, and a test certificate has no OCSP responder to staple.
TESTSSL_IGNORED = frozenset({"engine_problem", "OCSP_stapling"})


def tls_session_resumed(
    port: int, ca: Path, version: str, scratch: Path, starttls: str | None = None
) -> bool:
    """Whether a TLS ``version`` ("tls1_2", "tls1_3") session with 127.0.0.1:port is resumed.

    openssl s_client saves the session (waiting for the server's tickets: in TLS 1.3
    they come after the handshake, and a client that hangs up at once may miss them,
    as testssl.sh's own check does on a busy machine), then connects again with it
    and says "Reused" or "New".
    """
    openssl = require_binary("openssl")
    session = scratch / f"session-{port}-{version}.pem"
    session.unlink(missing_ok=True)
    base = [
        openssl,
        "s_client",
        "-connect",
        f"{LOOPBACK}:{port}",
        f"-{version}",
        "-CAfile",
        str(ca),
        *(["-starttls", starttls] if starttls else []),
    ]
    first = subprocess.Popen(
        [*base, "-sess_out", str(session)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert first.stdin is not None
    try:
        # s_client writes the file as a session (a ticket) arrives.
        wait_until(
            lambda: session.exists() and session.stat().st_size > 0,
            "a TLS session from the server",
            timeout=15,
            interval=0.05,
        )
    except TimeoutError:
        pass
    finally:
        first.stdin.close()
        first.wait(timeout=15)
    if not session.exists():
        return False
    second = subprocess.run(
        [*base, "-sess_in", str(session)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=15,
        check=False,
    )
    return any(line.startswith("Reused,") for line in second.stdout.splitlines())


def run_testssl(
    port: int, ca: Path, output: Path, *, starttls: str | None = None, http: bool = False
) -> list[dict[str, str]]:
    """testssl.sh's findings for a TLS server on 127.0.0.1:port (JSON records).

    ``http`` adds the HTTP header checks (-h: HSTS, the Server banner ...); ``-E``
    lists each cipher offered per protocol.
    """
    argv = [
        require_binary("testssl"),
        *(["-h"] if http else []),
        "-E",
        *(["--starttls", starttls] if starttls else []),
        "--quiet", "--warnings", "off", "--nodns", "min", "--color", "0",
        # Generous: on a busy CI machine a handshake with a loaded gateway can take
        # seconds, and a timeout shows up as "check failed because of connect problem".
        "--connect-timeout", "20", "--openssl-timeout", "20",
        "-p", "-s", "-f", "-P", "-S", "-H", "-I", "-T", "-R", "-C", "-O", "-Z", "-W",
        "-A", "-L", "-F", "-J", "-D", "-4",
        "--add-ca", str(ca), "--jsonfile", str(output), f"{LOOPBACK}:{port}",
    ]  # fmt: skip
    env = dict(os.environ, MAX_WAITSOCK="3", HEARTBLEED_MAX_WAITSOCK="3", CCS_MAX_WAITSOCK="3")
    output.unlink(missing_ok=True)  # testssl.sh will not write over a file
    subprocess.run(argv, capture_output=True, timeout=300, check=False, env=env)
    findings: list[dict[str, str]] = json.loads(output.read_text())
    return findings
