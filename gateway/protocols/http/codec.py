"""HTTP/1.1 message framing (RFC 9112) as a sans-io state machine, for both ends of the proxy.

Feed bytes with ``receive``, take events with ``next_event``: a ``Head``, body
data as ``bytes``, ``END`` when a message is complete, or ``None`` when more
bytes are needed.  Anything ambiguous about where a message ends (the ground of
request smuggling: two Content-Length fields, Content-Length beside
Transfer-Encoding, a bad chunk) raises ``ParseError`` with the status to answer.
Nothing here imports Twisted.
"""

from __future__ import annotations

import http
import re
from dataclasses import dataclass

__all__ = [
    "END",
    "HOP_BY_HOP",
    "REASONS",
    "Head",
    "ParseError",
    "RequestReader",
    "ResponseReader",
    "chunk",
    "response_head",
]

# Reason phrases: the standard library's, with the names RFC 9110 gave some anew.
REASONS = {status.value: status.phrase for status in http.HTTPStatus} | {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}

# RFC 9110 section 7.6.1: fields that describe one connection, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    }
)  # fmt: skip


class ParseError(Exception):
    """The peer sent something that is not HTTP/1.1; ``status`` is the answer it deserves."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()


@dataclass(slots=True)
class Head:
    """A request or status line with its header fields (names as sent, values stripped)."""

    method: bytes  # requests; b"" for responses
    target: bytes  # requests
    version: bytes  # b"HTTP/1.1" or b"HTTP/1.0"
    status: int  # responses; 0 for requests
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    # The body: -1 chunked, -2 until the connection closes, otherwise its length.
    length: int
    expect_continue: bool = False
    host: bytes = b""
    connection_tokens: frozenset[bytes] = frozenset()
    # The field names in lower case, in the order of ``headers`` (set by the readers;
    # None when a Head is built elsewhere: then ``lower_names()`` makes them).
    names: list[bytes] | None = None

    def lower_names(self) -> list[bytes]:
        names = self.names
        if names is None or len(names) != len(self.headers):
            names = self.names = [n.lower() for n, _ in self.headers]
        return names

    @property
    def chunked(self) -> bool:
        return self.length == -1


CHUNKED = -1
UNTIL_CLOSE = -2

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(_TCHAR + rb"+\Z")
# Header fields, each line ending with LF (CR before it optional; a bare CR is refused).
# Values: tab, visible ASCII, space and obs-text; no control character, no bare CR.
_FIELDS = re.compile(rb"(?:" + _TCHAR + rb"+:[\t\x20-\x7e\x80-\xff]*\r?\n)*\Z")
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# In a chunk extension or a status line: any control character but tab (a bare CR too:
# some parsers end the line there, and would read the message differently).
_EXT_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"host", b"expect"})
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
# RFC 9112 section 3.2: Host is uri-host [":" port] (an IP literal or a reg-name).
_HOST = re.compile(rb"(?:\[[0-9A-Za-z:.%\-_~]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?\Z")
_DIGITS = re.compile(rb"[0-9]{1,18}\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}\Z")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])\Z")
# Lines most requests and responses have, taken without regular expressions.
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
_STATUS_CODES = frozenset(b"%d" % code for code in range(100, 600))
_NO_TOKENS: frozenset[bytes] = frozenset()

# Head parsing states
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _DONE, _CLOSED = range(8)


class _Reader:
    """What requests and responses share: the buffer, body framing and chunked decoding."""

    def __init__(self, max_header_size: int) -> None:
        self.max_header_size = max_header_size
        self._buf = b""
        self._state = _HEAD
        self._remaining = 0
        self._trailer_size = 0
        self.eof = False

    def receive(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
        else:
            self._buf = data

    def receive_eof(self) -> None:
        self.eof = True

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def idle(self) -> bool:
        """Between messages with nothing buffered (safe to reuse or close the connection)."""
        return self._state == _HEAD and not self._buf

    @property
    def in_body(self) -> bool:
        return self._state not in (_HEAD, _DONE, _CLOSED)

    def _parse_head(self) -> Head | None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        sep = 4
        if end < 0:
            lf = buf.find(b"\n\n")
            if lf >= 0:
                end, sep = lf, 2
        if end < 0 or end > self.max_header_size:
            if end > self.max_header_size or len(buf) > self.max_header_size:
                first_nl = buf.find(b"\n")
                if self._requests and (first_nl < 0 or first_nl > self.max_header_size):
                    raise ParseError(414, "the request line is too long")
                raise ParseError(431, "the request header is too large")
            if self.eof:
                if buf.strip():
                    raise ParseError(400, "the connection closed in the middle of a header")
                self._state = _CLOSED
            return None
        block = buf[:end]
        self._buf = buf[end + sep :]
        # Blank lines before a request are allowed (RFC 9112 section 2.2).
        if self._requests:
            block = block.lstrip(b"\r\n")
        nl = block.find(b"\n")
        if nl < 0:
            head = self._first_line(block.removesuffix(b"\r"))
            head.names = []
            self._frame(head, [])
            return head
        head = self._first_line(block[:nl].removesuffix(b"\r"))
        # The fields are checked by one whole-block regular expression: one pass in C
        # instead of a loop of small steps per line.
        fields = block[nl + 1 :] + b"\n"
        if _FIELDS.match(fields) is None:
            _bad_line(fields)
        # Checked: every line is "name:value" ending with LF, a CR only right before it,
        # so bytes methods split it (cheaper than a findall with groups).  Each name is
        # lowered once, here; the fields that frame the message are picked on the way.
        found: list[tuple[bytes, bytes]] = []
        names: list[bytes] = []
        framing: list[tuple[bytes, bytes]] = []
        for line in fields.split(b"\n"):
            name, _, value = line.partition(b":")
            value = value.strip(b" \t\r")
            found.append((name, value))
            lower = name.lower()
            names.append(lower)
            if lower in _FRAMING:
                framing.append((lower, value))
        found.pop()  # the empty piece after the last LF
        names.pop()
        head.headers = found
        head.names = names
        self._frame(head, framing)
        return head

    _requests = False

    def _first_line(self, line: bytes) -> Head:
        raise NotImplementedError

    def _frame(self, head: Head, framing: list[tuple[bytes, bytes]]) -> None:
        """Read the fields of ``framing`` (lower-case name, value) that frame the message."""
        lengths: list[bytes] = []
        codings: list[bytes] = []
        connection: list[bytes] = []
        hosts: list[bytes] = []
        for lower, value in framing:
            if lower == b"content-length":
                lengths.append(value)
            elif lower == b"transfer-encoding":
                codings.extend(v.strip().lower() for v in value.split(b","))
            elif lower == b"connection":
                if b"," not in value:  # one token, as almost always ("keep-alive", "close")
                    if value:
                        connection.append(value.lower())
                else:
                    connection.extend(v.strip().lower() for v in value.split(b",") if v.strip())
            elif lower == b"host":
                hosts.append(value)
            elif lower == b"expect" and value.lower() == b"100-continue":
                head.expect_continue = True
        tokens = frozenset(connection) if connection else _NO_TOKENS
        head.connection_tokens = tokens
        if head.version == b"HTTP/1.1":
            head.keep_alive = b"close" not in tokens
        else:
            head.keep_alive = b"keep-alive" in tokens and b"close" not in tokens
            # RFC 9110 section 10.1.1: ignored in HTTP/1.0 (it would take the 100 as the answer).
            head.expect_continue = False
        if self._requests:
            if len(hosts) > 1:
                raise ParseError(400, "more than one Host header field")
            if not hosts and head.version == b"HTTP/1.1":
                raise ParseError(400, "an HTTP/1.1 request needs a Host header field")
            head.host = hosts[0] if hosts else b""
            if head.host and _HOST.match(head.host) is None:
                raise ParseError(400, f"invalid Host {head.host[:60]!r}")
        self._frame_body(head, lengths, codings)

    def _frame_body(self, head: Head, lengths: list[bytes], codings: list[bytes]) -> None:
        if codings:
            if lengths:
                raise ParseError(400, "both Content-Length and Transfer-Encoding are present")
            if head.version != b"HTTP/1.1":
                raise ParseError(400, "Transfer-Encoding in an HTTP/1.0 message")
            if codings[-1] != b"chunked":
                if self._requests:
                    raise ParseError(400, "the request body's last transfer coding is not chunked")
                head.length = UNTIL_CLOSE
                head.keep_alive = False
                return
            if codings != [b"chunked"]:
                raise ParseError(501, "transfer codings other than chunked are not supported")
            head.length = CHUNKED
            return
        if lengths:
            if len(lengths) > 1 and (self._requests or len(set(lengths)) > 1):
                raise ParseError(400, "more than one Content-Length header field")
            if _DIGITS.match(lengths[0]) is None:
                raise ParseError(400, f"invalid Content-Length {lengths[0][:30]!r}")
            head.length = int(lengths[0])
            return
        head.length = 0 if self._requests else UNTIL_CLOSE

    def _start_body(self, head: Head) -> None:
        if head.length == CHUNKED:
            self._state = _CHUNK_SIZE
        elif head.length == UNTIL_CLOSE:
            self._state = _BODY
            self._remaining = -1
        elif head.length > 0:
            self._state = _BODY
            self._remaining = head.length
        else:
            self._state = _DONE

    def next_event(self) -> Head | bytes | _End | None:
        """The next event, or None until more bytes arrive; raises ParseError."""
        state = self._state
        if state == _HEAD:
            return self._next_head()
        if state == _BODY:
            buf = self._buf
            if not buf:
                if self.eof:
                    if self._remaining < 0:
                        self._state = _DONE
                        return END
                    raise ParseError(400, "the connection closed in the middle of a body")
                return None
            if self._remaining < 0:
                self._buf = b""
                return buf
            if len(buf) <= self._remaining:
                self._buf = b""
                self._remaining -= len(buf)
                if self._remaining == 0:
                    self._state = _DONE
                return buf
            data = buf[: self._remaining]
            self._buf = buf[self._remaining :]
            self._remaining = 0
            self._state = _DONE
            return data
        if state == _DONE:
            self._state = _HEAD
            return END
        if state == _CLOSED:
            return None
        return self._chunked()

    def _next_head(self) -> Head | None:
        raise NotImplementedError

    def _chunked(self) -> bytes | _End | None:
        while True:
            state = self._state
            buf = self._buf
            if state == _CHUNK_SIZE:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > 4096:
                        raise ParseError(400, "a chunk size line is too long")
                    self._need_more("chunk size")
                    return None
                if nl > 4096:
                    raise ParseError(400, "a chunk size line is too long")
                line = buf[:nl]
                if not line.endswith(b"\r"):
                    raise ParseError(400, "a chunk size line does not end with CRLF")
                self._buf = buf[nl + 1 :]
                if b";" in line and _EXT_CTL.search(line, 0, len(line) - 1) is not None:
                    raise ParseError(400, "a control character in a chunk extension")
                size = line[:-1].split(b";", 1)[0].rstrip(b" \t")
                if _HEX.match(size) is None:
                    raise ParseError(400, f"invalid chunk size {size[:20]!r}")
                self._remaining = int(size, 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILER
                self._trailer_size = 0
            elif state == _CHUNK_DATA:
                if not buf:
                    self._need_more("chunk")
                    return None
                if len(buf) <= self._remaining:
                    self._buf = b""
                    self._remaining -= len(buf)
                    data = buf
                else:
                    data = buf[: self._remaining]
                    self._buf = buf[self._remaining :]
                    self._remaining = 0
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
                return data
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    if buf and buf != b"\r":
                        raise ParseError(400, "chunk data is not followed by CRLF")
                    self._need_more("chunk")
                    return None
                if buf[:2] != b"\r\n":
                    raise ParseError(400, "chunk data is not followed by CRLF")
                self._buf = buf[2:]
                self._state = _CHUNK_SIZE
            else:  # _TRAILER: fields after the last chunk are read and dropped
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) + self._trailer_size > self.max_header_size:
                        raise ParseError(431, "the trailer section is too large")
                    self._need_more("trailer")
                    return None
                line = buf[:nl]
                self._buf = buf[nl + 1 :]
                self._trailer_size += nl + 1
                if self._trailer_size > self.max_header_size:
                    raise ParseError(431, "the trailer section is too large")
                if line in (b"", b"\r"):
                    self._state = _HEAD
                    return END
                if b":" not in line:
                    raise ParseError(400, "malformed trailer line")

    def _need_more(self, what: str) -> None:
        if self.eof:
            raise ParseError(400, f"the connection closed in the middle of a {what}")


def _bad_line(fields: bytes) -> None:
    """Raise the ParseError that names the first malformed header line."""
    bad = _CTL.search(fields)
    if bad is not None:
        raise ParseError(400, f"control character {bad.group()!r} in a header field")
    if fields.count(b"\r") != fields.count(b"\r\n"):
        raise ParseError(400, "a carriage return alone in a header field")
    for raw in fields.split(b"\n")[:-1]:
        line = raw.removesuffix(b"\r")
        colon = line.find(b":")
        if line[:1] in (b" ", b"\t"):
            raise ParseError(400, "folded header lines (obs-fold) are not accepted")
        if colon <= 0:
            raise ParseError(400, f"malformed header line {line[:60]!r}")
        if _TOKEN.match(line[:colon]) is None:
            raise ParseError(400, f"malformed header field name {line[:colon][:60]!r}")
    raise ParseError(400, "malformed header section")


# absolute-form: scheme "://" authority, then a path or nothing (the listener and the
# proxy take the authority up to the first "/").
_ABSOLUTE = re.compile(rb"https?://([^/?#]*)(?:/|\Z)", re.IGNORECASE)


def _other_target_ok(method: bytes, target: bytes) -> bool:
    """Whether a target not in origin-form has one of the other forms (RFC 9112 3.2)."""
    if method == b"CONNECT":
        return True  # authority-form; the listener refuses CONNECT itself
    if target == b"*":
        return method == b"OPTIONS"
    m = _ABSOLUTE.match(target)
    return m is not None and _HOST.match(m.group(1)) is not None


class RequestReader(_Reader):
    """Reads requests on the server side of a connection."""

    _requests = True

    def _first_line(self, line: bytes) -> Head:
        parts = line.split(b" ")
        if len(parts) != 3:
            raise ParseError(400, f"malformed request line {line[:80]!r}")
        method, target, version = parts
        if _TARGET.match(target) is None:
            raise ParseError(400, "malformed request target")
        if target[0] != 0x2F and not _other_target_ok(method, target):  # not "/..."
            raise ParseError(400, f"malformed request target {target[:80]!r}")
        if method in _METHODS and version == b"HTTP/1.1":
            return Head(method, target, version, 0, b"", [], True, 0)
        if _TOKEN.match(method) is None:
            raise ParseError(400, f"malformed method {method[:20]!r}")
        m = _VERSION.match(version)
        if m is None:
            raise ParseError(400, f"malformed HTTP version {version[:20]!r}")
        if m.group(1) != b"1":
            raise ParseError(505, f"HTTP version {version.decode()} is not supported")
        if version != b"HTTP/1.0":
            version = b"HTTP/1.1"
        return Head(method, target, version, 0, b"", [], True, 0)

    def _next_head(self) -> Head | None:
        head = self._parse_head()
        if head is not None:
            self._start_body(head)
        return head


class ResponseReader(_Reader):
    """Reads responses on the client side; ``expect(method)`` before each response."""

    def __init__(self, max_header_size: int = 64 * 1024) -> None:
        super().__init__(max_header_size)
        self._method = b"GET"

    def expect(self, method: bytes) -> None:
        self._method = method

    def _first_line(self, line: bytes) -> Head:
        if _EXT_CTL.search(line) is not None:  # the reason is passed on: no bare CR in it
            raise ParseError(502, f"control character in the status line {line[:80]!r}")
        parts = line.split(b" ", 2)
        if len(parts) == 3 and parts[0] == b"HTTP/1.1" and parts[1] in _STATUS_CODES:
            return Head(b"", b"", b"HTTP/1.1", int(parts[1]), parts[2], [], True, 0)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not _VERSION.match(parts[0]):
            raise ParseError(502, f"malformed status line {line[:80]!r}")
        if len(parts[1]) != 3 or not parts[1].isdigit() or parts[1][0] == 0x30:  # 100-999
            raise ParseError(502, f"malformed status code {parts[1][:10]!r}")
        version = b"HTTP/1.0" if parts[0] == b"HTTP/1.0" else b"HTTP/1.1"
        reason = parts[2] if len(parts) > 2 else b""
        return Head(b"", b"", version, int(parts[1]), reason, [], True, 0)

    def _next_head(self) -> Head | None:
        try:
            head = self._parse_head()
        except ParseError as exc:
            raise ParseError(502, f"the upstream sent a malformed response: {exc.reason}") from None
        if head is None:
            return None
        status = head.status
        if 100 <= status < 200:
            if status == 101:
                raise ParseError(502, "the upstream switched protocols; that is not proxied")
            return head  # interim: the caller skips it and asks again
        if self._method == b"HEAD" or status in (204, 304):
            head.length = 0
            if status == 204:
                names = head.lower_names()
                keep = [i for i, n in enumerate(names) if n != b"content-length"]
                head.headers = [head.headers[i] for i in keep]
                head.names = [names[i] for i in keep]
        self._start_body(head)
        return head


def response_head(
    status: int, headers: list[tuple[bytes, bytes]], version: bytes = b"HTTP/1.1"
) -> bytes:
    """A status line and header block, ready to write."""
    reason = REASONS.get(status, "Unknown").encode()
    line = b"%s %d %s\r\n" % (version, status, reason)
    return b"".join([line, *[b"%s: %s\r\n" % field for field in headers], b"\r\n"])


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)
