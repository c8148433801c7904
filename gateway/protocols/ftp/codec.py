"""FTP server conversation without I/O (RFC 959, RFC 2428, RFC 3659, RFC 4217, RFC 2640).

``ServerCodec`` takes the bytes of the control connection and gives events:
``SendReply`` for what it answers by itself (SYST, FEAT, TYPE, PWD, AUTH TLS
and the like) and a request for everything a handler decides (a login, a
passive port, a transfer, a look at a file).  It keeps the session state the
replies depend on: the user once logged in, the current folder, TLS and the
protection of data connections, TYPE and a pending REST.

Paths are virtual: ``/`` is the top of what the listener's routes serve, and
no ``..`` climbs above it.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Active",
    "FileRequest",
    "Login",
    "Passive",
    "Reply",
    "SendReply",
    "ServerCodec",
    "ascii_to_local",
    "list_line",
    "local_to_ascii",
    "mlst_facts",
    "parse_eprt",
    "parse_port",
    "resolve",
    "timestamp",
]

MAX_LINE = 4096  # longer command lines are refused (paths are far shorter)


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply: the text may have several lines (sent as a multi-line reply)."""

    code: int
    text: str

    def to_bytes(self) -> bytes:
        lines = self.text.split("\n")
        if len(lines) == 1:
            return f"{self.code} {lines[0]}\r\n".encode("utf-8", "replace")
        # RFC 959 4.2: "code-" first, "code " last; a line between that starts with
        # digits would look like the end, so it is indented (FEAT's lines are already).
        middle = [" " + line if line[:3].isdigit() else line for line in lines[1:-1]]
        out = [f"{self.code}-{lines[0]}", *middle, f"{self.code} {lines[-1]}"]
        return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class SendReply:
    reply: Reply
    close: bool = False
    start_tls: bool = False

    def to_bytes(self) -> bytes:
        return self.reply.to_bytes()


@dataclass(frozen=True, slots=True)
class Login:
    """USER and PASS were given: 230 logs the user in, anything else does not."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Passive:
    """PASV (``extended`` False) or EPSV: open a port and say where."""

    extended: bool


@dataclass(frozen=True, slots=True)
class Active:
    """PORT or EPRT: the client listens at ``host``:``port`` for the data connection."""

    host: str
    port: int


FileVerb = Literal[
    "STOR", "APPE", "STOU", "RETR", "LIST", "NLST", "MLSD", "MLST", "SIZE", "MDTM", "CWD"
]


@dataclass(frozen=True, slots=True)
class FileRequest:
    """A command about a file or a folder; ``path`` is absolute and virtual (``/a/b``).

    ``offset`` is the REST given before it (0 without); ``ascii`` that TYPE A is
    in force; ``given`` whether the client named a path (LIST and STOU need not).
    """

    verb: FileVerb
    path: str
    offset: int = 0
    ascii: bool = False
    given: bool = True


Request = Login | Passive | Active | FileRequest

_FILE_VERBS: dict[str, FileVerb] = {
    "STOR": "STOR", "APPE": "APPE", "STOU": "STOU", "RETR": "RETR",
    "LIST": "LIST", "NLST": "NLST", "MLSD": "MLSD", "MLST": "MLST",
    "SIZE": "SIZE", "MDTM": "MDTM",
    "CWD": "CWD", "XCWD": "CWD", "CDUP": "CWD", "XCUP": "CWD",
}  # fmt: skip
# Commands that answer without a path.
_NO_PATH_OK = {"LIST", "NLST", "MLSD", "MLST", "STOU", "CDUP", "XCUP"}
_BEFORE_LOGIN = {
    "USER", "PASS", "AUTH", "PBSZ", "PROT", "FEAT", "SYST", "NOOP", "QUIT", "HELP", "OPTS",
}  # fmt: skip
_CHANGES = {"DELE", "RMD", "XRMD", "MKD", "XMKD", "RNFR", "RNTO", "SITE", "SMNT", "REIN"}
_FEATURES = (
    "EPRT",
    "EPSV",
    "MDTM",
    "MLST type*;size*;modify*;",
    "PASV",
    "REST STREAM",
    "SIZE",
    "TVFS",
    "UTF8",
)
_TELNET = re.compile(rb"\xff[\xf0-\xfe]")


def resolve(cwd: str, given: str) -> str:
    """``given`` (absolute, or relative to ``cwd``) as a clean absolute virtual path."""
    path = posixpath.normpath(posixpath.join(cwd, given.replace("\\", "/")))
    # normpath keeps a leading "//" and lets ".." stop at the top: both mean "/".
    parts = [p for p in path.split("/") if p not in ("", ".", "..")]
    return "/" + "/".join(parts)


def parse_port(arg: str) -> tuple[str, int]:
    """``h1,h2,h3,h4,p1,p2`` (PORT); ValueError if it is not that."""
    fields = arg.strip().split(",")
    if len(fields) != 6 or not all(f.strip().isdigit() for f in fields):
        raise ValueError("expected h1,h2,h3,h4,p1,p2")
    numbers = [int(f) for f in fields]
    if any(n > 255 for n in numbers):
        raise ValueError("each number is 0 to 255")
    return ".".join(map(str, numbers[:4])), numbers[4] * 256 + numbers[5]


def parse_eprt(arg: str) -> tuple[str, int]:
    """``|1|132.235.1.2|6275|`` or ``|2|::1|6275|`` (EPRT, RFC 2428); ValueError if not."""
    arg = arg.strip()
    if len(arg) < 7 or arg[0] != arg[-1]:
        raise ValueError("expected <d>proto<d>address<d>port<d>, such as |1|127.0.0.1|6275|")
    parts = arg[1:-1].split(arg[0])
    if len(parts) != 3 or parts[0] not in ("1", "2") or not parts[2].isdigit():
        raise ValueError("expected |1|IPv4 address|port| or |2|IPv6 address|port|")
    try:
        address = ipaddress.ip_address(parts[1])
    except ValueError:
        raise ValueError(f"'{parts[1]}' is not an IP address") from None
    if address.version != (4 if parts[0] == "1" else 6):
        raise ValueError("the protocol number does not match the address")
    port = int(parts[2])
    if not 0 < port < 65536:
        raise ValueError("the port is 1 to 65535")
    return str(address), port


def ascii_to_local(data: bytes, pending_cr: bool) -> tuple[bytes, bool]:
    """TYPE A upload: CRLF to LF. Returns the converted bytes and whether a CR ends them
    (kept back until the next block says whether LF follows)."""
    if pending_cr:
        data = b"\r" + data
    held = data.endswith(b"\r")
    if held:
        data = data[:-1]
    return data.replace(b"\r\n", b"\n"), held


def local_to_ascii(data: bytes, last_cr: bool) -> tuple[bytes, bool]:
    """TYPE A download: LF to CRLF (a CRLF in the file stays one). Returns the converted
    bytes and whether they end in CR."""
    if not data:
        return data, last_cr
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data.startswith(b"\n") and last_cr:
        out = out[1:]  # the CR before this LF was sent at the end of the last block
    return out, data.endswith(b"\r")


def timestamp(seconds: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(seconds))


def mlst_facts(name: str, size: int | None, modified: float | None, folder: bool) -> str:
    """One MLSD line / MLST entry (RFC 3659 7): ``type=file;size=5;modify=...; name``."""
    facts = [f"type={'dir' if folder else 'file'}"]
    if size is not None and not folder:
        facts.append(f"size={size}")
    if modified is not None:
        facts.append(f"modify={timestamp(modified)}")
    return ";".join(facts) + "; " + name


def list_line(name: str, size: int | None, modified: float | None, folder: bool, now: float) -> str:
    """One LIST line in the form of ``ls -l``, which clients parse."""
    mode = "drwxr-xr-x" if folder else "-rw-r--r--"
    when = time.gmtime(modified if modified is not None else now)
    if modified is not None and abs(now - modified) > 180 * 86400:
        stamp = time.strftime("%b %d  %Y", when)
    else:
        stamp = time.strftime("%b %d %H:%M", when)
    return f"{mode} 1 ftp ftp {size or 0:>12} {stamp} {name}"


def _quote(path: str) -> str:
    return '"' + path.replace('"', '""') + '"'


class ServerCodec:
    """One control connection's conversation (see the module)."""

    def __init__(
        self,
        *,
        tls_available: bool,
        login_needs_tls: bool = False,
        data_needs_tls: bool = False,
        active: bool = True,
    ) -> None:
        self.tls_available = tls_available
        self.login_needs_tls = login_needs_tls  # set by the shell for the client's address
        self.data_needs_tls = data_needs_tls
        self.active = active
        self.tls = False
        self.discarded_after_starttls = 0
        self.user = ""  # logged in as
        self.cwd = "/"
        self.ascii = False
        self.protected = False  # PROT P: data connections speak TLS
        self._pbsz = False
        self._given_user: str | None = None
        self._offset = 0  # REST
        self._epsv_all = False
        self._buffer = bytearray()
        self._skipping = False  # inside a line too long, thrown away up to its end
        self._events: deque[SendReply | Request] = deque()
        self.pending: Request | None = None
        self._closed = False

    # --- what the shell asks ---

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def transferring(self) -> bool:
        # Transfers run on data connections: the shell's handler times them.
        return False

    @property
    def busy(self) -> bool:
        return self.pending is not None

    def greeting(self) -> Reply:
        return Reply(220, "Gateway FTP service ready")

    def timeout(self) -> Reply:
        return Reply(421, "Timeout: closing the control connection")

    def abort(self) -> Reply:
        return Reply(421, "Internal error: closing the control connection")

    def close(self) -> None:
        self._closed = True
        self._buffer.clear()
        self._events.clear()
        self.pending = None

    def receive_data(self, data: bytes) -> None:
        if self._closed:
            return
        self._buffer += data

    def next_event(self) -> SendReply | Request | None:
        if self.pending is not None or self._closed:
            return None
        while not self._events:
            line = self._line()
            if line is None:
                break
            self._command(line)
        if not self._events:
            return None
        event = self._events.popleft()
        if not isinstance(event, SendReply):
            self.pending = event
        return event

    def answer(self, reply: Reply) -> SendReply:
        """The handler's reply to the pending request (the codec notes what it changes)."""
        request, self.pending = self.pending, None
        if isinstance(request, Login):
            if reply.code == 230:
                self.user = request.user
            self._given_user = None
        elif isinstance(request, FileRequest) and request.verb == "CWD" and reply.code == 250:
            self.cwd = request.path
        return SendReply(reply, close=reply.code == 421)

    # --- reading ---

    def _line(self) -> str | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_LINE:
                # Refused now; the rest of it, up to its end, is thrown away as it comes.
                self._buffer.clear()
                if not self._skipping:
                    self._skipping = True
                    self._say(500, "Command line too long")
            return None
        raw = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if self._skipping:
            self._skipping = False
            return self._line()
        if len(raw) > MAX_LINE:
            return "\x00too long"
        raw = _TELNET.sub(b"", raw.rstrip(b"\r")).replace(b"\xff\xff", b"\xff")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "\x00not utf-8"

    def _say(self, code: int, text: str, **flags: bool) -> None:
        self._events.append(SendReply(Reply(code, text), **flags))

    # --- commands ---

    def _command(self, line: str) -> None:
        if line == "\x00too long":
            self._say(500, "Command line too long")
            return
        if line == "\x00not utf-8":
            self._say(501, "Commands and names are UTF-8 (RFC 2640)")
            return
        verb, _, arg = line.lstrip().partition(" ")
        verb = verb.upper()
        if not verb:
            self._say(500, "Empty command")
            return
        if not self.user and verb not in _BEFORE_LOGIN:
            self._say(530, "Please log in with USER and PASS")
            return
        handler = getattr(self, f"_cmd_{verb}", None)
        if handler is not None:
            handler(arg)
        elif verb in _FILE_VERBS:
            self._file(verb, arg)
        elif verb in _CHANGES:
            self._say(550, "Not allowed: files here are stored and passed on, not changed")
        else:
            self._say(502, f"Command '{verb[:20]}' not implemented")

    def _cmd_USER(self, arg: str) -> None:
        if self.user:
            self._say(503, "Already logged in")
        elif not arg:
            self._say(501, "USER needs a name")
        elif self.login_needs_tls and not self.tls:
            text = "Log in over TLS: send AUTH TLS first"
            if not self.tls_available:
                text = "Logins from your address need TLS, which this server does not offer"
            self._say(530, text)
        else:
            self._given_user = arg
            self._say(331, f"Password required for {arg}")

    def _cmd_PASS(self, arg: str) -> None:
        if self.user:
            self._say(503, "Already logged in")
        elif self._given_user is None:
            self._say(503, "Send USER first")
        else:
            self._events.append(Login(self._given_user, arg))

    def _cmd_AUTH(self, arg: str) -> None:
        mechanism = arg.strip().upper()
        if mechanism not in ("TLS", "TLS-C", "SSL"):
            self._say(504, f"AUTH {mechanism[:20]} is not supported; AUTH TLS is")
        elif not self.tls_available:
            self._say(502, "TLS is not available on this server")
        elif self.tls:
            self._say(503, "TLS is on already")
        elif self.user or self._given_user is not None:
            self._say(503, "AUTH TLS comes before USER")
        else:
            # Anything sent behind AUTH was sent in the clear: it is not taken as sent in TLS.
            self.discarded_after_starttls = len(self._buffer)
            self._buffer.clear()
            self.tls = True
            self._say(234, "Proceed with TLS negotiation", start_tls=True)

    def _cmd_PBSZ(self, arg: str) -> None:
        if not self.tls:
            self._say(503, "PBSZ needs AUTH TLS first")
        elif not arg.strip().isdigit():
            self._say(501, "PBSZ needs a number")
        else:
            self._pbsz = True
            self._say(200, "PBSZ=0")

    def _cmd_PROT(self, arg: str) -> None:
        level = arg.strip().upper()
        if not self.tls:
            self._say(503, "PROT needs AUTH TLS first")
        elif not self._pbsz:
            self._say(503, "PROT needs PBSZ first")
        elif level == "P":
            self.protected = True
            self._say(200, "Data connections are protected (TLS)")
        elif level == "C":
            if self.data_needs_tls:
                self._say(534, "Data connections must be protected here: PROT P")
            else:
                self.protected = False
                self._say(200, "Data connections are in the clear")
        elif level in ("S", "E"):
            self._say(536, f"PROT {level} is not supported; P or C")
        else:
            self._say(504, "PROT takes C or P")

    def _cmd_FEAT(self, arg: str) -> None:
        features = list(_FEATURES)
        if self.tls_available:
            features = ["AUTH TLS", "PBSZ", "PROT", *features]
        self._say(211, "\n".join(["Features:", *(" " + f for f in features), "End"]))

    def _cmd_SYST(self, arg: str) -> None:
        self._say(215, "UNIX Type: L8")

    def _cmd_NOOP(self, arg: str) -> None:
        self._say(200, "NOOP ok")

    def _cmd_HELP(self, arg: str) -> None:
        self._say(214, "See RFC 959; FEAT lists the extensions")

    def _cmd_QUIT(self, arg: str) -> None:
        self._say(221, "Goodbye", close=True)

    def _cmd_OPTS(self, arg: str) -> None:
        option = arg.strip().partition(" ")[0].upper()
        if option == "UTF8":
            self._say(200, "UTF-8 is always on")
        elif option == "MLST":
            self._say(200, "MLST OPTS type;size;modify;")
        else:
            self._say(501, f"Option '{option[:20]}' not understood")

    def _cmd_TYPE(self, arg: str) -> None:
        words = arg.upper().split()
        if words in (["I"], ["L", "8"]):
            self.ascii = False
            self._say(200, "Type set to I")
        elif words and words[0] == "A" and words[1:] in ([], ["N"]):
            self.ascii = True
            self._say(200, "Type set to A")
        else:
            self._say(504, "TYPE takes A or I")

    def _cmd_MODE(self, arg: str) -> None:
        if arg.strip().upper() == "S":
            self._say(200, "Mode set to S")
        else:
            self._say(504, "Only MODE S (stream)")

    def _cmd_STRU(self, arg: str) -> None:
        if arg.strip().upper() == "F":
            self._say(200, "Structure set to F")
        else:
            self._say(504, "Only STRU F (file)")

    def _cmd_PWD(self, arg: str) -> None:
        self._say(257, f"{_quote(self.cwd)} is the current folder")

    _cmd_XPWD = _cmd_PWD

    def _cmd_REST(self, arg: str) -> None:
        if not arg.strip().isdigit():
            self._say(501, "REST needs a byte offset")
            return
        self._offset = int(arg.strip())
        self._say(350, f"Restarting at {self._offset}; send RETR")

    def _cmd_ABOR(self, arg: str) -> None:
        self._say(225, "No transfer to abort")

    def _cmd_ALLO(self, arg: str) -> None:
        self._say(202, "No storage allocation needed")

    def _cmd_ACCT(self, arg: str) -> None:
        self._say(202, "No account needed")

    def _cmd_STAT(self, arg: str) -> None:
        if arg.strip():
            self._say(502, "STAT with a path is not implemented; use LIST")
            return
        protection = "protected" if self.protected else "in the clear"
        self._say(
            211,
            f"Gateway FTP status\nLogged in as {self.user}\nType "
            f"{'A' if self.ascii else 'I'}, data connections {protection}\nEnd of status",
        )

    def _cmd_PASV(self, arg: str) -> None:
        self._passive(extended=False)

    def _cmd_EPSV(self, arg: str) -> None:
        word = arg.strip().upper()
        if word == "ALL":
            self._epsv_all = True
            self._say(200, "EPSV ALL: only EPSV from now on")
        elif word in ("", "1", "2"):
            self._passive(extended=True)
        else:
            self._say(522, "Network protocol not supported, use (1,2)")

    def _passive(self, extended: bool) -> None:
        if self._epsv_all and not extended:
            self._say(503, "EPSV ALL was sent: only EPSV now")
        else:
            self._events.append(Passive(extended))

    def _cmd_PORT(self, arg: str) -> None:
        self._active(parse_port, arg)

    def _cmd_EPRT(self, arg: str) -> None:
        self._active(parse_eprt, arg)

    def _active(self, parse: Callable[[str], tuple[str, int]], arg: str) -> None:
        if self._epsv_all:
            self._say(503, "EPSV ALL was sent: only EPSV now")
            return
        if not self.active:
            self._say(502, "Active mode is off here: use PASV or EPSV")
            return
        try:
            host, port = parse(arg)
        except ValueError as exc:
            code = 522 if "protocol" in str(exc) else 501
            self._say(code, f"Bad address: {exc}")
            return
        self._events.append(Active(host, port))

    def _file(self, verb: str, arg: str) -> None:
        given = arg.strip()
        if verb in ("LIST", "NLST") and given.startswith("-"):
            given = ""  # ls options (-la): the listing is the same with or without
        if not given and verb not in _NO_PATH_OK:
            self._say(501, f"{verb} needs a path")
            return
        if verb in ("CDUP", "XCUP"):
            given = ".."
        path = resolve(self.cwd, given) if given else self.cwd
        offset, self._offset = self._offset, 0
        self._events.append(
            FileRequest(
                _FILE_VERBS[verb],
                path,
                offset=offset,
                ascii=self.ascii,
                given=bool(given),
            )
        )
