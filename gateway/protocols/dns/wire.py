"""Sans-io DNS wire format for the forwarding hot path: header and question, TTLs, truncation.

Packets stay ``bytes``; only the header, the question and record boundaries are read, so that
forwarding and cache hits never build per-record objects. Full parsing is left to dnspython.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "AA",
    "AAAA",
    "AD",
    "ANY",
    "AXFR",
    "BADVERS",
    "CD",
    "CLASS_IN",
    "CNAME",
    "COOKIE",
    "ECS",
    "EDNS_UDP_SIZE",
    "FORMERR",
    "IXFR",
    "MX",
    "NOERROR",
    "NOTIMP",
    "NS",
    "NXDOMAIN",
    "OPT",
    "PTR",
    "QR",
    "RA",
    "RD",
    "REFUSED",
    "SERVFAIL",
    "SOA",
    "TC",
    "TXT",
    "A",
    "BadVersion",
    "CacheKey",
    "OptError",
    "Question",
    "ResponseInfo",
    "WireError",
    "adjust_ttls",
    "ecs_scope",
    "error_response",
    "extended_rcode",
    "inspect_response",
    "is_truncated",
    "like_query",
    "min_ttl",
    "negative_ttl",
    "parse_query",
    "parse_response_question",
    "rcode",
    "set_ttls",
    "truncate",
    "ttl_offsets",
    "with_id",
    "without_option",
]

# RCODEs (RFC 1035 §4.1.1).
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16  # extended, needs an OPT record (RFC 6891 §9)

# RR types (RFC 1035 §3.2.2, RFC 3596, RFC 6891, RFC 1995, RFC 5936) and the class we serve.
A = 1
NS = 2
CNAME = 5
SOA = 6
PTR = 12
MX = 15
TXT = 16
AAAA = 28
OPT = 41
IXFR = 251
AXFR = 252
ANY = 255
CLASS_IN = 1
COOKIE = 10  # EDNS option code (RFC 7873)
ECS = 8  # EDNS Client Subnet option code (RFC 7871)

# Header flag bits (RFC 1035 §4.1.1, RFC 4035 §3.2 for AD/CD).
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010
_OPCODE_MASK = 0x7800
_DO = 0x8000  # in the OPT TTL field (RFC 3225)
_VERSION = 0x00FF0000  # the EDNS version, also in the OPT TTL field (RFC 6891 §6.1.3)

# What we advertise in OPT records we write: the DNS Flag Day 2020 value, which avoids
# IP fragmentation on nearly every path.
EDNS_UDP_SIZE = 1232

MAX_NAME_OCTETS = 255  # RFC 1035 §2.3.4, on the wire, length octets and root included
MAX_LABEL_OCTETS = 63

_HEADER = struct.Struct(">HHHHHH")
_COUNTS = struct.Struct(">HHHH")
_TYPE_CLASS = struct.Struct(">HH")
_RR_FIXED = struct.Struct(">HHIH")  # type, class, ttl, rdlength
_ID = struct.Struct(">H")
_U32 = struct.Struct(">I")

# Key for caches: lower-cased qname, qtype, qclass, DO bit.
# name, type, class, DO bit, and whether the query had EDNS and CD: an answer cached for
# one kind of query carries that query's OPT record and checking flags (RFC 6891 6.1.1).
CacheKey = tuple[str, int, int, bool, bool, bool]


class WireError(Exception):
    """A packet that is not valid DNS for the purpose at hand.

    ``header_ok`` is True when the 12-byte header (and so the ID) could be read and answering
    FORMERR makes sense; False means drop the packet: it is too short to answer, or it is a
    response, and answering responses invites packet loops between two servers.
    """

    def __init__(self, message: str, *, header_ok: bool) -> None:
        super().__init__(message)
        self.header_ok = header_ok


class BadVersion(WireError):
    """A query with an EDNS version the gateway does not speak (RFC 6891 §6.1.3).

    ``question`` is the parsed query, for the BADVERS answer it must get.
    """

    def __init__(self, question: Question, version: int) -> None:
        super().__init__(f"EDNS version {version} is not supported", header_ok=True)
        self.question = question
        self.version = version


class OptError(WireError):
    """A problem with the query's OPT record itself (RFC 6891 §7): FORMERR, with an OPT record.

    ``question`` is the query with ``edns`` set, for error_response(), so that the client can
    tell a format error in its EDNS from a server without EDNS.
    """

    def __init__(self, message: str, *, do: bool = False) -> None:
        super().__init__(message, header_ok=True)
        self.do = do
        self.question: Question | None = None


class Question(NamedTuple):
    """What the hot path needs from a query: its header, its one question and its EDNS values.

    A named tuple rather than a dataclass: one is made per query, and building a tuple costs a
    fifth of what setting a frozen dataclass's fields does.
    """

    id: int
    flags: int
    opcode: int
    rd: bool
    cd: bool
    qname: str
    qtype: int
    qclass: int
    edns: bool
    udp_size: int
    do: bool
    question_end: int

    @property
    def key(self) -> CacheKey:
        return (self.qname, self.qtype, self.qclass, self.do, self.edns, self.cd)


class ResponseInfo(NamedTuple):
    """What a cache needs to know about a response, from one walk over its records.

    ``rcode`` includes the RFC 6891 extended bits; ``min_ttl`` and ``max_ttl`` are over every RR
    except OPT (None when there is none; a TTL with the top bit set counts as 0, RFC 2181 §8);
    ``negative_ttl`` is min(SOA TTL, SOA MINIMUM) of the first SOA in the authority section
    (RFC 2308 §5), None without one.
    """

    rcode: int
    truncated: bool
    answers: int
    ttl_offsets: list[int]
    min_ttl: int | None
    max_ttl: int | None
    negative_ttl: int | None


# --------------------------------------------------------------------------- names

# Bytes that dnspython's Name.to_text() prints as themselves: printable ASCII except the
# characters that are special in zone files. Everything else is escaped, as \X or \DDD, which
# keeps the text form one-to-one with the wire form.
_SPECIAL = b'"().;\\@$'
_PLAIN = bytes(c for c in range(0x21, 0x7F) if c not in _SPECIAL)


def _escape_label(label: bytes) -> str:
    parts = []
    for c in label:
        if c in _SPECIAL:
            parts.append("\\" + chr(c))
        elif 0x20 < c < 0x7F:
            parts.append(chr(c))
        else:
            parts.append(f"\\{c:03d}")
    return "".join(parts)


def _read_question_name(data: bytes, pos: int, size: int) -> tuple[str, int]:
    """Read the uncompressed name at ``pos``; return its lower-cased text and the offset after it.

    The question is the first name in a message, so a compression pointer there can only point
    into the header or loop back into the name itself: we refuse it rather than follow it.
    """
    start = pos
    labels = []
    while True:
        if pos >= size:
            raise WireError("the question name runs past the end of the packet", header_ok=True)
        length = data[pos]
        if length == 0:
            break
        if length > MAX_LABEL_OCTETS:
            if length >= 0xC0:
                raise WireError("compression pointer in the question name", header_ok=True)
            # 0x40 and 0x80 prefixes: extended label types, obsolete (RFC 6891 §5).
            raise WireError("unknown label type in the question name", header_ok=True)
        end = pos + 1 + length
        labels.append(data[pos + 1 : end])
        pos = end
        if pos - start >= MAX_NAME_OCTETS:  # the root octet still has to follow
            raise WireError("the question name is longer than 255 octets", header_ok=True)
    if not labels:
        return ".", pos + 1
    # DNS names compare case-insensitively in ASCII only (RFC 4343); bytes.lower() does that.
    raw = b".".join(labels).lower()
    # Fast path: deleting the plain bytes leaves only the separators when no label needs
    # escaping (a "." inside a label or any other odd byte would be left over too).
    if len(raw.translate(None, _PLAIN)) == len(labels) - 1:
        return raw.decode("ascii") + ".", pos + 1
    return "".join(_escape_label(label.lower()) + "." for label in labels), pos + 1


def _skip_name(data: bytes, pos: int, size: int) -> int:
    """Return the offset after the possibly compressed name at ``pos``, without following pointers.

    A pointer ends a name, so skipping needs no loop protection; the walk is bounded by ``size``.
    """
    while True:
        if pos >= size:
            raise WireError("a name runs past the end of the packet", header_ok=True)
        length = data[pos]
        if length == 0:
            return pos + 1
        if length > MAX_LABEL_OCTETS:
            if length >= 0xC0:
                if pos + 2 > size:
                    raise WireError("a compression pointer is cut off", header_ok=True)
                return pos + 2
            raise WireError("unknown label type", header_ok=True)
        pos += 1 + length


# --------------------------------------------------------------------------- queries


# Question names seen recently, wire form -> text. Most traffic repeats a few names, so this
# turns the label walk and escaping into one bytes.find() and one dict look-up. Only names whose
# sole zero octet is the final root label go in, which is what makes the look-up below sound:
# the wire bytes up to the first zero then are exactly the name. Cleared when full, so a flood
# of random names costs one dict insert each and bounded memory.
_NAME_MEMO: dict[bytes, str] = {}
_NAME_MEMO_SIZE = 4096


def _question_name(data: bytes, size: int) -> tuple[str, int]:
    end = data.find(0, 12) + 1
    if end:
        qname = _NAME_MEMO.get(data[12:end])
        if qname is not None:
            return qname, end
    qname, pos = _read_question_name(data, 12, size)
    if pos == end:
        if len(_NAME_MEMO) >= _NAME_MEMO_SIZE:
            _NAME_MEMO.clear()
        _NAME_MEMO[data[12:end]] = qname
    return qname, pos


_new_tuple = tuple.__new__


def parse_query(data: bytes) -> Question:
    """Read a query's header, its single question and its OPT record (RFC 1035, RFC 6891).

    Records in the answer and authority sections are skipped with bounds checks; bytes after
    the last record are ignored.
    """
    size = len(data)
    if size < 12:
        raise WireError("shorter than a DNS header", header_ok=False)
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & QR:
        raise WireError("a response where a query was expected", header_ok=False)
    if qdcount != 1:
        # RFC 9619: a query has exactly one question.
        raise WireError(f"a query with {qdcount} questions", header_ok=True)
    qname, pos = _question_name(data, size)
    question_end = pos + 4
    if question_end > size:
        raise WireError("the question is cut off", header_ok=True)
    qtype, qclass = _TYPE_CLASS.unpack_from(data, pos)

    edns = False
    udp_size = 512
    do = False
    version = 0
    try:
        if (
            arcount == 1
            and not ancount
            and not nscount
            and data[question_end : question_end + 3] == b"\x00\x00\x29"
        ):
            # The common shape: one root-owned OPT and nothing else.
            if question_end + 11 > size:
                raise OptError("the OPT record is cut off")
            _, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, question_end + 1)
            if question_end + 11 + rdlength > size:
                raise OptError("the OPT record's data is cut off", do=bool(ttl & _DO))
            if rdlength:
                _check_options(data, question_end + 11, rdlength, ttl)
            edns = True
            # RFC 6891 §6.2.3: values below 512 are treated as 512.
            udp_size = rclass if rclass > 512 else 512
            do = bool(ttl & _DO)
            version = ttl & _VERSION
        elif ancount or nscount or arcount:
            edns, udp_size, do, version = _find_opt(data, question_end, ancount + nscount, arcount)
    except OptError as exc:
        exc.question = Question(
            ident, flags, (flags & _OPCODE_MASK) >> 11, bool(flags & RD), bool(flags & CD),
            qname, qtype, qclass, True, 512, exc.do, question_end,
        )  # fmt: skip
        raise

    # tuple.__new__ skips the keyword handling of Question(...); the order is the fields'.
    question: Question = _new_tuple(
        Question,
        (
            ident,
            flags,
            (flags & _OPCODE_MASK) >> 11,
            bool(flags & RD),
            bool(flags & CD),
            qname,
            qtype,
            qclass,
            edns,
            udp_size,
            do,
            question_end,
        ),
    )
    if version:
        raise BadVersion(question, version >> 16)
    return question


def _find_opt(data: bytes, pos: int, skip: int, arcount: int) -> tuple[bool, int, bool, int]:
    """Walk ``skip`` records, then the additional section; (edns, udp_size, do, version bits)."""
    size = len(data)
    edns = False
    udp_size = 512
    do = False
    version = 0
    for index in range(skip + arcount):
        owner = pos
        pos = _skip_name(data, pos, size)
        if pos + 10 > size:
            raise WireError("a record is cut off", header_ok=True)
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
        pos += 10 + rdlength
        if pos > size:
            raise WireError("a record's data is cut off", header_ok=True)
        if rtype == OPT and index >= skip:
            # RFC 6891 §6.1.1: one OPT at most, owned by the root.
            if edns:
                raise OptError("more than one OPT record", do=do)
            if data[owner] != 0:
                raise OptError("an OPT record not owned by the root", do=bool(ttl & _DO))
            if rdlength:
                _check_options(data, pos - rdlength, rdlength, ttl)
            edns = True
            udp_size = rclass if rclass > 512 else 512
            do = bool(ttl & _DO)
            version = ttl & _VERSION
    return edns, udp_size, do, version


def _check_options(data: bytes, start: int, rdlength: int, ttl: int) -> None:
    """The OPT record's options (code, length, data) must fill its data exactly (RFC 6891 6.1.2)."""
    pos = start
    end = start + rdlength
    while pos < end:
        if pos + 4 > end:
            raise OptError("an EDNS option is cut off", do=bool(ttl & _DO))
        pos += 4 + ((data[pos + 2] << 8) | data[pos + 3])
    if pos != end:
        raise OptError("EDNS option lengths do not add up to the OPT record's", do=bool(ttl & _DO))


def error_response(query: bytes, rcode: int, question: Question | None) -> bytes:
    """An answer carrying only ``rcode``, for ``query`` (raw bytes) and its parsed question.

    The ID, opcode and RD are copied, QR and RA set; the question is echoed as the client wrote
    it, and an OPT record (size 1232, DO copied) added when the query had one (RFC 6891 §7).
    Without a question only the header is sent, with QDCOUNT 0, as for a FORMERR. Extended
    rcodes (BADVERS) carry their upper 8 bits in that OPT record, so need an EDNS query.
    """
    if not 0 <= rcode <= (0xFFF if question is not None and question.edns else 15):
        raise ValueError(f"rcode {rcode} does not fit the header; extended rcodes need an OPT")
    if len(query) < 12:
        raise WireError("shorter than a DNS header", header_ok=False)
    ident, flags = _TYPE_CLASS.unpack_from(query)
    # RD and CD are copied from the query (RFC 1035 4.1.1, RFC 4035 3.2.2).
    flags = QR | (flags & (_OPCODE_MASK | RD | CD)) | RA | (rcode & 0x0F)
    if question is None:
        return _HEADER.pack(ident, flags, 0, 0, 0, 0)
    header = _HEADER.pack(ident, flags, 1, 0, 0, 1 if question.edns else 0)
    body = query[12 : question.question_end]
    if not question.edns:
        return header + body
    return header + body + _opt_record(question.do, rcode >> 4)


def _opt_record(do: bool, extended_rcode: int = 0) -> bytes:
    ttl = (extended_rcode << 24) | (_DO if do else 0)
    return b"\x00" + _RR_FIXED.pack(OPT, EDNS_UDP_SIZE, ttl, 0)


# --------------------------------------------------------------------------- responses


def parse_response_question(data: bytes) -> tuple[int, str, int, int]:
    """(id, lower-cased qname, qtype, qclass) of a response, to match it to its query."""
    size = len(data)
    if size < 12:
        raise WireError("shorter than a DNS header", header_ok=False)
    ident, flags, qdcount = _HEADER.unpack_from(data)[:3]
    if not flags & QR:
        raise WireError("a query where a response was expected", header_ok=True)
    if qdcount != 1:
        raise WireError(f"a response with {qdcount} questions", header_ok=True)
    qname, pos = _read_question_name(data, 12, size)
    if pos + 4 > size:
        raise WireError("the question is cut off", header_ok=True)
    qtype, qclass = _TYPE_CLASS.unpack_from(data, pos)
    return ident, qname, qtype, qclass


def rcode(data: bytes) -> int:
    """The header's 4-bit RCODE only; extended_rcode() adds the OPT bits at the cost of a walk."""
    if len(data) < 12:
        raise WireError("shorter than a DNS header", header_ok=False)
    return data[3] & 0x0F


def is_truncated(data: bytes) -> bool:
    if len(data) < 12:
        raise WireError("shorter than a DNS header", header_ok=False)
    return bool(data[2] & 0x02)


def like_query(response: bytes, query: bytes, question_end: int) -> bytes:
    """A cached ``response`` with the question spelled as in ``query`` and its RD bit.

    The cache matches names case-insensitively, but a client that randomises the case of its
    question (0x20, as unbound's use-caps-for-id) checks that the answer repeats it exactly, and
    RD is copied from the query (RFC 1035 §4.1.1). ``question_end`` is the query's; a response
    whose question differs from the query's in more than ASCII case is returned as it is.
    """
    if response[12:question_end].lower() != query[12:question_end].lower():
        return response  # not the same question after all: leave it as it is
    return (
        response[:2]
        + bytes(((response[2] & ~0x01) | (query[2] & 0x01),))
        + response[3:12]
        + query[12:question_end]
        + response[question_end:]
    )


def without_option(response: bytes, code: int) -> bytes:
    """``response`` without the EDNS option ``code`` in its OPT record; itself when it has none.

    Options that cannot be read are left alone, and so is the response.
    """
    _, records = _walk(response)
    for section, rtype, _owner, ttl_offset, end in records:
        if section != 3 or rtype != OPT:
            continue
        pos = ttl_offset + 6  # the rdata: options, each code, length, data
        kept = []
        found = False
        while pos < end:
            if pos + 4 > end:
                return response
            option, length = _TYPE_CLASS.unpack_from(response, pos)
            after = pos + 4 + length
            if after > end:
                return response
            if option == code:
                found = True
            else:
                kept.append(response[pos:after])
            pos = after
        if not found:
            return response
        rdata = b"".join(kept)
        return response[: ttl_offset + 4] + _ID.pack(len(rdata)) + rdata + response[end:]
    return response


def ecs_scope(response: bytes) -> int | None:
    """The SCOPE PREFIX-LENGTH of the response's Client Subnet option (RFC 7871 §6), or None
    when it has none (or only one that cannot be read)."""
    _, records = _walk(response)
    for section, rtype, _owner, ttl_offset, end in records:
        if section != 3 or rtype != OPT:
            continue
        pos = ttl_offset + 6
        while pos + 4 <= end:
            option, length = _TYPE_CLASS.unpack_from(response, pos)
            if pos + 4 + length > end:
                return None
            if option == ECS and length >= 4:
                return response[pos + 7]  # after FAMILY (2) and SOURCE PREFIX-LENGTH (1)
            pos += 4 + length
    return None


def with_id(data: bytes, new_id: int) -> bytes:
    if len(data) < 12:
        raise WireError("shorter than a DNS header", header_ok=False)
    return _ID.pack(new_id) + data[2:]


# Record tuples from _walk: (section 1-3, type, offset of the owner name, offset of the TTL,
# offset after the record). The owner name ends at ttl_offset - 8, rdata starts at +6.
_Record = tuple[int, int, int, int, int]


def _walk(data: bytes) -> tuple[int, list[_Record]]:
    """Find every record's boundaries; return the offset after the question and the records."""
    size = len(data)
    if size < 12:
        raise WireError("shorter than a DNS header", header_ok=False)
    qdcount, ancount, nscount, arcount = _COUNTS.unpack_from(data, 4)
    pos = 12
    for _ in range(qdcount):
        pos = _skip_name(data, pos, size) + 4
        if pos > size:
            raise WireError("the question is cut off", header_ok=True)
    question_end = pos
    records: list[_Record] = []
    for section, count in ((1, ancount), (2, nscount), (3, arcount)):
        for _ in range(count):
            owner = pos
            pos = _skip_name(data, pos, size)
            if pos + 10 > size:
                raise WireError("a record is cut off", header_ok=True)
            rtype = (data[pos] << 8) | data[pos + 1]
            end = pos + 10 + ((data[pos + 8] << 8) | data[pos + 9])
            if end > size:
                raise WireError("a record's data is cut off", header_ok=True)
            records.append((section, rtype, owner, pos + 4, end))
            pos = end
    return question_end, records


def _ttl(data: bytes, offset: int) -> int:
    value: int = _U32.unpack_from(data, offset)[0]
    # RFC 2181 §8: a TTL with the top bit set is to be treated as zero.
    return 0 if value & 0x80000000 else value


def inspect_response(data: bytes) -> ResponseInfo:
    """Everything a cache decides on, from one walk; raises WireError on a malformed packet."""
    size = len(data)
    if size < 12:
        raise WireError("shorter than a DNS header", header_ok=False)
    qdcount, ancount, nscount, arcount = _COUNTS.unpack_from(data, 4)
    pos = 12
    for _ in range(qdcount):
        pos = _skip_name(data, pos, size) + 4
        if pos > size:
            raise WireError("the question is cut off", header_ok=True)
    first_authority = ancount
    first_additional = ancount + nscount
    ext = 0
    offsets = []
    lowest = 0xFFFFFFFF
    highest = -1
    negative: int | None = None
    unpack_from = _RR_FIXED.unpack_from
    # One loop with the common cases inlined: this runs for every answer that may be cached.
    for index in range(first_additional + arcount):
        if pos >= size:
            raise WireError("a record is cut off", header_ok=True)
        first = data[pos]
        if first >= 0xC0:  # owner compressed to a pointer, as in most answers
            pos += 2
        elif first == 0:
            pos += 1
        else:
            pos = _skip_name(data, pos, size)
        if pos + 10 > size:
            raise WireError("a record is cut off", header_ok=True)
        rtype, _, ttl, rdlength = unpack_from(data, pos)
        ttl_offset = pos + 4
        pos += 10 + rdlength
        if pos > size:
            raise WireError("a record's data is cut off", header_ok=True)
        if rtype == OPT:
            if index >= first_additional:
                ext = ttl >> 24
            continue
        offsets.append(ttl_offset)
        if ttl & 0x80000000:
            ttl = 0  # RFC 2181 §8
        lowest = min(lowest, ttl)
        highest = max(highest, ttl)
        if negative is None and rtype == SOA and first_authority <= index < first_additional:
            negative = _soa_negative_ttl(data, ttl_offset, pos, ttl)
    return ResponseInfo(
        rcode=(ext << 4) | (data[3] & 0x0F),
        truncated=bool(data[2] & 0x02),
        answers=ancount,
        ttl_offsets=offsets,
        min_ttl=lowest if offsets else None,
        max_ttl=highest if offsets else None,
        negative_ttl=negative,
    )


def _soa_negative_ttl(data: bytes, ttl_offset: int, end: int, ttl: int) -> int:
    # SOA rdata is MNAME, RNAME, then five 32-bit fields; MINIMUM is the last of them, so it can
    # be read from the end without decompressing the names (two names take 2 octets at least).
    if end - (ttl_offset + 6) < 22:
        raise WireError("an SOA record is too short", header_ok=True)
    return min(ttl, _ttl(data, end - 4))


def ttl_offsets(response: bytes) -> list[int]:
    """Offsets of the TTL field of every RR but OPT, whose TTL field holds flags (RFC 6891)."""
    _, records = _walk(response)
    return [record[3] for record in records if record[1] != OPT]


def min_ttl(response: bytes, offsets: list[int]) -> int | None:
    if not offsets:
        return None
    return min(_ttl(response, offset) for offset in offsets)


def negative_ttl(response: bytes) -> int | None:
    """min(SOA TTL, SOA MINIMUM) of the authority section's SOA (RFC 2308 §5); None without one."""
    _, records = _walk(response)
    for section, rtype, _owner, ttl_offset, end in records:
        if section == 2 and rtype == SOA:
            return _soa_negative_ttl(response, ttl_offset, end, _ttl(response, ttl_offset))
    return None


def extended_rcode(data: bytes) -> int:
    """The 12-bit RCODE: the header's 4 bits plus the upper 8 from the OPT record (RFC 6891)."""
    _, records = _walk(data)
    for section, rtype, _owner, ttl_offset, _end in records:
        if section == 3 and rtype == OPT:
            return (data[ttl_offset] << 4) | (data[3] & 0x0F)
    return data[3] & 0x0F


def adjust_ttls(response: bytes, offsets: list[int], elapsed: int, new_id: int) -> bytes:
    """A copy with ID ``new_id`` and every TTL at ``offsets`` lowered by ``elapsed`` (floor 0)."""
    buf = bytearray(response)
    _ID.pack_into(buf, 0, new_id)
    if elapsed > 0:
        unpack_from = _U32.unpack_from
        pack_into = _U32.pack_into
        for offset in offsets:
            ttl = unpack_from(buf, offset)[0]
            # Top bit set means zero (RFC 2181 §8).
            pack_into(buf, offset, 0 if ttl <= elapsed or ttl & 0x80000000 else ttl - elapsed)
    return bytes(buf)


def set_ttls(response: bytes, offsets: list[int], ttl: int, new_id: int) -> bytes:
    """A copy with ID ``new_id`` and every TTL at ``offsets`` set to ``ttl`` (for stale answers)."""
    buf = bytearray(response)
    _ID.pack_into(buf, 0, new_id)
    for offset in offsets:
        _U32.pack_into(buf, offset, ttl)
    return bytes(buf)


def truncate(response: bytes, limit: int) -> bytes:
    """``response`` if it fits in ``limit`` octets, else its header with TC=1 and its question.

    The OPT record is kept (RFC 6891 §7 wants it in every response to an EDNS query); if even
    that does not fit, its options go first, then the record itself.
    """
    if len(response) <= limit:
        return response
    question_end, records = _walk(response)
    ident, flags, qdcount = _HEADER.unpack_from(response)[:3]
    flags |= TC
    body = response[12:question_end]
    opt = next((r for r in records if r[0] == 3 and r[1] == OPT), None)
    if opt is not None:
        ttl_offset, end = opt[3], opt[4]
        # Rewritten with a plain root owner, so no compression pointer can dangle.
        full = b"\x00" + response[ttl_offset - 4 : end]
        for record in (full, full[:9] + b"\x00\x00"):
            out = _HEADER.pack(ident, flags, qdcount, 0, 0, 1) + body + record
            if len(out) <= limit:
                return out
    return _HEADER.pack(ident, flags, qdcount, 0, 0, 0) + body
