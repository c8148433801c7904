"""INN2, the system's news server, configured and run by the tests on a free port.

INN is one system-wide instance: this fixture owns the files under /etc/news it
rewrites (inn.conf keys, readers.conf, incoming.conf, moderators) and must not
be started twice at once.  Facts it relies on are in ../shared/PEERS.md: the
first `200` greeting means ready, `ctlinnd shutdown` then a closed port means
stopped, and a stopped innd may linger as a zombie that `kill -0` still sees.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.peers import (
    LOOPBACK,
    free_port,
    pid_listens_on,
    port_accepts,
    require_binary,
)

NEWS_ETC = Path("/etc/news")
# Debian's inn.conf as installed; every start derives the tests' inn.conf from it.
INN_CONF_ORIGINAL = NEWS_ETC / "inn.conf.gateway-tests-orig"
# Held while a test session owns INN, so two test runs never drive it at once.
LOCK_PATH = Path("/run/lock/gateway-tests-inn.lock")
LOCK_TIMEOUT = 900.0
NEWS_RUN = Path("/run/news")
NEWS_DB = Path("/var/lib/news")
NEWS_BIN = Path("/usr/lib/news/bin")
INND_PID = NEWS_RUN / "innd.pid"
# The moderator mail INN sends goes to a script that keeps it here (news must write it).
MTA_DIR = NEWS_DB / "gateway-tests-mta"
MTA_SCRIPT = NEWS_DB / "gateway-tests-mta.sh"

PATHHOST = "inn.localdomain"
# Large enough for the 5 MB article test after transfer encoding and headers.
MAX_ARTICLE_SIZE = 16_000_000

_POLL = 0.05

_INN_KEYS = {
    "domain": "localdomain",
    "bindaddress": LOOPBACK,
    "pathhost": PATHHOST,
    "doinnwatch": "false",
    # nnrpd answers "400 load at 17.35, try later" above this load average (default
    # 16): a busy CI machine is not a reason for a test to fail. 0: no limit.
    "nnrpdloadlimit": "0",
    "maxartsize": str(MAX_ARTICLE_SIZE),
    "localmaxartsize": str(MAX_ARTICLE_SIZE),
    "mta": f'"{MTA_SCRIPT} %s"',
}

_READERS_CONF = """\
# Written by the gateway's test fixture (tests/peers_news.py).
auth "loopback" {
    hosts: "localhost, 127.0.0.1, ::1"
    default: "<localhost>"
}
access "loopback" {
    users: "<localhost>"
    newsgroups: "*"
    access: RPAIN
}
"""

_INCOMING_CONF = """\
# Written by the gateway's test fixture (tests/peers_news.py).
streaming: true
max-connections: 0
peer ME {
    hostname: "localhost, 127.0.0.1, ::1"
}
"""

_MODERATORS = "# Written by the gateway's test fixture (tests/peers_news.py).\n*:%s@localhost\n"

# Prints nothing on stderr: INN copies the MTA's stderr into the NNTP reply.
_MTA_SCRIPT_TEXT = f"""\
#!/bin/sh
# Written by the gateway's test fixture: keeps what INN mails (to moderators).
exec 2>/dev/null
name="{MTA_DIR}/$(date +%s%N).$$"
printf '%s\\n' "$*" > "$name.args"
cat > "$name.tmp" && mv "$name.tmp" "$name.eml"
exit 0
"""


class NntpError(Exception):
    """INN answered something the helper did not expect."""


class _PortTaken(Exception):
    """Another program listens on the port chosen for INN."""


@dataclass(frozen=True)
class MtaCapture:
    """One mail INN handed to its `mta:` program: the arguments and the message."""

    args: str
    message: bytes
    path: Path

    @property
    def recipients(self) -> list[str]:
        return self.args.split()


def _news_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("news")
    except KeyError:
        require_binary("innd")
        raise


def _news_env() -> dict[str, str]:
    """Our environment without systemd's: with NOTIFY_SOCKET or LISTEN_PID set (a test run
    under a service or a container manager), rc.news runs innd in the foreground and never
    returns."""
    ours = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC")
    return {k: v for k, v in os.environ.items() if k not in ours}


def _as_news(command: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["su", "news", "-s", "/bin/sh", "-c", command],
        env=_news_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _process_state(pid: int) -> str | None:
    """The one-letter state of `pid`, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in parentheses may contain spaces; the state follows it.
    return stat[stat.rfind(")") + 2 :].split(" ", 1)[0]


def _alive(pid: int) -> bool:
    state = _process_state(pid)
    return state is not None and state not in ("Z", "X")


def _children(parent: int, name: str) -> list[int]:
    """Processes called ``name`` whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            comm = stat[stat.find("(") + 1 : stat.rfind(")")]
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            if comm == name and ppid == parent:
                found.append(int(entry.name))
    return found


def _innd_pid() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(INND_PID.read_text().strip())
    return None


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace a file whole, so INN or another reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _original_inn_conf() -> str:
    if INN_CONF_ORIGINAL.exists():
        return INN_CONF_ORIGINAL.read_text()
    current = (NEWS_ETC / "inn.conf").read_text()
    if "pathnews:" not in current:
        raise RuntimeError(
            "/etc/news/inn.conf is incomplete (no pathnews:), so the tests cannot derive their"
            " configuration from it; restore it with"
            " 'apt-get install --reinstall -o Dpkg::Options::=--force-confmiss inn2'"
            " after moving it away"
        )
    _write_atomic(INN_CONF_ORIGINAL, current)
    return current


def _set_keys(text: str, keys: dict[str, str]) -> str:
    """inn.conf with each key set (commented or missing keys added)."""
    for key, value in keys.items():
        line = f"{key}:{' ' * max(1, 28 - len(key))}{value}"
        # A key set twice is an error to INN: drop every line that sets it already.
        setting = re.compile(rf"^[ \t]*{re.escape(key)}:.*\n?", re.MULTILINE)
        text = setting.sub("", text)
        pattern = re.compile(rf"^#?\s*{re.escape(key)}:.*$", re.MULTILINE)
        text, count = pattern.subn(line.replace("\\", "\\\\"), text, count=1)
        if count == 0:
            text = text.rstrip("\n") + "\n" + line + "\n"
    return text


class NntpConnection:
    """A plain NNTP reader connection, enough for the tests to look at INN."""

    def __init__(self, port: int, *, reader: bool = True, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()
        if self.greeting[0] != 200 and self.greeting[0] != 201:
            raise NntpError(f"INN greeted with {self.greeting}")
        if reader:
            code, text = self.command("MODE READER")
            if code not in (200, 201):
                raise NntpError(f"MODE READER answered {code} {text}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise NntpError("INN closed the connection")
        return line.rstrip(b"\r\n")

    def reply(self) -> tuple[int, str]:
        line = self._line().decode("utf-8", "replace")
        try:
            return int(line[:3]), line[4:]
        except ValueError:
            raise NntpError(f"not an NNTP reply: {line!r}") from None

    def command(self, text: str) -> tuple[int, str]:
        self.sock.sendall(text.encode("utf-8") + b"\r\n")
        return self.reply()

    def block(self) -> list[bytes]:
        """A multi-line block, dot-unstuffed, lines without their CRLF."""
        lines: list[bytes] = []
        while True:
            line = self._line()
            if line == b".":
                return lines
            lines.append(line[1:] if line.startswith(b"..") else line)

    def post(self, article: bytes) -> tuple[int, str]:
        """POST an article given with LF or CRLF line endings; return the final reply."""
        code, text = self.command("POST")
        if code != 340:
            return code, text
        lines = article.replace(b"\r\n", b"\n").split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        payload = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
        self.sock.sendall(payload + b".\r\n")
        return self.reply()


class Inn:
    """The system's INN2 on a free port of 127.0.0.1, with the tests' configuration."""

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.log_path = self.workdir / "rc.news.log"
        self.started = False
        self._ever_started = False
        self._lock: IO[bytes] | None = None

    # --- one owner at a time -------------------------------------------------------

    def acquire(self, timeout: float = LOCK_TIMEOUT) -> None:
        """Wait until no other test run owns INN, then own it until release()."""
        if self._lock is not None:
            return
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        lock = LOCK_PATH.open("a+b")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    lock.seek(0)
                    holder = lock.read().decode(errors="replace").strip()
                    lock.close()
                    raise TimeoutError(
                        f"another test run ({holder or 'unknown'}) has owned INN for more than"
                        f" {timeout} s ({LOCK_PATH}); INN is one instance per machine"
                    ) from None
                time.sleep(0.5)
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}\n".encode())
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # --- configuration -------------------------------------------------------------

    def configure(self) -> None:
        """Rewrite the parts of /etc/news the tests depend on."""
        user = _news_user()
        keys = dict(_INN_KEYS, port=str(self.port))
        _write_atomic(NEWS_ETC / "inn.conf", _set_keys(_original_inn_conf(), keys))
        _write_atomic(NEWS_ETC / "readers.conf", _READERS_CONF)
        _write_atomic(NEWS_ETC / "incoming.conf", _INCOMING_CONF)
        _write_atomic(NEWS_ETC / "moderators", _MODERATORS)
        _write_atomic(MTA_SCRIPT, _MTA_SCRIPT_TEXT, 0o755)
        MTA_DIR.mkdir(exist_ok=True)
        os.chown(MTA_DIR, user.pw_uid, user.pw_gid)
        NEWS_RUN.mkdir(mode=0o775, exist_ok=True)
        os.chown(NEWS_RUN, user.pw_uid, user.pw_gid)
        NEWS_RUN.chmod(0o775)
        daily = NEWS_DB / ".news.daily"
        daily.touch()
        os.chown(daily, user.pw_uid, user.pw_gid)

    # --- life cycle ----------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Start innd with rc.news and wait until it listens on the port and greets with 200.

        The first start picks another port when another program took the chosen
        one; later starts (after stop) keep the port the tests already use.
        """
        for program in ("innd", "ctlinnd", "rc.news", "su"):
            require_binary(program)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.acquire()
        tries = 1 if self._ever_started else 3
        for attempt in range(1, tries + 1):
            try:
                self._start_once(timeout)
            except _PortTaken:
                self.stop()
                if attempt == tries:
                    raise
                self.port = free_port()
                continue
            except BaseException:
                with contextlib.suppress(Exception):
                    self.stop()
                raise
            break
        self._ever_started = True
        self.started = True
        return self

    def _start_once(self, timeout: float) -> None:
        self._stop_stray()
        self.configure()
        self._clear_stale_pid()
        with self.log_path.open("ab") as log:
            # rc.news leaves jobs holding its stdout: give it a file, never a pipe.
            result = subprocess.run(
                ["su", "news", "-s", "/bin/sh", "-c", str(NEWS_BIN / "rc.news")],
                env=_news_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(f"rc.news exited {result.returncode}: {self.log_text()}")
        deadline = time.monotonic() + timeout
        while True:
            pid = _innd_pid()
            # The greeting alone could come from another server that took the port.
            if pid is not None and pid_listens_on(pid, self.port) and self._greets():
                return
            if pid is not None and not _alive(pid) and port_accepts(LOOPBACK, self.port):
                raise _PortTaken(self.port)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"INN did not greet on {LOOPBACK}:{self.port} within {timeout} s;"
                    f" rc.news said: {self.log_text()}; {self._news_errors()}"
                )
            time.sleep(_POLL)

    def stop(self, timeout: float = 30.0) -> None:
        """ctlinnd shutdown, then wait until the port is closed and innd is gone (or a zombie)."""
        pid = _innd_pid()
        # innd hands reader connections (MODE READER) to nnrpd children that outlive
        # it and answer POST with 240 by spooling: a real outage ends them too.
        readers = _children(pid, "nnrpd") if pid is not None else []
        if pid is not None and _alive(pid):
            _as_news(f"{NEWS_BIN / 'ctlinnd'} -t 10 shutdown 'gateway tests'", timeout=timeout)
        for reader in readers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(reader, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_alive(r) for r in readers) and time.monotonic() < deadline:
            time.sleep(_POLL)
        for reader in readers:
            if _alive(reader):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(reader, signal.SIGKILL)
        while (pid is not None and _alive(pid)) or port_accepts(LOOPBACK, self.port, 0.2):
            if time.monotonic() >= deadline:
                if pid is not None and _alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                raise TimeoutError(f"INN did not stop within {timeout} s (innd pid {pid})")
            time.sleep(_POLL)
        self._clear_stale_pid()
        self.started = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self.release()

    def is_running(self) -> bool:
        pid = _innd_pid()
        return pid is not None and _alive(pid)

    def _stop_stray(self) -> None:
        """An innd left from an earlier run holds the old configuration: stop it first."""
        pid = _innd_pid()
        if pid is None or not _alive(pid):
            return
        _as_news(f"{NEWS_BIN / 'ctlinnd'} -t 10 shutdown 'gateway tests: restart'")
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(_POLL)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    @staticmethod
    def _clear_stale_pid() -> None:
        # rc.news trusts `kill -0`, which a zombie innd passes: it would then say
        # "INND is running" and start nothing.
        pid = _innd_pid()
        if pid is not None and not _alive(pid):
            INND_PID.unlink(missing_ok=True)

    def _greets(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                return sock.recv(512).startswith(b"200")
        except OSError:
            return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    @staticmethod
    def _news_errors() -> str:
        texts = []
        for name in ("news.err", "news.crit", "errlog"):
            with contextlib.suppress(OSError):
                texts.append(f"{name}: {(Path('/var/log/news') / name).read_text()[-2000:]}")
        return "; ".join(texts)

    # --- groups --------------------------------------------------------------------

    def ctlinnd(self, *args: str, timeout: float = 30.0) -> str:
        """Run ctlinnd as news; raise with its output when it fails."""
        command = " ".join([str(NEWS_BIN / "ctlinnd"), "-t", "10", *map(_shell_quote, args)])
        result = _as_news(command, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"ctlinnd {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def newgroup(self, name: str, *, moderated: bool = False) -> None:
        self.ctlinnd("newgroup", name, "m" if moderated else "y", "gateway-tests")

    def groups(self, pattern: str = "*") -> dict[str, str]:
        """LIST ACTIVE: group name -> status flag (y, m, n, ...)."""
        with self.connect() as conn:
            code, text = conn.command(f"LIST ACTIVE {pattern}")
            if code != 215:
                raise NntpError(f"LIST ACTIVE answered {code} {text}")
            found = {}
            for line in conn.block():
                fields = line.decode("utf-8", "replace").split()
                if len(fields) >= 4:
                    found[fields[0]] = fields[3]
            return found

    def group(self, name: str) -> tuple[int, int, int]:
        """GROUP: (estimated count, low, high)."""
        with self.connect() as conn:
            code, text = conn.command(f"GROUP {name}")
            if code != 211:
                raise NntpError(f"GROUP {name} answered {code} {text}")
            count, low, high = (int(v) for v in text.split()[:3])
            return count, low, high

    def over(self, name: str) -> list[dict[str, str]]:
        """OVER of every article in a group: number, subject, from, date, message-id, ..."""
        fields = ("number", "subject", "from", "date", "message-id", "references", "bytes")
        with self.connect() as conn:
            code, text = conn.command(f"GROUP {name}")
            if code != 211:
                raise NntpError(f"GROUP {name} answered {code} {text}")
            if text.split()[0] == "0":
                return []
            code, text = conn.command("OVER 1-")
            if code == 423:
                return []
            if code != 224:
                raise NntpError(f"OVER answered {code} {text}")
            rows = []
            for line in conn.block():
                values = line.decode("utf-8", "replace").split("\t")
                rows.append(dict(zip(fields, values, strict=False)))
            return rows

    # --- articles ------------------------------------------------------------------

    def connect(self, *, reader: bool = True) -> NntpConnection:
        return NntpConnection(self.port, reader=reader)

    def post(self, article: bytes) -> tuple[int, str]:
        """MODE READER, POST; the final reply (240 on success)."""
        with self.connect() as conn:
            return conn.post(article)

    def stat(self, message_id: str) -> int:
        with self.connect() as conn:
            return conn.command(f"STAT {message_id}")[0]

    def article(self, message_id: str) -> bytes | None:
        """The article as INN serves it (LF line endings, dot-unstuffed), or None."""
        with self.connect() as conn:
            code, text = conn.command(f"ARTICLE {message_id}")
            if code == 430:
                return None
            if code != 220:
                raise NntpError(f"ARTICLE {message_id} answered {code} {text}")
            return b"".join(line + b"\n" for line in conn.block())

    def wait_for_article(self, message_id: str, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            found = self.article(message_id)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"INN has no article {message_id} after {timeout} s")
            time.sleep(0.1)

    # --- what INN mailed -----------------------------------------------------------

    def mta_captures(self) -> list[MtaCapture]:
        found = []
        for path in sorted(MTA_DIR.glob("*.eml")):
            args_path = path.with_suffix(".args")
            args = args_path.read_text().strip() if args_path.exists() else ""
            found.append(MtaCapture(args, path.read_bytes(), path))
        return found

    def wait_for_mta(self, contains: bytes, timeout: float = 30.0) -> MtaCapture:
        deadline = time.monotonic() + timeout
        while True:
            for capture in self.mta_captures():
                if contains in capture.message:
                    return capture
            if time.monotonic() >= deadline:
                raise TimeoutError(f"INN mailed nothing containing {contains!r} in {timeout} s")
            time.sleep(0.1)

    def clear_mta(self) -> None:
        if MTA_DIR.is_dir():
            for path in MTA_DIR.iterdir():
                path.unlink(missing_ok=True)


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def fresh_message_id(tag: str = "t") -> str:
    """A Message-ID INN has never seen (its history survives restarts)."""
    return f"<{tag}.{time.time_ns()}.{os.getpid()}.{os.urandom(4).hex()}@gateway-tests.invalid>"


def article_bytes(
    message_id: str,
    newsgroups: str,
    *,
    subject: str = "test",
    body: bytes = b"body\n",
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A minimal valid article with the current Date."""
    from email.utils import formatdate

    headers = [
        ("From", "Tester <tester@client.test>"),
        ("Newsgroups", newsgroups),
        ("Subject", subject),
        ("Message-ID", message_id),
        ("Date", formatdate(usegmt=True)),
        *extra,
    ]
    return "".join(f"{k}: {v}\n" for k, v in headers).encode() + b"\n" + body


def header_values(article: bytes, name: str) -> list[str]:
    """The unfolded values of header field `name` in an article (LF line endings)."""
    head = article.split(b"\n\n", 1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\n[ \t]", " ", head)
    wanted = name.lower() + ":"
    return [
        line.split(":", 1)[1].strip()
        for line in unfolded.split("\n")
        if line.lower().startswith(wanted)
    ]
