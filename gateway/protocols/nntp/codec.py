"""Sans-io NNTP (RFC 3977, RFC 4643 AUTHINFO USER/PASS, RFC 4644 streaming) for both sides.

Nothing here does I/O or imports Twisted. The pieces:

``StreamReader``
    Holds the bytes received on one connection and hands them out either as
    lines (``read_line``: commands on a server, responses on a client) or as
    multi-line data blocks (``read_block``: an article after POST, IHAVE and
    TAKETHIS, or the block after a 101/215/220/... response).  Both return
    None until enough bytes have arrived, so the caller feeds bytes with
    ``receive_data`` and calls them in a loop::

        reader.receive_data(data)
        while (line := reader.read_line()) is not None:
            command = parse_command(line)
            ...
            if command.keyword == "TAKETHIS":
                block = reader.read_block()   # None: wait for more bytes

    A line longer than ``max_line_length`` octets (CR LF included; RFC 3977
    allows 512 for commands and initial response lines) raises
    ``LineTooLong`` once; its bytes are dropped, never buffered, and the next
    ``read_line`` returns the line after it, so a server answers 501 and the
    connection goes on.  Lines end in CR LF; a bare LF is accepted too.

    A data block is returned as a ``Block`` once its terminating "." line has
    been read.  Its content is un-dot-stuffed and has LF line endings, like
    every message inside the gateway.  The reader always reads a block up to
    its terminator, even when the block is refused because it is larger than
    ``max_block_size`` or has a line longer than ``max_block_line_length``
    (then ``Block.data`` is empty, the flags say why and the content was
    counted but not kept), so the next command is found where it starts.
    Blocks are decoded a chunk at a time with bytes.replace, in time linear in
    their size.

``encode_block`` / ``decode_block``
    Article bytes with LF line endings to the wire form (CR LF, dot-stuffed,
    ending in ".\\r\\n") and back.  The round trip is exact for every byte
    string that is empty or ends in LF: lines starting with ".", empty lines,
    8-bit bytes and CR inside a line all survive.  A final line without LF is
    sent as a complete line, so it comes back with an LF added:
    ``decode_block(encode_block(x)) == normalise_block(x)``.  A CR directly
    before an LF inside the content is sent as "CR CR LF" and so survives.

``parse_command`` / ``format_command``
    Command lines: the keyword is case-insensitive (returned upper-case),
    arguments are separated by spaces or tabs.  Bad input raises
    ``NntpSyntaxError`` whose ``code`` is the response to send (500 for an
    unknown or malformed keyword, 501 for bad arguments).

``Response``, ``parse_response``, ``response_has_block``
    Status lines ("211 3 1 3 misc.test") and the rule for which of them are
    followed by a multi-line block.  That depends on the command (RFC 3977
    section 3.2): 211 has one after LISTGROUP, not after GROUP, and no
    response to POST, IHAVE, CHECK, TAKETHIS, MODE, AUTHINFO, ... has one,
    whatever its code.

``is_message_id``, ``parse_capabilities``, ``encode_lines``
    Small helpers for message-ids (RFC 3977 section 3.6, RFC 5536), the
    CAPABILITIES list and server multi-line answers made of text lines.

``ServerCodec``
    The server side of a connection (CAPABILITIES, MODE READER/STREAM, POST,
    IHAVE, CHECK, TAKETHIS, AUTHINFO USER/PASS, HELP, DATE, QUIT) as a state
    machine: bytes in, ``SendResponse`` events and requests for decisions
    (``AuthRequest``, ``OfferRequest``, ``ArticleReceived``) out.
"""

from __future__ import annotations

import enum
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.protocols._sink import DataSink, MemorySink

__all__ = [
    "MAX_LINE_LENGTH",
    "MULTILINE_CODES",
    "ArticleReceived",
    "AuthRequest",
    "Block",
    "Command",
    "LineTooLong",
    "NntpError",
    "NntpSyntaxError",
    "OfferRequest",
    "Response",
    "SendResponse",
    "ServerCodec",
    "ServerEvent",
    "ServerRequest",
    "StreamReader",
    "decode_block",
    "encode_block",
    "encode_lines",
    "format_command",
    "is_message_id",
    "normalise_block",
    "parse_capabilities",
    "parse_command",
    "parse_response",
    "response_has_block",
]

MAX_LINE_LENGTH = 512
"""RFC 3977 section 3.1: command lines and initial response lines, CR LF included."""


class NntpError(ValueError):
    """Input that does not follow the NNTP grammar."""


class NntpSyntaxError(NntpError):
    """A malformed command or response line; ``code`` is the response a server should send."""

    def __init__(self, message: str, code: int = 501) -> None:
        super().__init__(message)
        self.code = code


class LineTooLong(NntpError):
    """A line went over the length limit; its bytes were dropped and reading goes on after it."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"line of {length} or more octets is longer than the limit of {limit}")
        self.length = length
        self.limit = limit


# --------------------------------------------------------------------------- data blocks


def normalise_block(data: bytes) -> bytes:
    """What ``decode_block(encode_block(data))`` gives: an LF is added to a final partial line."""
    if data and not data.endswith(b"\n"):
        return data + b"\n"
    return data


def encode_block(data: bytes) -> bytes:
    """LF-terminated content to a multi-line data block: CR LF, dot-stuffed, ending in ".\\r\\n"."""
    data = normalise_block(data)
    stuffed = data.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed.replace(b"\n", b"\r\n") + b".\r\n"


def encode_lines(lines: Iterable[str]) -> bytes:
    """A multi-line block made of text lines (CAPABILITIES, HELP, LIST), UTF-8 encoded."""
    return encode_block("".join(f"{line}\n" for line in lines).encode("utf-8"))


def decode_block(data: bytes) -> bytes:
    """The content of one complete wire block (up to and including its "." line) as LF text.

    Raises NntpError when the terminating line is missing or bytes follow it.
    """
    reader = StreamReader(max_line_length=len(data) + 2)
    reader.receive_data(data)
    block = reader.read_block()
    if block is None:
        raise NntpError("the data block has no terminating '.' line")
    if reader.buffered:
        raise NntpError(f"{reader.buffered} octets follow the terminating '.' line")
    return block.data


@dataclass(frozen=True, slots=True)
class Block:
    """A multi-line data block as read from the wire.

    ``data`` is the un-stuffed content with LF line endings; it is empty when
    the block was refused (``too_large`` or ``line_too_long``).  ``size`` counts
    the content octets with LF line endings, also for a refused block.
    """

    data: bytes
    size: int
    too_large: bool = False
    line_too_long: bool = False
    # Why the content could not be kept (a full disk), when it could not.
    error: str = ""

    @property
    def ok(self) -> bool:
        return not (self.too_large or self.line_too_long or self.error)


class _BlockState:
    __slots__ = ("discarding_line", "line_too_long", "sink", "size", "too_large")

    def __init__(self, sink: DataSink) -> None:
        self.sink: DataSink | None = sink
        self.size = 0
        self.too_large = False
        self.line_too_long = False
        # True while the rest of an over-long or over-size line is being dropped.
        self.discarding_line = False

    @property
    def ok(self) -> bool:
        return not (self.too_large or self.line_too_long)


class StreamReader:
    """The receive side of one NNTP connection: lines and data blocks from a byte stream.

    ``max_line_length`` bounds command and response lines (CR LF included).
    ``max_block_size`` (0: no limit) bounds a data block's content and
    ``max_block_line_length`` (0: no limit) each line inside it, both counted
    in octets as on the wire without the line ending.
    """

    def __init__(
        self,
        *,
        max_line_length: int = MAX_LINE_LENGTH,
        max_block_size: int = 0,
        max_block_line_length: int = 0,
        sink: Callable[[], DataSink] = MemorySink,
    ) -> None:
        """``sink`` makes what a block's content is written to as it arrives."""
        if max_line_length < 3:
            raise ValueError("max_line_length must be at least 3")
        self.max_line_length = max_line_length
        self.max_block_size = max_block_size
        self.max_block_line_length = max_block_line_length
        self._buffer = bytearray()
        self._scanned = 0  # bytes at the start of the buffer known to hold no LF
        self._skipping_line = False
        self._block: _BlockState | None = None
        self._make_sink = sink

    def close(self) -> None:
        """Drop what was received, the block being read included."""
        self._buffer = bytearray()
        self._scanned = 0
        if self._block is not None and self._block.sink is not None:
            self._block.sink.close()
        self._block = None

    @property
    def buffered(self) -> int:
        """Octets received and not yet returned."""
        return len(self._buffer)

    @property
    def in_block(self) -> bool:
        """True between the first ``read_block`` call for a block and the one returning it."""
        return self._block is not None

    @property
    def block_refused(self) -> bool:
        """The block being read is already over a limit (its content is being dropped)."""
        return self._block is not None and not self._block.ok

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def discard(self) -> int:
        """Drop the octets received and not yet read (between commands); how many."""
        dropped = len(self._buffer)
        self._buffer = bytearray()
        self._scanned = 0
        self._skipping_line = False
        return dropped

    def _consume(self, count: int) -> None:
        del self._buffer[:count]
        self._scanned = 0

    def _find_lf(self) -> int:
        end = self._buffer.find(b"\n", self._scanned)
        self._scanned = len(self._buffer) if end < 0 else 0
        return end

    # ---------------------------------------------------------------- lines

    def read_line(self) -> bytes | None:
        """The next line without its line ending, or None until one is complete.

        Raises LineTooLong (once per line) for a line over ``max_line_length``.
        """
        if self._block is not None:
            raise NntpError("read_line called in the middle of a data block")
        buffer = self._buffer
        if self._skipping_line:
            end = buffer.find(b"\n")
            if end < 0:
                buffer.clear()
                self._scanned = 0
                return None
            self._consume(end + 1)
            self._skipping_line = False
        end = self._find_lf()
        if end < 0:
            if len(buffer) >= self.max_line_length:
                length = len(buffer)
                buffer.clear()
                self._scanned = 0
                self._skipping_line = True
                raise LineTooLong(length, self.max_line_length)
            return None
        line = bytes(buffer[:end])
        self._consume(end + 1)
        if end + 1 > self.max_line_length:
            raise LineTooLong(end + 1, self.max_line_length)
        return line[:-1] if line.endswith(b"\r") else line

    # ---------------------------------------------------------------- blocks

    def read_block(self) -> Block | None:
        """The next data block once its "." line has arrived; None until then.

        Each call decodes the complete lines received so far and drops them
        from the buffer, so a large block is neither kept twice nor rescanned.
        """
        state = self._block
        if state is None:
            state = self._block = _BlockState(self._make_sink())
        buffer = self._buffer
        while True:
            end = self._find_lf()
            if end < 0:
                if state.discarding_line:
                    state.size += len(buffer)
                    buffer.clear()
                    self._scanned = 0
                elif self._check_partial(state):
                    continue
                return None
            if state.discarding_line:
                state.size += end + 1
                self._consume(end + 1)
                state.discarding_line = False
                continue
            terminator = self._find_terminator()
            if terminator is not None:
                start, stop = terminator
                self._take_lines(state, start)
                self._consume(stop - start)
                self._block = None
                data, error = b"", ""
                if state.sink is not None:
                    data = state.sink.getvalue()
                    error = state.sink.error or ""
                    state.sink.close()
                return Block(
                    b"" if error else data,
                    state.size,
                    too_large=state.too_large,
                    line_too_long=state.line_too_long,
                    error=error,
                )
            self._take_lines(state, buffer.rfind(b"\n") + 1)

    def _find_terminator(self) -> tuple[int, int] | None:
        """(start, stop) offsets of the "." line, when it is complete in the buffer."""
        buffer = self._buffer
        if buffer[:3] == b".\r\n":
            return 0, 3
        if buffer[:2] == b".\n":
            return 0, 2
        crlf = buffer.find(b"\n.\r\n")
        lf = buffer.find(b"\n.\n")
        if crlf < 0 and lf < 0:
            return None
        if lf < 0 or 0 <= crlf < lf:
            return crlf + 1, crlf + 4
        return lf + 1, lf + 3

    def _take_lines(self, state: _BlockState, end: int) -> None:
        """Decode ``buffer[:end]`` (complete lines) into the block and drop it from the buffer."""
        if end == 0:
            return
        raw = bytes(self._buffer[:end])
        self._consume(end)
        if self.max_block_line_length and not state.line_too_long:
            longest = max(len(line.rstrip(b"\r")) for line in raw.split(b"\n"))
            if longest > self.max_block_line_length:
                self._refuse(state, line_too_long=True)
        text = raw.replace(b"\r\n", b"\n")
        if text.startswith(b"."):
            text = text[1:]
        text = text.replace(b"\n.", b"\n")
        state.size += len(text)
        if state.too_large or state.line_too_long:
            return
        if self.max_block_size and state.size > self.max_block_size:
            self._refuse(state, too_large=True)
            return
        if state.sink is not None:
            state.sink.write(text)

    def _check_partial(self, state: _BlockState) -> bool:
        """Drop an incomplete line that is already over a limit; True when it was dropped.

        The rest of that line is dropped as it arrives.  Sizes of refused
        blocks are counted roughly (CR and stuffed dots of dropped lines included).
        """
        pending = len(self._buffer)
        if pending < 3:
            return False  # may be the start of the "." line
        if self.max_block_line_length and pending > self.max_block_line_length + 1:
            self._refuse(state, line_too_long=True)
        elif self.max_block_size and state.size + pending > self.max_block_size + 1:
            # Pending may hold a stuffed dot and a CR that are not content, and the
            # LF still to come is: the line's content is at least pending - 1.
            self._refuse(state, too_large=True)
        elif state.ok or pending < 65536:
            return False
        state.size += pending
        self._buffer.clear()
        self._scanned = 0
        state.discarding_line = True
        return True

    @staticmethod
    def _refuse(
        state: _BlockState, *, too_large: bool = False, line_too_long: bool = False
    ) -> None:
        state.too_large = state.too_large or too_large
        state.line_too_long = state.line_too_long or line_too_long
        if state.sink is not None:
            state.sink.close()
            state.sink = None


# --------------------------------------------------------------------------- commands

_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9.\-]{0,11}\Z")
_SPACE = re.compile(r"[ \t]+")


@dataclass(frozen=True, slots=True)
class Command:
    """One command line: the keyword upper-case, the arguments and the raw argument text.

    ``rest`` is everything after the keyword and its separating white space,
    unchanged; AUTHINFO PASS uses it because a password may contain spaces.
    """

    keyword: str
    args: tuple[str, ...] = ()
    rest: str = ""

    def to_bytes(self) -> bytes:
        return format_command(self.keyword, *self.args)


def parse_command(line: bytes) -> Command:
    """Parse a command line (without CR LF). Raises NntpSyntaxError with the code to answer."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise NntpSyntaxError("the command line is not valid UTF-8", 501) from None
    if "\r" in text or "\n" in text or "\0" in text:
        raise NntpSyntaxError("the command line contains a CR, LF or NUL character", 501)
    stripped = text.strip(" \t")
    if not stripped:
        raise NntpSyntaxError("empty command line", 500)
    parts = _SPACE.split(stripped, maxsplit=1)
    keyword = parts[0]
    if not _KEYWORD.match(keyword):
        raise NntpSyntaxError(f"{keyword[:40]!r} is not a command keyword", 500)
    rest = parts[1] if len(parts) > 1 else ""
    args = tuple(_SPACE.split(rest)) if rest else ()
    if any(len(arg.encode("utf-8")) > 497 for arg in args):
        raise NntpSyntaxError("an argument is longer than 497 octets", 501)
    return Command(keyword.upper(), args, rest)


def format_command(keyword: str, *args: str) -> bytes:
    """A command line with CR LF. Raises NntpError for an argument that cannot be sent."""
    if not _KEYWORD.match(keyword):
        raise NntpError(f"{keyword!r} is not a command keyword")
    for arg in args:
        if not arg or any(c in arg for c in " \t\r\n\0"):
            raise NntpError(f"command argument {arg!r} is empty or contains white space")
    line = " ".join((keyword, *args)).encode("utf-8") + b"\r\n"
    if len(line) > MAX_LINE_LENGTH:
        raise NntpError(f"the {keyword} command line is longer than {MAX_LINE_LENGTH} octets")
    return line


# --------------------------------------------------------------------------- responses

_RESPONSE = re.compile(rb"([1-5][0-9][0-9])(?:[ \t]|\Z)")

MULTILINE_CODES = frozenset({100, 101, 215, 220, 221, 222, 224, 225, 230, 231, 282})
"""Codes always followed by a multi-line block (RFC 3977 section 3.2, RFC 2980 XGTITLE)."""

# RFC 3977 section 3.2: which responses are multi-line depends on the command.
_NO_BLOCK: frozenset[int] = frozenset()
_BLOCK_CODES_BY_COMMAND = {
    "ARTICLE": frozenset({220}),
    "HEAD": frozenset({221}),
    "BODY": frozenset({222}),
    "OVER": frozenset({224}),
    "XOVER": frozenset({224}),
    "XROVER": frozenset({224}),
    "HDR": frozenset({225}),
    "XHDR": frozenset({221}),
    "XPAT": frozenset({221}),
    "LIST": frozenset({215}),
    "LISTGROUP": frozenset({211}),
    "NEWNEWS": frozenset({230}),
    "NEWGROUPS": frozenset({231}),
    "HELP": frozenset({100}),
    "CAPABILITIES": frozenset({101}),
    "XGTITLE": frozenset({282}),
    # Commands whose responses are all single lines.
    **dict.fromkeys(
        (
            "AUTHINFO",
            "CHECK",
            "DATE",
            "GROUP",
            "IHAVE",
            "LAST",
            "MODE",
            "NEXT",
            "POST",
            "QUIT",
            "STAT",
            "TAKETHIS",
        ),
        _NO_BLOCK,
    ),
}


def response_has_block(code: int, keyword: str = "") -> bool:
    """True when a response with ``code`` to the command ``keyword`` is followed by a block.

    For a command this module knows, only its own multi-line responses have a
    block (a 220 to POST is a single line); for any other command (or none)
    the code decides.
    """
    codes = _BLOCK_CODES_BY_COMMAND.get(keyword.upper())
    if codes is not None:
        return code in codes
    return code in MULTILINE_CODES


@dataclass(frozen=True, slots=True)
class Response:
    """An initial response line: a three-digit status code and its text."""

    code: int
    text: str = ""

    def to_bytes(self) -> bytes:
        text = self.text.replace("\r", " ").replace("\n", " ")
        line = f"{self.code:03d} {text}".rstrip(" ").encode("utf-8", "replace")
        if len(line) > MAX_LINE_LENGTH - 2:
            # Over-long text is cut (at a character), never the code.
            line = line[: MAX_LINE_LENGTH - 2].decode("utf-8", "ignore").encode("utf-8")
        return line + b"\r\n"

    @property
    def args(self) -> tuple[str, ...]:
        """The text split at white space (e.g. count, low, high and group of a 211)."""
        return tuple(self.text.split())

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def intermediate(self) -> bool:
        """3xx: the command goes on (send the article, the password, ...)."""
        return 300 <= self.code < 400


def parse_response(line: bytes) -> Response:
    """Parse an initial response line (without CR LF). Raises NntpSyntaxError when it is not one."""
    match = _RESPONSE.match(line)
    if match is None:
        raise NntpSyntaxError(f"{line[:80]!r} is not an NNTP response line", 0)
    text = line[4:].decode("utf-8", "replace").strip(" \t")
    return Response(int(match.group(1)), text)


def parse_capabilities(block: bytes) -> dict[str, tuple[str, ...]]:
    """The 101 response's block as {CAPABILITY (upper-case): arguments}."""
    result: dict[str, tuple[str, ...]] = {}
    for raw in block.split(b"\n"):
        words = raw.decode("utf-8", "replace").split()
        if words:
            result[words[0].upper()] = tuple(words[1:])
    return result


# --------------------------------------------------------------------------- message-ids

_MSGID_LOOSE = re.compile(r"<[!-=?-~]{1,248}>\Z")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_MSGID_STRICT = re.compile(rf"<{_DOT_ATOM}@(?:{_DOT_ATOM}|\[[!-=?-Z^-~]*\])>\Z")


def is_message_id(text: str, *, strict: bool = False) -> bool:
    """True for a message-id as NNTP carries it (RFC 3977 section 3.6).

    ``strict`` also requires the RFC 5536 form ``<left@right>``, as a news
    server should for the Message-ID header field of an article it injects or
    relays.
    """
    if not _MSGID_LOOSE.match(text):
        return False
    return not strict or _MSGID_STRICT.match(text) is not None


# --------------------------------------------------------------------------- server


@dataclass(frozen=True, slots=True)
class SendResponse:
    """Write this response (and the encoded block after it); close afterwards when ``close``,
    or start TLS afterwards when ``start_tls`` (the answer to STARTTLS)."""

    response: Response
    block: bytes = b""
    close: bool = False
    start_tls: bool = False

    def to_bytes(self) -> bytes:
        return self.response.to_bytes() + self.block


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """AUTHINFO USER and PASS arrived: answer 281 (accepted) or 481 (rejected)."""

    user: str
    password: str


@dataclass(frozen=True, slots=True)
class OfferRequest:
    """IHAVE or CHECK offers ``message_id``.

    IHAVE: answer 335 to have the article sent, or 435 (not wanted) / 436 (try later).
    CHECK: answer 238 (send it), 431 (try later) or 438 (not wanted).
    """

    command: str
    message_id: str


@dataclass(frozen=True, slots=True)
class ArticleReceived:
    """A whole article arrived after POST, IHAVE or TAKETHIS; ``data`` has LF line endings.

    ``message_id`` is the command's argument ("" for POST).  Answer POST with
    240 or 441, IHAVE with 235, 436 or 437, TAKETHIS with 239 or 439; a 400
    answer to any of them closes the connection, leaving every article not yet
    acknowledged with the peer.
    """

    command: str
    message_id: str
    data: bytes


ServerEvent = SendResponse | AuthRequest | OfferRequest | ArticleReceived
ServerRequest = AuthRequest | OfferRequest | ArticleReceived


class _ServerState(enum.Enum):
    COMMAND = "command"  # reading command lines
    ARTICLE = "article"  # reading an article after POST, IHAVE or TAKETHIS
    WAITING = "waiting"  # a request is out; input stays buffered until it is answered
    CLOSED = "closed"  # a closing response was produced; input is ignored


_UNKNOWN = Response(500, "Unknown command")
_LINE_TOO_LONG = Response(501, f"Line too long (the limit is {MAX_LINE_LENGTH} octets)")
_AUTH_REQUIRED = Response(480, "Authentication required")
_AUTH_OUT_OF_SEQUENCE = Response(482, "Authentication commands issued out of sequence")
_NO_POSTING = Response(440, "Posting not permitted")
_TLS_REQUIRED = Response(483, "Encryption required: use STARTTLS first")
_READY_FOR_TLS = Response(382, "Continue with TLS negotiation")
_HELP_TEXT = (
    "CAPABILITIES",
    "MODE READER",
    "MODE STREAM",
    "POST",
    "IHAVE message-id",
    "CHECK message-id",
    "TAKETHIS message-id",
    "AUTHINFO USER name",
    "AUTHINFO PASS password",
    "STARTTLS",
    "DATE",
    "HELP",
    "QUIT",
)


def _usage(text: str) -> Response:
    return Response(501, f"Syntax: {text}")


class ServerCodec:
    """The server side of one NNTP connection as a state machine without I/O.

    Feed bytes with ``receive_data``; call ``next_event`` until it returns
    None.  A SendResponse is written as is (and the connection closed after it
    when ``close`` is set).  An AuthRequest, OfferRequest or ArticleReceived
    stops all input processing until ``answer`` is called: pipelined commands,
    streamed CHECK and TAKETHIS included, are therefore answered strictly in
    the order they arrived.

    The codec itself answers what needs no decision: CAPABILITIES, HELP,
    DATE, MODE READER / STREAM, QUIT, syntax errors (501), unknown commands
    (500), over-long lines (501, the connection goes on), 480 when
    ``auth_required`` and the client has not authenticated, 440 for POST
    when ``posting`` is off, 482 for AUTHINFO out of sequence, 502 for
    AUTHINFO when no users exist (``auth_available`` false) or the client is
    authenticated already, and the refusal of articles over ``max_size``
    (441 / 437 / 439).  A TAKETHIS article is always read to its end, even when
    the command is refused (bad message-id 439, not authenticated 480), so the
    next command is found where it starts.
    """

    def __init__(
        self,
        *,
        hostname: str,
        posting: bool = True,
        auth_available: bool = False,
        auth_required: bool = False,
        max_size: int = 0,
        clock: Callable[[], float] = time.time,
        sink: Callable[[], DataSink] = MemorySink,
        starttls: bool = False,
        require_tls: bool = False,
    ) -> None:
        """``sink`` makes what an article's content is written to as it arrives.

        ``starttls`` offers STARTTLS (RFC 4642) until TLS is active or the client
        has authenticated; AUTHINFO then waits for TLS (483), as RFC 4643 asks.
        ``require_tls`` answers POST, IHAVE, CHECK and TAKETHIS with 483 until
        TLS is active.  ``tls`` says it is (set at connection time for a
        connection that is TLS from the first byte).
        """
        if auth_required and not auth_available:
            raise ValueError("auth_required needs users to authenticate (auth_available)")
        self.hostname = hostname
        self.posting = posting
        self.auth_available = auth_available
        self.auth_required = auth_required
        self.max_size = max_size
        self.clock = clock
        self.starttls = starttls
        self.require_tls = require_tls
        self.tls = False
        # Octets the client pipelined behind STARTTLS and that were thrown away.
        self.discarded_after_starttls = 0
        self.user: str | None = None  # set once AUTHINFO succeeded
        self.streaming = False  # MODE STREAM was given (CHECK and TAKETHIS work without it)
        self._make_sink = sink
        self._reader = self._new_reader()
        self._state = _ServerState.COMMAND
        self._events: deque[ServerEvent] = deque()
        self._pending: ServerRequest | None = None
        self._auth_user: str | None = None  # AUTHINFO USER given, PASS expected
        # The article being read: its command, the message-id and a refusal decided up front.
        self._article_command = ""
        self._article_id = ""
        self._article_refusal: Response | None = None

    @property
    def closed(self) -> bool:
        return self._state is _ServerState.CLOSED

    @property
    def pending(self) -> ServerRequest | None:
        return self._pending

    @property
    def busy(self) -> bool:
        """An article is being read or a request is waiting for its answer."""
        return self._state in (_ServerState.ARTICLE, _ServerState.WAITING)

    @property
    def authenticated(self) -> bool:
        return self.user is not None

    @property
    def transferring(self) -> bool:
        """An article is arriving."""
        return self._state is _ServerState.ARTICLE

    @property
    def buffered(self) -> int:
        """Octets received and not yet handled."""
        return self._reader.buffered

    def greeting(self) -> Response:
        if self.posting:
            return Response(200, f"{self.hostname} news gateway ready, posting allowed")
        return Response(201, f"{self.hostname} news gateway ready, posting prohibited")

    def receive_data(self, data: bytes) -> None:
        if self._state is not _ServerState.CLOSED:
            self._reader.receive_data(data)

    def next_event(self) -> ServerEvent | None:
        """The next thing to do, or None when more input (or an answer) is needed."""
        while not self._events:
            if self._state is _ServerState.COMMAND:
                if not self._next_command():
                    return None
            elif self._state is _ServerState.ARTICLE:
                if not self._next_article():
                    return None
            else:
                return None
        return self._events.popleft()

    def answer(self, response: Response) -> None:
        """Answer the pending request with ``response``; it is sent as is."""
        request = self._pending
        if request is None:
            raise RuntimeError("answer() called with no request pending")
        self._pending = None
        self._state = _ServerState.COMMAND
        if isinstance(request, AuthRequest) and response.code == 281:
            self.user = request.user
        elif (
            isinstance(request, OfferRequest)
            and request.command == "IHAVE"
            and response.code == 335
        ):
            self._emit(response)
            self._start_article("IHAVE", request.message_id)
            return
        self._emit(response, close=response.code == 400)

    def close(self) -> None:
        """Stop: buffered and further input is discarded and nothing more is produced."""
        self._close()
        self._events.clear()

    def timeout(self) -> Response:
        """The idle timer fired: the response to send before closing."""
        self.close()
        return Response(400, f"{self.hostname} idle for too long, closing the connection")

    def abort(self) -> Response:
        """Something failed locally and the connection must go: the response to send."""
        self.close()
        return Response(403, f"{self.hostname} internal fault, closing the connection")

    # ----------------------------------------------------------------- internals

    def _new_reader(self) -> StreamReader:
        return StreamReader(
            max_line_length=MAX_LINE_LENGTH, max_block_size=self.max_size, sink=self._make_sink
        )

    def _close(self) -> None:
        self._state = _ServerState.CLOSED
        self._pending = None
        self._reader.close()

    def _emit(self, response: Response, block: bytes = b"", *, close: bool = False) -> None:
        self._events.append(SendResponse(response, block, close))
        if close:
            self._close()

    def _request(self, request: ServerRequest) -> None:
        self._pending = request
        self._state = _ServerState.WAITING
        self._events.append(request)

    def _start_article(
        self, command: str, message_id: str, refusal: Response | None = None
    ) -> None:
        self._state = _ServerState.ARTICLE
        self._article_command = command
        self._article_id = message_id
        self._article_refusal = refusal

    def _next_command(self) -> bool:
        """Handle one command line if a whole one is buffered; False when more input is needed."""
        try:
            line = self._reader.read_line()
        except LineTooLong:
            self._emit(_LINE_TOO_LONG)
            return True
        if line is None:
            return False
        try:
            command = parse_command(line)
        except NntpSyntaxError as error:
            self._emit(Response(error.code, str(error).capitalize()))
            return True
        method = _SERVER_COMMANDS.get(command.keyword)
        if method is None:
            self._emit(_UNKNOWN)
        else:
            method(self, command)
        return True

    def _next_article(self) -> bool:
        block = self._reader.read_block()
        if block is None:
            return False
        command, message_id = self._article_command, self._article_id
        refusal = self._article_refusal
        self._state = _ServerState.COMMAND
        self._article_refusal = None
        if refusal is not None:
            self._emit(refusal, close=refusal.code == 400)
        elif block.too_large:
            text = f"Article too large: the limit is {self.max_size} octets"
            if command == "TAKETHIS":
                self._emit(Response(439, f"{message_id} {text}"))
            else:
                self._emit(Response(441 if command == "POST" else 437, text))
        elif block.error:
            # The article could not be kept (a full disk): the peer must offer it again.
            text = f"Try again later: {block.error}"
            if command == "TAKETHIS":
                self._emit(Response(400, text), close=True)
            elif command == "POST":
                self._emit(Response(441, f"436 {text}"))
            else:
                self._emit(Response(436, text))
        else:
            self._request(ArticleReceived(command, message_id, block.data))
        return True

    def _needs_auth(self) -> bool:
        return self.auth_required and self.user is None

    def _needs_tls(self) -> bool:
        return self.require_tls and not self.tls

    def _refusal(self) -> Response | None:
        """Why a transfer command (POST, IHAVE, CHECK, TAKETHIS) may not go on yet."""
        if self._needs_tls():
            return _TLS_REQUIRED
        if self._needs_auth():
            return _AUTH_REQUIRED
        return None

    def _message_id_argument(self, command: Command) -> str | None:
        if len(command.args) != 1 or not is_message_id(command.args[0]):
            self._emit(_usage(f"{command.keyword} <message-id>"))
            return None
        return command.args[0]

    # ----------------------------------------------------------------- commands

    def _capabilities(self, command: Command) -> None:
        lines = ["VERSION 2", "IMPLEMENTATION news gateway", "IHAVE", "STREAMING"]
        if self.posting:
            lines.append("POST")
        if self.starttls and not self.tls and self.user is None:
            lines.append("STARTTLS")
        if self.auth_available and self.user is None and (self.tls or not self.starttls):
            lines.append("AUTHINFO USER")
        self._emit(Response(101, "Capability list:"), encode_lines(lines))

    def _help(self, command: Command) -> None:
        self._emit(Response(100, "Help text follows"), encode_lines(_HELP_TEXT))

    def _date(self, command: Command) -> None:
        if command.args:
            self._emit(_usage("DATE"))
            return
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self.clock()))
        self._emit(Response(111, stamp))

    def _quit(self, command: Command) -> None:
        self._emit(Response(205, "Bye"), close=True)

    def _mode(self, command: Command) -> None:
        mode = command.args[0].upper() if len(command.args) == 1 else ""
        if mode == "READER":
            self._emit(self.greeting())
        elif mode == "STREAM":
            if self._needs_auth():
                self._emit(_AUTH_REQUIRED)
                return
            self.streaming = True
            self._emit(Response(203, "Streaming permitted"))
        else:
            self._emit(_usage("MODE READER or MODE STREAM"))

    def _authinfo(self, command: Command) -> None:
        sub = command.args[0].upper() if command.args else ""
        if sub in ("SASL", "GENERIC"):
            self._emit(Response(503, f"AUTHINFO {sub} is not supported; use USER and PASS"))
            return
        if sub not in ("USER", "PASS") or len(command.args) < 2:
            self._emit(_usage("AUTHINFO USER name, then AUTHINFO PASS password"))
            return
        if not self.auth_available:
            self._emit(Response(502, "Authentication is not available here"))
            return
        if self.user is not None:
            self._emit(Response(502, "Already authenticated"))
            return
        if self.starttls and not self.tls:
            self._emit(Response(483, "Encryption required: use STARTTLS before AUTHINFO"))
            return
        value = command.rest[len(command.args[0]) :].strip(" \t")
        if sub == "USER":
            if len(command.args) != 2:
                self._emit(_usage("AUTHINFO USER name"))
                return
            self._auth_user = value
            self._emit(Response(381, "Enter password"))
            return
        user, self._auth_user = self._auth_user, None
        if user is None:
            self._emit(_AUTH_OUT_OF_SEQUENCE)
            return
        self._request(AuthRequest(user, value))

    def _starttls(self, command: Command) -> None:
        """RFC 4642: 382, then TLS; what the client sent behind the command is thrown away
        (never taken as sent under TLS), and what it said before is forgotten."""
        if command.args:
            self._emit(_usage("STARTTLS"))
        elif not self.starttls:
            self._emit(Response(502, "STARTTLS is not available here"))
        elif self.tls:
            self._emit(Response(502, "TLS is already active"))
        elif self.user is not None:
            self._emit(Response(502, "Already authenticated; STARTTLS comes before AUTHINFO"))
        else:
            self.discarded_after_starttls += self._reader.discard()
            self.tls = True
            self.streaming = False
            self._auth_user = None
            self._events.append(SendResponse(_READY_FOR_TLS, start_tls=True))

    def _post(self, command: Command) -> None:
        refusal = self._refusal()
        if command.args:
            self._emit(_usage("POST"))
        elif refusal is not None:
            self._emit(refusal)
        elif not self.posting:
            self._emit(_NO_POSTING)
        else:
            self._emit(Response(340, "Send article to be posted; end with <CR-LF>.<CR-LF>"))
            self._start_article("POST", "")

    def _ihave(self, command: Command) -> None:
        message_id = self._message_id_argument(command)
        if message_id is None:
            return
        refusal = self._refusal()
        if refusal is not None:
            self._emit(refusal)
            return
        self._request(OfferRequest("IHAVE", message_id))

    def _check(self, command: Command) -> None:
        message_id = self._message_id_argument(command)
        if message_id is None:
            return
        refusal = self._refusal()
        if refusal is not None:
            self._emit(refusal)
            return
        self._request(OfferRequest("CHECK", message_id))

    def _takethis(self, command: Command) -> None:
        if not command.args:
            # Without a message-id there is no telling whether an article follows.
            self._emit(_usage("TAKETHIS <message-id>"))
            return
        message_id = command.args[0]
        refusal = None
        if len(command.args) != 1 or not is_message_id(message_id):
            refusal = Response(439, f"{message_id[:250]} Bad message-id; use TAKETHIS <message-id>")
        else:
            refusal = self._refusal()
        self._start_article("TAKETHIS", message_id, refusal)


_SERVER_COMMANDS: dict[str, Callable[[ServerCodec, Command], None]] = {
    "CAPABILITIES": ServerCodec._capabilities,
    "HELP": ServerCodec._help,
    "DATE": ServerCodec._date,
    "QUIT": ServerCodec._quit,
    "MODE": ServerCodec._mode,
    "AUTHINFO": ServerCodec._authinfo,
    "POST": ServerCodec._post,
    "IHAVE": ServerCodec._ihave,
    "CHECK": ServerCodec._check,
    "TAKETHIS": ServerCodec._takethis,
    "STARTTLS": ServerCodec._starttls,
}
