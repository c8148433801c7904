"""Sans-io SMTP: replies, command and address parsing, dot-stuffing and the server state machine.

Nothing here does I/O or imports Twisted; ``server.py`` and ``client.py`` move bytes for it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.protocols._sink import DataSink, MemorySink

__all__ = [
    "AddressSyntaxError",
    "AuthRequest",
    "Command",
    "MailRequest",
    "MessageReceived",
    "ParameterSyntaxError",
    "RcptRequest",
    "Reply",
    "ReplyParser",
    "SendReply",
    "ServerCodec",
    "ServerEvent",
    "SmtpSyntaxError",
    "encode_message",
    "is_valid_address",
    "message_size",
    "parse_command",
    "parse_ehlo_extensions",
    "parse_mail_argument",
    "parse_rcpt_argument",
]


class SmtpSyntaxError(ValueError):
    """Input that does not follow the SMTP grammar."""


class AddressSyntaxError(SmtpSyntaxError):
    """A reverse-path or forward-path that is not a valid address."""


class ParameterSyntaxError(SmtpSyntaxError):
    """A MAIL or RCPT argument whose keyword or ESMTP parameters are malformed."""


# --------------------------------------------------------------------------- replies

_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")
_REPLY_LINE = re.compile(r"([1-5][0-9][0-9])([ -]|$)")
_DIGITS = re.compile(r"[0-9]{1,20}\Z")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a code, an RFC 3463 enhanced status ("" for none) and its text lines."""

    code: int
    status: str
    text: str

    def to_bytes(self) -> bytes:
        text = self.text
        if self.code == 334 and "\n" not in text and "\r" not in text:
            # An AUTH challenge: "334" SP [base64], the space even when it is empty.
            return f"334 {text}\r\n".encode("ascii", "replace")
        if "\n" not in text and "\r" not in text:
            # One line, the common case.
            if self.status and text:
                line = f"{self.code:03d} {self.status} {text}"
            else:
                line = f"{self.code:03d} {self.status or text}"
            return (line.rstrip(" ") + "\r\n").encode("ascii", "replace")
        lines = text.split("\n") if text else [""]
        out = []
        for index, line in enumerate(lines):
            line = line.replace("\r", "")
            separator = " " if index == len(lines) - 1 else "-"
            parts = " ".join(part for part in (self.status, line) if part)
            out.append(f"{self.code:03d}{separator}{parts}".rstrip(" ") + "\r\n")
        # Replies are 7-bit: a handler's non-ASCII text must not put 8-bit bytes on the wire.
        return "".join(out).encode("ascii", "replace")

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300


class ReplyParser:
    """Splits the server's byte stream into complete (possibly multi-line) replies."""

    def __init__(self, max_line_length: int = 65536) -> None:
        self._buffer = bytearray()
        self._lines: list[tuple[int, str]] = []
        self._max_line_length = max_line_length

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished reply are buffered."""
        return bool(self._buffer) or bool(self._lines)

    def receive_data(self, data: bytes) -> list[Reply]:
        """Add bytes; return the replies they complete. Raises SmtpSyntaxError on a bad line."""
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end == -1:
                if len(self._buffer) > self._max_line_length:
                    raise SmtpSyntaxError(
                        f"a reply line is longer than {self._max_line_length} octets"
                    )
                return replies
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            reply = self._line(raw.decode("utf-8", "replace"))
            if reply is not None:
                replies.append(reply)

    def _line(self, line: str) -> Reply | None:
        match = _REPLY_LINE.match(line)
        if match is None:
            raise SmtpSyntaxError(f"{line[:80]!r} is not an SMTP reply line")
        if self._lines and int(match.group(1)) != self._lines[0][0]:
            # RFC 5321 4.2.1: every line of a reply has the same code; which one counts is unknown.
            raise SmtpSyntaxError(
                f"a reply changes its code from {self._lines[0][0]} to {match.group(1)}"
            )
        self._lines.append((int(match.group(1)), line[4:]))
        if match.group(2) == "-":
            return None
        lines, self._lines = self._lines, []
        code = lines[0][0]
        status = ""
        match = _ENHANCED.match(lines[0][1])
        if match and match.group(1) == str(code)[0]:
            status = match.group(0).strip()
        texts = []
        for _, text in lines:
            if status and text.startswith(status):
                text = text[len(status) :].lstrip(" ")
            texts.append(text)
        return Reply(code, status, "\n".join(texts))


def parse_ehlo_extensions(reply: Reply) -> dict[str, str]:
    """Map each extension keyword of an EHLO reply (upper case) to its parameters."""
    extensions: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Command:
    """A command line split into its verb (upper case) and the rest of the line."""

    verb: str
    argument: str


def parse_command(line: bytes) -> Command:
    """Split a command line (without its line ending); non-ASCII bytes never raise here."""
    # latin-1 maps every byte to one character, so 8-bit input reaches the grammar checks
    # below as characters they reject instead of as a decoding exception.
    text = line.decode("latin-1").replace("\t", " ").strip(" ")
    verb, _, argument = text.partition(" ")
    return Command(verb.upper() if verb.isascii() else verb, argument.strip(" "))


# --------------------------------------------------------------------------- addresses

_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?\Z")
_GENERAL_TAG = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_MAX_DOMAIN = 255
_MAX_LABEL = 63


def _utf8_char(char: str, utf8: bool) -> bool:
    return utf8 and ord(char) > 127


def _check_domain(domain: str, utf8: bool) -> None:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal[:5].upper() == "IPV6:":
            try:
                if "%" in literal:  # a zone index: Python accepts it, RFC 5321 4.1.3 does not
                    raise ValueError(literal)
                ipaddress.IPv6Address(literal[5:])
            except ValueError:
                message = f"{domain!r} is not a valid IPv6 address literal"
                raise AddressSyntaxError(message) from None
            return
        tag, colon, content = literal.partition(":")
        if colon:
            if (
                not _GENERAL_TAG.match(tag)
                or not content
                or any(not (33 <= ord(c) <= 90 or 94 <= ord(c) <= 126) for c in content)
            ):
                raise AddressSyntaxError(f"{domain!r} is not a valid address literal")
            return
        try:
            ipaddress.IPv4Address(literal)
        except ValueError:
            raise AddressSyntaxError(f"{domain!r} is not a valid IPv4 address literal") from None
        return
    if not domain:
        raise AddressSyntaxError("the domain is empty")
    # RFC 5321 4.5.3.1.2 and RFC 1035 2.3.4: no DNS name is longer, so no route can use it.
    if len(domain.encode("utf-8", "surrogateescape")) > _MAX_DOMAIN:
        raise AddressSyntaxError(f"the domain is longer than {_MAX_DOMAIN} octets")
    for label in domain.split("."):
        if len(label.encode("utf-8", "surrogateescape")) > _MAX_LABEL:
            raise AddressSyntaxError(f"a label of {domain!r} is longer than {_MAX_LABEL} octets")
        if _LABEL.match(label):
            continue
        if utf8 and label and all(c.isalnum() or c in "-_" or ord(c) > 127 for c in label):
            continue
        raise AddressSyntaxError(f"{domain!r} is not a valid domain")


def _check_local_part(local: str, utf8: bool) -> None:
    if not local:
        raise AddressSyntaxError("the local part is empty")
    if local.startswith('"'):
        index = 1
        while index < len(local):
            char = local[index]
            if char == "\\":
                if index + 1 >= len(local) or not (
                    32 <= ord(local[index + 1]) <= 126 or _utf8_char(local[index + 1], utf8)
                ):
                    raise AddressSyntaxError(f"{local!r} has a bad quoted pair")
                index += 2
                continue
            if char == '"':
                if index != len(local) - 1:
                    raise AddressSyntaxError(f"{local!r} has text after its closing quote")
                return
            if not (32 <= ord(char) <= 126 or _utf8_char(char, utf8)):
                raise AddressSyntaxError(f"{local!r} has a character not allowed in quotes")
            index += 1
        raise AddressSyntaxError(f"{local!r} has no closing quote")
    # Dots are not checked for position: Postfix accepts "a..b" and "a." and real mail has them.
    for char in local:
        if char != "." and char not in _ATEXT and not _utf8_char(char, utf8):
            raise AddressSyntaxError(f"{local!r} has a character not allowed in an address")


def _split_mailbox(mailbox: str) -> tuple[str, str]:
    """Split at the last "@" outside a quoted local part."""
    in_quotes = False
    escaped = False
    at = -1
    for index, char in enumerate(mailbox):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == "@" and not in_quotes:
            at = index
    if at == -1:
        raise AddressSyntaxError(f"{mailbox!r} has no domain")
    return mailbox[:at], mailbox[at + 1 :]


def _strip_source_route(path: str, utf8: bool) -> str:
    """Drop an RFC 5321 A-d-l ("@a,@b:"), which servers must accept and ignore."""
    if not path.startswith("@"):
        return path
    route, colon, mailbox = path.partition(":")
    if not colon:
        raise AddressSyntaxError(f"{path!r} has a source route without a colon")
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise AddressSyntaxError(f"{path!r} has a malformed source route")
        _check_domain(hop[1:], utf8)
    return mailbox


def _check_mailbox(mailbox: str, utf8: bool) -> str:
    local, domain = _split_mailbox(mailbox)
    _check_local_part(local, utf8)
    _check_domain(domain, utf8)
    return mailbox


def is_valid_address(address: str, *, utf8: bool = False) -> bool:
    """True for a mailbox ("local@domain") that can be written into MAIL or RCPT."""
    try:
        _check_mailbox(address, utf8)
    except AddressSyntaxError:
        return False
    return True


def _split_path(text: str) -> tuple[str, str]:
    """Split "<path> params" (or a bare "path params") into the path and the parameters."""
    if not text.startswith("<"):
        # Postfix (strict_rfc821_envelopes=no) accepts a path without angle brackets.
        path, _, rest = text.partition(" ")
        if not path:
            raise AddressSyntaxError("the path is missing")
        return path, rest
    in_quotes = False
    escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            rest = text[index + 1 :]
            if rest and not rest.startswith(" "):
                raise AddressSyntaxError("text follows the closing angle bracket")
            return text[1:index], rest
        elif char == "<" and not in_quotes:
            raise AddressSyntaxError("the path has a second opening angle bracket")
    raise AddressSyntaxError("the path has no closing angle bracket")


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in filter(None, text.split(" ")):
        keyword, equals, value = item.partition("=")
        if not _KEYWORD.match(keyword):
            raise ParameterSyntaxError(f"{item!r} is not a valid ESMTP parameter")
        if equals and (not value or any(not 33 <= ord(c) <= 126 or c == "=" for c in value)):
            raise ParameterSyntaxError(f"{item!r} has an invalid value")
        key = keyword.upper()
        if key in params:
            raise ParameterSyntaxError(f"the parameter {key} is given twice")
        params[key] = value if equals else None
    return params


def _parse_path_argument(argument: str, keyword: str) -> tuple[str, str]:
    if argument[: len(keyword)].upper() != keyword:
        raise ParameterSyntaxError(f"the argument does not start with {keyword}")
    return _split_path(argument[len(keyword) :].lstrip(" "))


def parse_mail_argument(argument: str, *, utf8: bool = False) -> tuple[str, dict[str, str | None]]:
    """Parse "FROM:<path> [params]" into the sender ("" for <>) and upper-cased parameters.

    Raises ParameterSyntaxError when "FROM:" or a parameter is malformed and
    AddressSyntaxError when the path is.
    """
    path, rest = _parse_path_argument(argument, "FROM:")
    if path:
        path = _check_mailbox(_strip_source_route(path, utf8), utf8)
    return path, _parse_params(rest)


def parse_rcpt_argument(argument: str, *, utf8: bool = False) -> tuple[str, dict[str, str | None]]:
    """Parse "TO:<path> [params]" into the recipient and upper-cased parameters.

    "<postmaster>" without a domain is returned as "postmaster" (RFC 5321 section 4.5.1).
    """
    path, rest = _parse_path_argument(argument, "TO:")
    if path.lower() == "postmaster":
        return "postmaster", _parse_params(rest)
    if not path:
        raise AddressSyntaxError("the recipient is empty")
    return _check_mailbox(_strip_source_route(path, utf8), utf8), _parse_params(rest)


# --------------------------------------------------------------------------- message content


def message_size(data: bytes) -> int:
    """Size in octets as RFC 1870 counts it: CRLF line endings, no dot-stuffing, no final dot."""
    size = len(data) + data.count(b"\n")
    if data and not data.endswith(b"\n"):
        size += 2
    return size


def encode_message(data: bytes) -> bytes:
    """Turn an LF-terminated message into DATA content: CRLF, dot-stuffed, ending in CRLF.CRLF."""
    if not data:
        return b".\r\n"
    body = data[:-1] if data.endswith(b"\n") else data
    # Line by line, without a loop over the lines: every line that starts with a dot
    # gets another one, every LF becomes CRLF.
    stuffed = body.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed.replace(b"\n", b"\r\n") + b"\r\n.\r\n"


# --------------------------------------------------------------------------- server


@dataclass(frozen=True, slots=True)
class SendReply:
    """Write this reply; close the connection after it when ``close`` is set, or start
    TLS after it when ``start_tls`` is (the answer to STARTTLS)."""

    reply: Reply
    close: bool = False
    start_tls: bool = False


@dataclass(frozen=True, slots=True)
class MailRequest:
    """A syntactically valid MAIL; answer with ServerCodec.answer()."""

    sender: str
    params: Mapping[str, str | None]


@dataclass(frozen=True, slots=True)
class RcptRequest:
    """A syntactically valid RCPT within a transaction; answer with ServerCodec.answer()."""

    sender: str
    recipient: str
    params: Mapping[str, str | None]


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A complete message within the size limit; answer with ServerCodec.answer()."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """Credentials given with AUTH (RFC 4954); answer 235 (accepted) or 535 with answer()."""

    user: str
    password: str = field(repr=False)
    mechanism: str


Request = MailRequest | RcptRequest | MessageReceived | AuthRequest
ServerEvent = SendReply | MailRequest | RcptRequest | MessageReceived | AuthRequest


class _State(enum.Enum):
    COMMAND = "command"  # reading command lines
    DATA = "data"  # reading message content after 354
    WAITING = "waiting"  # a request is out; input stays buffered until it is answered
    CLOSED = "closed"  # a closing reply was produced; input is ignored


_OK = Reply(250, "2.0.0", "Ok")
_SENDER_OK = Reply(250, "2.1.0", "Ok")
_RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
_START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
_BYE = Reply(221, "2.0.0", "Bye")
_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
_LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
_UNKNOWN = Reply(500, "5.5.2", "Error: command not recognized")
_BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
_NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
_BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
_REFUSED = Reply(503, "5.5.1", "Error: this connection was refused; only QUIT is taken")
_HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
_HELP_TLS = Reply(
    214, "2.0.0", "Commands: EHLO HELO STARTTLS MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"
)
_READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
_TLS_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
_TLS_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
_TLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
_AUTH_FIRST = Reply(530, "5.7.0", "Authentication required")
_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
_AUTH_ABORTED = Reply(501, "5.0.0", "Authentication aborted")
_AUTH_UNDECODABLE = Reply(501, "5.5.2", "Cannot decode the response")
_AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
_AUTH_TWICE = Reply(503, "5.5.1", "Error: already authenticated")
_AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
_AUTH_NEEDS_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
_AUTH_MECHANISM = Reply(504, "5.5.4", "Unsupported authentication mechanism")
_MECHANISMS = ("PLAIN", "LOGIN")
# RFC 4954 4: an AUTH line, or a response to a challenge, may be this long.
_AUTH_LINE = 12288

# Commands defined by RFCs that this server knowingly does not offer: 502, not 500.
_UNIMPLEMENTED = frozenset({"BDAT", "ETRN", "EXPN", "SAML", "SEND", "SOML", "TURN", "ATRN"})


def _syntax(usage: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {usage}")


class ServerCodec:
    """The server side of one SMTP connection as a state machine without I/O.

    Feed bytes with receive_data(); call next_event() until it returns None. A
    SendReply is written as is; a MailRequest, RcptRequest or MessageReceived stops
    all input processing until answer() is called, which is what keeps pipelined
    replies in command order. States and the commands they accept:

    ========  =================================================================
    COMMAND   every command; MAIL needs no open transaction, RCPT needs MAIL,
              DATA needs an accepted RCPT (otherwise 503 or 554)
    DATA      content lines until ".", then MessageReceived (or 552 when too big)
    WAITING   nothing: input is buffered until answer()
    CLOSED    nothing: input is discarded
    ========  =================================================================
    """

    def __init__(
        self,
        *,
        hostname: str,
        max_size: int,
        max_recipients: int = 1000,
        max_errors: int = 20,
        max_junk: int = 100,
        max_line_length: int = 2048,
        sink: Callable[[], DataSink] = MemorySink,
        starttls: bool = False,
        require_tls: bool = False,
        auth: bool = False,
        require_auth: bool = False,
    ) -> None:
        """``sink`` makes what a message's content is written to as it arrives.

        ``starttls`` offers STARTTLS (RFC 3207) until TLS is active; ``require_tls``
        answers MAIL with 530 5.7.0 until it is.  ``tls`` says TLS is active (set
        at connection time for a connection that is TLS from the first byte).

        ``auth`` offers AUTH PLAIN and LOGIN (RFC 4954), once TLS is active or
        when ``auth_insecure`` is set (a client on the loopback interface, as
        Dovecot trusts it); ``require_auth`` answers MAIL with 530 5.7.0 until
        the client has logged in.  ``user`` is the name it logged in with.
        """
        self.hostname = hostname
        self.max_size = max_size  # 0 means no limit
        self.max_recipients = max_recipients
        self.max_errors = max_errors
        # NOOP, RSET and VRFY past this many count as errors too (Postfix's
        # smtpd_junk_command_limit): a client that only keeps the session busy is
        # closed after max_errors more, instead of holding a connection forever.
        self.max_junk = max_junk
        self.max_line_length = max_line_length
        self.helo = ""
        self.esmtp = False
        self.starttls = starttls
        self.require_tls = require_tls
        self.tls = False
        self.auth = auth
        self.require_auth = require_auth
        self.auth_insecure = False
        self.user: str | None = None
        self._auth_step = ""  # "plain", "login-user" or "login-password": a response is due
        self._auth_login_user = ""
        # Octets the client pipelined behind STARTTLS and that were thrown away.
        self.discarded_after_starttls = 0
        self.errors = 0
        self.junk = 0
        self._refused = False  # greeted with 554: only QUIT is taken (RFC 5321 3.1)
        self._state = _State.COMMAND
        self._buffer = bytearray()
        self._pos = 0
        self._discarding = False
        self._events: deque[ServerEvent] = deque()
        self._pending: Request | None = None
        self._sender: str | None = None
        self._recipients: list[str] = []
        self._rcpt_attempts = 0
        self._make_sink = sink
        self._sink: DataSink | None = None
        self._data_size = 0
        self._data_too_big = False
        self._at_line_start = True
        # The line before the current one ended in CRLF (or the data just began): only
        # then may a "." line end the data.
        self._after_crlf = True

    # ----------------------------------------------------------------- public interface

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def pending(self) -> Request | None:
        """The request waiting for answer(), if any."""
        return self._pending

    @property
    def in_transaction(self) -> bool:
        return self._sender is not None

    @property
    def transferring(self) -> bool:
        """The message content (DATA) is arriving."""
        return self._state is _State.DATA

    @property
    def buffered(self) -> int:
        """Octets received and not yet processed (input that waits for an answer())."""
        return len(self._buffer) - self._pos

    def greeting(self) -> Reply:
        return Reply(220, "", f"{self.hostname} ESMTP")

    def receive_data(self, data: bytes) -> None:
        if self._state is _State.CLOSED:
            return
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def next_event(self) -> ServerEvent | None:
        """The next thing to do, or None when more input (or an answer) is needed."""
        while not self._events:
            if self._state is _State.COMMAND:
                if not self._next_command():
                    return None
            elif self._state is _State.DATA:
                if not self._next_data():
                    return None
            else:
                return None
        return self._events.popleft()

    def answer(self, reply: Reply | None) -> None:
        """Answer the pending request; None means the default success reply."""
        request = self._pending
        if request is None:
            raise RuntimeError("answer() called with no request pending")
        if reply is None:
            if isinstance(request, (MessageReceived, AuthRequest)):
                raise ValueError("a message or a login needs an explicit reply")
            reply = _SENDER_OK if isinstance(request, MailRequest) else _RECIPIENT_OK
        self._pending = None
        self._state = _State.COMMAND
        if reply.positive:
            if isinstance(request, MailRequest):
                self._sender = request.sender
                self._recipients = []
                self._rcpt_attempts = 0
            elif isinstance(request, AuthRequest):
                self.user = request.user
            elif isinstance(request, RcptRequest):
                if request.recipient not in self._recipients:
                    # A recipient given twice gets one copy (as Postfix's cleanup does).
                    self._recipients.append(request.recipient)
            else:
                # Delivering mail starts the limits afresh (Postfix's "without delivering mail").
                self.errors = 0
                self.junk = 0
        self._emit(reply, close=reply.code == 421)
        if not reply.positive and reply.code != 421:
            # Refused senders and recipients count: a client probing for addresses stops.
            self._count_error()

    def close(self) -> None:
        """Stop: buffered and further input is discarded and nothing more is produced."""
        self._close()
        self._events.clear()

    def timeout(self) -> Reply:
        """The idle timer fired: the reply to send before closing."""
        self.close()
        return Reply(421, "4.4.2", f"{self.hostname} Error: timeout exceeded")

    def abort(self) -> Reply:
        """Something failed locally and the connection must go: the reply to send."""
        self.close()
        return Reply(421, "4.3.0", f"{self.hostname} Error: local error in processing")

    # ----------------------------------------------------------------- internals

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._pending = None
        self._buffer = bytearray()
        self._pos = 0
        self._drop_sink()

    def _drop_sink(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.close()

    def _emit(self, reply: Reply, *, close: bool = False) -> None:
        self._events.append(SendReply(reply, close))
        if close:
            self._close()

    def _error(self, reply: Reply) -> None:
        self._emit(reply)
        self._count_error()

    def _count_error(self) -> None:
        """One more error (every refused command counts, as in Postfix); 421 at the limit."""
        self.errors += 1
        if self.errors >= self.max_errors and self._state is not _State.CLOSED:
            self._emit(Reply(421, "4.7.0", f"{self.hostname} Error: too many errors"), close=True)

    def _request(self, request: Request) -> None:
        self._pending = request
        self._state = _State.WAITING
        self._events.append(request)

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients = []
        self._rcpt_attempts = 0

    def _next_command(self) -> bool:
        """Handle one command line if a whole one is buffered; False when more input is needed."""
        buffer = self._buffer
        end = buffer.find(b"\n", self._pos)
        longest = max(self.max_line_length, _AUTH_LINE) if self.auth else self.max_line_length
        if end == -1:
            if len(buffer) - self._pos > longest + 1:
                self._buffer = bytearray()
                self._pos = 0
                self._discarding = True
            return False
        line = bytes(buffer[self._pos : end])
        self._pos = end + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._discarding:
            self._discarding = False
            self._auth_step = ""
            self._error(_LINE_TOO_LONG)
        elif self._auth_step:
            self._auth_response(line)
        elif len(line) > self.max_line_length and not (
            len(line) <= longest and line[:5].upper() == b"AUTH "
        ):
            self._error(_LINE_TOO_LONG)
        else:
            self._dispatch(parse_command(line))
        return True

    def refuse(self) -> None:
        """The session was refused with a 554 greeting: every command but QUIT gets 503."""
        self._refused = True

    def _dispatch(self, command: Command) -> None:
        if self._refused and command.verb != "QUIT":
            self._error(_REFUSED)
            return
        if not command.verb:
            self._error(_BAD_SYNTAX)
            return
        method = _COMMANDS.get(command.verb)
        if method is not None:
            method(self, command.argument)
            if command.verb in _JUNK:
                self.junk += 1
                if self.junk > self.max_junk:
                    self._count_error()
        elif command.verb in _UNIMPLEMENTED:
            self._error(_NOT_IMPLEMENTED)
        else:
            self._error(_UNKNOWN)

    def _hello(self, argument: str, esmtp: bool) -> None:
        verb = "EHLO" if esmtp else "HELO"
        if not argument or any(not 32 <= ord(c) <= 126 for c in argument):
            self._error(_syntax(f"{verb} hostname"))
            return
        self._reset_transaction()
        self.helo = argument
        self.esmtp = esmtp
        if not esmtp:
            self._emit(Reply(250, "", self.hostname))
            return
        size = f"SIZE {self.max_size}" if self.max_size > 0 else "SIZE"
        lines = [self.hostname, "PIPELINING", size, "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.starttls and not self.tls:
            lines.append("STARTTLS")
        if self.auth_offered:
            lines.append("AUTH " + " ".join(_MECHANISMS))
        self._emit(Reply(250, "", "\n".join(lines)))

    def _ehlo(self, argument: str) -> None:
        self._hello(argument, True)

    def _helo(self, argument: str) -> None:
        self._hello(argument, False)

    def _mail(self, argument: str) -> None:
        if self.require_tls and not self.tls:
            self._error(_TLS_FIRST)
            return
        if self.require_auth and self.user is None:
            self._error(_AUTH_FIRST)
            return
        if self._sender is not None:
            self._error(_NESTED_MAIL)
            return
        try:
            sender, params = parse_mail_argument(argument)
        except AddressSyntaxError:
            self._error(_BAD_SENDER)
            return
        except ParameterSyntaxError:
            self._error(_syntax("MAIL FROM:<address>"))
            return
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not _DIGITS.match(value):
                    self._error(Reply(501, "5.5.4", "Bad message size syntax"))
                    return
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._error(Reply(501, "5.5.4", f"Unsupported BODY parameter: {value}"))
                    return
            elif key == "AUTH" and self.auth:
                # RFC 4954 5: who submitted the message first; taken and not passed on.
                if not value:
                    self._error(Reply(501, "5.5.4", "Bad AUTH parameter syntax"))
                    return
            else:
                self._error(Reply(555, "5.5.4", f"Unsupported option: {key}"))
                return
        declared = params.get("SIZE")
        if declared is not None and 0 < self.max_size < int(declared):
            self._error(_TOO_BIG)
            return
        self._request(MailRequest(sender, params))

    def _rcpt(self, argument: str) -> None:
        if self._sender is None:
            self._error(_NEED_MAIL)
            return
        try:
            recipient, params = parse_rcpt_argument(argument)
        except AddressSyntaxError:
            self._error(_BAD_RECIPIENT)
            return
        except ParameterSyntaxError:
            self._error(_syntax("RCPT TO:<address>"))
            return
        if params:
            self._error(Reply(555, "5.5.4", f"Unsupported option: {next(iter(params))}"))
            return
        if len(self._recipients) >= self.max_recipients:
            # Not an error: RFC 5321 4.5.3.1.10 has the client send these in a new transaction.
            self._emit(_TOO_MANY_RECIPIENTS)
            return
        self._rcpt_attempts += 1
        self._request(RcptRequest(self._sender, recipient, params))

    def _data(self, argument: str) -> None:
        if self._sender is None:
            self._error(_NEED_MAIL)
            return
        if not self._recipients:
            self._error(_NO_VALID_RECIPIENTS if self._rcpt_attempts else _NEED_RCPT)
            return
        if argument:
            self._error(_syntax("DATA"))
            return
        self._drop_sink()
        self._sink = self._make_sink()
        self._data_size = 0
        self._data_too_big = False
        self._at_line_start = True
        self._after_crlf = True
        self._state = _State.DATA
        self._emit(_START_DATA)

    def _rset(self, argument: str) -> None:
        if argument:
            self._error(_syntax("RSET"))
            return
        self._reset_transaction()
        self._emit(_OK)

    def _noop(self, argument: str) -> None:
        self._emit(_OK)

    def _quit(self, argument: str) -> None:
        self._emit(_BYE, close=True)

    def _vrfy(self, argument: str) -> None:
        if not argument:
            self._error(_syntax("VRFY address"))
            return
        self._emit(_VRFY)

    def _help(self, argument: str) -> None:
        reply = _HELP_TLS if self.starttls and not self.tls else _HELP
        if self.auth_offered:
            reply = Reply(reply.code, reply.status, reply.text.replace(" MAIL ", " AUTH MAIL "))
        self._emit(reply)

    @property
    def auth_offered(self) -> bool:
        """AUTH is offered now: users are configured, and TLS is up or the client is local."""
        return self.auth and (self.tls or self.auth_insecure)

    def _auth(self, argument: str) -> None:
        """RFC 4954 AUTH with PLAIN (RFC 4616) or LOGIN; the credentials go to the handler."""
        if not self.auth:
            self._error(_NOT_IMPLEMENTED)
            return
        if not self.esmtp:
            self._error(_AUTH_NEEDS_EHLO)
            return
        if not self.auth_offered:
            self._error(_AUTH_NEEDS_TLS)
            return
        if self.user is not None:
            self._error(_AUTH_TWICE)
            return
        if self._sender is not None:
            self._error(_AUTH_IN_TRANSACTION)
            return
        words = argument.split(" ")
        if not argument or len(words) > 2 or not all(words):
            self._error(_syntax("AUTH mechanism [initial-response]"))
            return
        mechanism = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        if mechanism not in _MECHANISMS:
            self._error(_AUTH_MECHANISM)
            return
        if mechanism == "PLAIN":
            if initial is None:
                self._auth_step = "plain"
                self._emit(Reply(334, "", ""))
            else:
                self._auth_plain(initial)
        elif initial is None:
            self._auth_step = "login-user"
            self._emit(Reply(334, "", "VXNlcm5hbWU6"))  # "Username:"
        else:
            self._auth_login(initial, "login-user")

    def _auth_response(self, line: bytes) -> None:
        step, self._auth_step = self._auth_step, ""
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            self._error(_AUTH_ABORTED)
        elif len(line) > _AUTH_LINE:
            self._error(_LINE_TOO_LONG)
        elif step == "plain":
            self._auth_plain(text)
        else:
            self._auth_login(text, step)

    def _auth_plain(self, response: str) -> None:
        decoded = _decode_auth(response)
        parts = decoded.split("\0") if decoded is not None else []
        if len(parts) != 3 or not parts[1]:
            self._error(_AUTH_UNDECODABLE)
            return
        authzid, user, password = parts
        if not user.isprintable():
            # No users file holds such a name, and it must not reach a log line.
            self._error(_AUTH_FAILED)
            return
        if authzid and authzid != user:
            # Acting for another user is not something a users file can allow.
            self._error(_AUTH_FAILED)
            return
        self._request(AuthRequest(user, password, "PLAIN"))

    def _auth_login(self, response: str, step: str) -> None:
        decoded = _decode_auth(response)
        if decoded is None:
            self._error(_AUTH_UNDECODABLE)
        elif step == "login-user":
            if not decoded or not decoded.isprintable():
                self._error(_AUTH_FAILED)
                return
            self._auth_login_user = decoded
            self._auth_step = "login-password"
            self._emit(Reply(334, "", "UGFzc3dvcmQ6"))  # "Password:"
        else:
            user, self._auth_login_user = self._auth_login_user, ""
            self._request(AuthRequest(user, decoded, "LOGIN"))

    def _starttls(self, argument: str) -> None:
        """RFC 3207: 220, then TLS; what the client sent behind the command is thrown away
        (a man in the middle could have put it there: the CVE-2011-0411 class), and the
        session starts again: the client says EHLO anew."""
        if self.tls:
            self._error(_TLS_ACTIVE)
            return
        if not self.starttls:
            self._error(_NOT_IMPLEMENTED)
            return
        if argument:
            self._error(_syntax("STARTTLS"))
            return
        if self._sender is not None:
            self._error(_TLS_IN_TRANSACTION)
            return
        self.discarded_after_starttls += len(self._buffer) - self._pos
        self._buffer = bytearray()
        self._pos = 0
        self._reset_transaction()
        self.helo = ""
        self.esmtp = False
        self.user = None
        self.tls = True
        self._events.append(SendReply(_READY_FOR_TLS, start_tls=True))

    def _append(self, content: bytes, newline: bool) -> None:
        self._data_size += len(content) + (2 if newline else 0)
        self._keep(content + b"\n" if newline else content)

    def _append_lines(self, lines: bytes) -> None:
        """Whole lines, already with LF endings; each counts as its content plus CRLF."""
        self._data_size += len(lines) + lines.count(b"\n")
        self._keep(lines)

    def _keep(self, content: bytes) -> None:
        if self._data_too_big:
            return
        if 0 < self.max_size < self._data_size:
            # From here on the content is counted and dropped, never buffered.
            self._data_too_big = True
            self._drop_sink()
            return
        if self._sink is not None:
            self._sink.write(content)

    def _next_data(self) -> bool:
        """Consume buffered message content; True once the end-of-data line was seen."""
        buffer = self._buffer
        pos = self._pos
        size = len(buffer)
        try:
            while pos < size:
                if self._at_line_start and buffer[pos] == 0x2E:  # "."
                    if size - pos == 1 or (size - pos == 2 and buffer[pos + 1] == 0x0D):
                        return False
                    # Only CRLF "." CRLF ends the data (RFC 5321 4.1.1.4). A "." line
                    # with or after a bare LF is content, its dot removed like any
                    # leading dot (Postfix's smtpd_forbid_bare_newline=normalize):
                    # taking it as the end would let a sender, through an MTA that
                    # passes bare LFs on, smuggle a second transaction in.
                    if self._after_crlf and buffer[pos + 1 : pos + 3] == b"\r\n":
                        pos += 3
                        self._end_of_data()
                        return True
                    pos += 1  # remove the stuffed dot
                    self._at_line_start = False
                    continue
                last = buffer.rfind(b"\n", pos)
                if last == -1:
                    # Keep a final CR back: it may be the first half of a CRLF.
                    stop = size - 1 if buffer[size - 1] == 0x0D else size
                    if stop > pos:
                        self._append(bytes(buffer[pos:stop]), False)
                        self._at_line_start = False
                    pos = stop
                    return False
                # Every whole line up to the next one that starts with a dot, in one go:
                # CRLF (or a bare LF) becomes LF, exactly as line by line.
                dot = buffer.find(b"\n.", pos, last)
                end = last if dot == -1 else dot
                self._append_lines(bytes(buffer[pos : end + 1]).replace(b"\r\n", b"\n"))
                self._at_line_start = True
                # A final CR is never left behind for the next read (see above), so a
                # line's CR is in the buffer whenever its LF is.
                self._after_crlf = end > pos and buffer[end - 1] == 0x0D
                pos = end + 1
            return False
        finally:
            if self._state is not _State.CLOSED:
                self._pos = pos

    def _end_of_data(self) -> None:
        sender = self._sender or ""
        recipients = tuple(self._recipients)
        sink, self._sink = self._sink, None
        too_big = self._data_too_big
        self._reset_transaction()
        self._state = _State.COMMAND
        if too_big or sink is None:
            self._error(_TOO_BIG)
            return
        data = sink.getvalue()
        error = sink.error
        sink.close()
        if error is not None:
            self._emit(Reply(452, "4.3.1", f"Insufficient system storage: {error}"))
            return
        self._request(MessageReceived(sender, recipients, data))


# Commands that move no mail (Postfix counts ETRN too, which is not offered here).
_JUNK = frozenset({"NOOP", "RSET", "VRFY"})

_COMMANDS = {
    "EHLO": ServerCodec._ehlo,
    "HELO": ServerCodec._helo,
    "MAIL": ServerCodec._mail,
    "RCPT": ServerCodec._rcpt,
    "DATA": ServerCodec._data,
    "RSET": ServerCodec._rset,
    "NOOP": ServerCodec._noop,
    "QUIT": ServerCodec._quit,
    "VRFY": ServerCodec._vrfy,
    "HELP": ServerCodec._help,
    "STARTTLS": ServerCodec._starttls,
    "AUTH": ServerCodec._auth,
}


def _decode_auth(text: str) -> str | None:
    """A base64 SASL response as text ("=" is the empty one); None when it is not base64
    or not UTF-8."""
    if text == "=":
        return ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
