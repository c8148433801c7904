"""TFTP packets (RFC 1350) and option negotiation (RFC 2347, 2348, 2349, 7440).

Pure functions on bytes: parsing a packet gives a dataclass or raises
``TftpError`` with the error code the peer should be sent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

# Error codes (RFC 1350 section 5, RFC 2347 for 8).
NOT_DEFINED = 0
FILE_NOT_FOUND = 1
ACCESS_VIOLATION = 2
DISK_FULL = 3
ILLEGAL_OPERATION = 4
UNKNOWN_TID = 5
FILE_EXISTS = 6
NO_SUCH_USER = 7
OPTION_REFUSED = 8

DEFAULT_BLKSIZE = 512
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464  # RFC 2348
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255  # RFC 2349, seconds
MIN_WINDOW, MAX_WINDOW = 1, 65535  # RFC 7440
MODES = ("octet", "netascii")  # "mail" is obsolete (RFC 1350: not to be used)


class TftpError(Exception):
    """A request or packet that gets an ERROR packet with ``code``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass(frozen=True)
class Request:
    """A read (RRQ) or write (WRQ) request."""

    opcode: int
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)  # names lower-case, as sent

    @property
    def is_read(self) -> bool:
        return self.opcode == RRQ


@dataclass(frozen=True)
class Data:
    block: int
    data: bytes


@dataclass(frozen=True)
class Ack:
    block: int


@dataclass(frozen=True)
class Error:
    code: int
    text: str


@dataclass(frozen=True)
class OptionAck:
    options: dict[str, str]


Packet = Request | Data | Ack | Error | OptionAck


def _strings(data: bytes) -> list[str]:
    """NUL-terminated strings (the last must be terminated too)."""
    if not data.endswith(b"\0"):
        raise TftpError(ILLEGAL_OPERATION, "malformed packet: a field is not NUL-terminated")
    try:
        return data[:-1].decode("ascii").split("\0")
    except UnicodeDecodeError:
        raise TftpError(ILLEGAL_OPERATION, "malformed packet: a field is not ASCII") from None


def parse(packet: bytes) -> Packet:
    if len(packet) < 4:
        raise TftpError(ILLEGAL_OPERATION, "malformed packet: too short")
    (opcode,) = struct.unpack("!H", packet[:2])
    body = packet[2:]
    if opcode in (RRQ, WRQ):
        fields = _strings(body)
        if len(fields) < 2 or len(fields) % 2:
            raise TftpError(ILLEGAL_OPERATION, "malformed request: expected name, mode, options")
        filename, mode = fields[0], fields[1].lower()
        if not filename:
            raise TftpError(ILLEGAL_OPERATION, "the request names no file")
        if mode not in MODES:
            raise TftpError(ILLEGAL_OPERATION, f"unknown transfer mode '{fields[1]}'")
        options: dict[str, str] = {}
        for name, value in zip(fields[2::2], fields[3::2], strict=True):
            options.setdefault(name.lower(), value)
        return Request(opcode, filename, mode, options)
    if opcode == DATA:
        (block,) = struct.unpack("!H", body[:2])
        return Data(block, body[2:])
    if opcode == ACK:
        (block,) = struct.unpack("!H", body[:2])
        return Ack(block)
    if opcode == ERROR:
        (code,) = struct.unpack("!H", body[:2])
        text = body[2:].split(b"\0", 1)[0].decode("ascii", "replace")
        return Error(code, text)
    if opcode == OACK:
        fields = _strings(body) if body else []
        if len(fields) % 2:
            raise TftpError(ILLEGAL_OPERATION, "malformed option acknowledgement")
        return OptionAck({n.lower(): v for n, v in zip(fields[::2], fields[1::2], strict=True)})
    raise TftpError(ILLEGAL_OPERATION, f"unknown opcode {opcode}")


def data(block: int, payload: bytes) -> bytes:
    return struct.pack("!HH", DATA, block & 0xFFFF) + payload


def ack(block: int) -> bytes:
    return struct.pack("!HH", ACK, block & 0xFFFF)


def error(code: int, text: str) -> bytes:
    return struct.pack("!HH", ERROR, code) + text.encode("ascii", "replace") + b"\0"


def oack(options: dict[str, str]) -> bytes:
    body = b"".join(f"{k}\0{v}\0".encode("ascii") for k, v in options.items())
    return struct.pack("!H", OACK) + body


def request(opcode: int, filename: str, mode: str = "octet", **options: str) -> bytes:
    fields = [filename, mode, *(x for kv in options.items() for x in kv)]
    return struct.pack("!H", opcode) + b"".join(f.encode("ascii") + b"\0" for f in fields)


@dataclass(frozen=True)
class Terms:
    """What a transfer uses after negotiation, and the OACK that says so (None: no OACK)."""

    blksize: int = DEFAULT_BLKSIZE
    timeout: float | None = None  # None: the listener's own
    windowsize: int = 1
    tsize: int | None = None  # write requests: the size the client announced
    reply: dict[str, str] | None = None


def negotiate(req: Request, size: int | None, *, max_blksize: int, max_windowsize: int) -> Terms:
    """The options of ``req`` this server takes (RFC 2347: unknown or out-of-range ones are
    left out of the OACK, which is then not sent at all if nothing is left).

    ``size`` is the file's size for a read (``tsize`` is answered only when it is
    known, and never for netascii, whose size on the wire differs).
    """
    reply: dict[str, str] = {}
    blksize, timeout, windowsize, tsize = DEFAULT_BLKSIZE, None, 1, None
    for name, value in req.options.items():
        number = _number(value)
        if number is None:
            continue
        if name == "blksize" and number >= MIN_BLKSIZE:
            blksize = min(number, max_blksize, MAX_BLKSIZE)
            reply[name] = str(blksize)
        elif name == "timeout" and MIN_TIMEOUT <= number <= MAX_TIMEOUT:
            timeout = float(number)
            reply[name] = str(number)
        elif name == "windowsize" and number >= MIN_WINDOW:
            windowsize = min(number, max_windowsize, MAX_WINDOW)
            reply[name] = str(windowsize)
        elif name == "tsize":
            if req.is_read and size is not None and req.mode == "octet":
                reply[name] = str(size)
            elif not req.is_read:
                tsize = number
                reply[name] = str(number)
    return Terms(blksize, timeout, windowsize, tsize, reply or None)


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) < 12 else None


class NetasciiEncoder:
    """Bytes to netascii (RFC 764): LF becomes CR LF, a lone CR becomes CR NUL."""

    def encode(self, chunk: bytes) -> bytes:
        return chunk.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


class NetasciiDecoder:
    """Netascii to bytes with LF line ends; a CR at a chunk's end waits for the next."""

    def __init__(self) -> None:
        self._cr = False

    def decode(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            self._cr = True
            chunk = chunk[:-1]
        return chunk.replace(b"\r\n", b"\n").replace(b"\r\0", b"\r")

    def flush(self) -> bytes:
        out = b"\r" if self._cr else b""
        self._cr = False
        return out
