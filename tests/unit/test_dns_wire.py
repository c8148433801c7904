"""Tests for the sans-io DNS wire codec, with dnspython as the oracle for every packet."""

from __future__ import annotations

import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocols.dns import wire
from gateway.protocols.dns.wire import (
    FORMERR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    Question,
    WireError,
    adjust_ttls,
    error_response,
    extended_rcode,
    inspect_response,
    is_truncated,
    min_ttl,
    negative_ttl,
    parse_query,
    parse_response_question,
    rcode,
    set_ttls,
    truncate,
    ttl_offsets,
    with_id,
)

# --------------------------------------------------------------------------- helpers


def header(
    ident: int = 0x1234,
    flags: int = 0x0100,
    qd: int = 1,
    an: int = 0,
    ns: int = 0,
    ar: int = 0,
) -> bytes:
    return struct.pack(">HHHHHH", ident, flags, qd, an, ns, ar)


def encode_name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


QUESTION_A = encode_name(b"www", b"example", b"test") + struct.pack(">HH", 1, 1)


def opt_rr(size: int = 1232, flags: int = 0, rdata: bytes = b"", owner: bytes = b"\x00") -> bytes:
    return owner + struct.pack(">HHIH", 41, size, flags, len(rdata)) + rdata


def oracle_text(name: dns.name.Name) -> str:
    return name.canonicalize().to_text()


def query_wire(
    name: str | dns.name.Name = "www.example.test.", rdtype: str = "A", **kw: object
) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()  # type: ignore[arg-type]


def response_with(
    qname: str = "www.example.test.",
    answer: list[tuple[str, int, str, list[str]]] | None = None,
    authority: list[tuple[str, int, str, list[str]]] | None = None,
    additional: list[tuple[str, int, str, list[str]]] | None = None,
    *,
    use_edns: int | bool = 0,
    rcode_value: int = 0,
) -> dns.message.Message:
    query = dns.message.make_query(qname, "A", use_edns=use_edns)
    response = dns.message.make_response(query)
    for section, entries in (
        (response.answer, answer),
        (response.authority, authority),
        (response.additional, additional),
    ):
        for owner, ttl, rdtype, texts in entries or []:
            section.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, *texts))
    response.set_rcode(dns.rcode.Rcode.make(rcode_value))
    return response


def ttls_seen_by_dnspython(data: bytes) -> list[int]:
    message = dns.message.from_wire(data, one_rr_per_rrset=True)
    return [
        rrset.ttl
        for section in (message.answer, message.authority, message.additional)
        for rrset in section
    ]


def ttls_at(data: bytes, offsets: list[int]) -> list[int]:
    return [struct.unpack_from(">I", data, offset)[0] for offset in offsets]


# Names as dnspython sees them: any bytes in labels, at most 255 octets on the wire.
labels_st = st.lists(st.binary(min_size=1, max_size=63), max_size=8)
names_st = labels_st.filter(lambda ls: sum(len(x) + 1 for x in ls) + 1 <= 255).map(
    lambda ls: dns.name.Name([*ls, b""])
)


def assert_wire_error_or_question(data: bytes) -> None:
    try:
        result = parse_query(data)
    except WireError:
        return
    assert isinstance(result, Question)


# --------------------------------------------------------------------------- parse_query


def test_typical_edns_query() -> None:
    data = query_wire(
        "WWW.Example.TEST.", "AAAA", use_edns=0, payload=1232, want_dnssec=True, id=4321
    )
    q = parse_query(data)
    assert q.id == 4321
    assert q.qname == "www.example.test."
    assert (q.qtype, q.qclass) == (28, 1)
    assert q.edns and q.do and q.udp_size == 1232
    assert q.rd and not q.cd and q.opcode == 0
    assert q.flags == struct.unpack_from(">H", data, 2)[0]
    assert q.question_end == 12 + len(encode_name(b"www", b"example", b"test")) + 4
    assert q.key == ("www.example.test.", 28, 1, True, True, False)


def test_query_without_edns_defaults_to_512() -> None:
    q = parse_query(query_wire(use_edns=False))
    assert not q.edns and not q.do and q.udp_size == 512


@pytest.mark.parametrize(
    ("payload", "expected"), [(0, 512), (511, 512), (512, 512), (4096, 4096), (65535, 65535)]
)
def test_udp_size_is_clamped(payload: int, expected: int) -> None:
    assert parse_query(query_wire(use_edns=0, payload=payload)).udp_size == expected


def test_flags_opcode_and_cd() -> None:
    message = dns.message.make_query("example.test.", "A")
    message.flags = dns.flags.CD
    message.set_opcode(dns.opcode.NOTIFY)
    q = parse_query(message.to_wire())
    assert q.opcode == 4 and q.cd and not q.rd


def test_root_name() -> None:
    q = parse_query(query_wire(".", "NS"))
    assert q.qname == "." and q.qtype == 2


def test_edns_options_are_skipped_and_answer_records_tolerated() -> None:
    cookie = dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * 8)
    data = query_wire(use_edns=0, payload=1400, options=[cookie])
    assert parse_query(data).udp_size == 1400
    # A query with an answer and an authority record before the OPT (unusual, but legal).
    message = dns.message.make_query(
        "example.test.", "A", use_edns=0, payload=2048, want_dnssec=True
    )
    message.answer.append(dns.rrset.from_text("example.test.", 60, "IN", "A", "192.0.2.1"))
    message.authority.append(
        dns.rrset.from_text("example.test.", 60, "IN", "NS", "ns.example.test.")
    )
    q = parse_query(message.to_wire())
    assert q.edns and q.do and q.udp_size == 2048


def test_opt_with_other_additional_records() -> None:
    message = dns.message.make_query("example.test.", "A", use_edns=0, payload=3000)
    message.additional.append(dns.rrset.from_text("x.example.test.", 60, "IN", "A", "192.0.2.1"))
    q = parse_query(message.to_wire())
    assert q.edns and q.udp_size == 3000


def test_opt_in_answer_section_is_not_edns() -> None:
    data = header(an=1) + QUESTION_A + opt_rr(4000)
    q = parse_query(data)
    assert not q.edns and q.udp_size == 512


def test_trailing_bytes_are_ignored() -> None:
    assert parse_query(query_wire(use_edns=0) + b"junk").edns


@given(
    name=names_st,
    rdtype=st.sampled_from(["A", "AAAA", "MX", "TXT", "SOA", "ANY", "TYPE65534"]),
    rdclass=st.sampled_from(["IN", "CH", "ANY"]),
    use_edns=st.booleans(),
    payload=st.integers(0, 65535),
    dnssec=st.booleans(),
)
def test_dnspython_queries_parse_the_same(
    name: dns.name.Name, rdtype: str, rdclass: str, use_edns: bool, payload: int, dnssec: bool
) -> None:
    message = dns.message.make_query(
        name,
        rdtype,
        rdclass,
        use_edns=0 if use_edns else False,
        payload=payload,
        want_dnssec=dnssec and use_edns,
    )
    data = message.to_wire()
    for _ in range(2):  # the second time through the name memo
        q = parse_query(data)
        assert q.id == message.id
        assert q.qname == oracle_text(name)
        assert q.qtype == dns.rdatatype.from_text(rdtype)
        assert q.qclass == dns.rdataclass.from_text(rdclass)
        assert q.edns == use_edns
        assert q.udp_size == (max(512, payload) if use_edns else 512)
        assert q.do == (dnssec and use_edns)
        assert data[q.question_end - 4 : q.question_end] == struct.pack(">HH", q.qtype, q.qclass)
        assert q.question_end == len(data) - (11 if use_edns else 0)


@given(a=names_st, b=names_st)
def test_distinct_names_give_distinct_text(a: dns.name.Name, b: dns.name.Name) -> None:
    wire_a = dns.message.make_query(a, "A").to_wire()
    wire_b = dns.message.make_query(b, "A").to_wire()
    same = a.canonicalize() == b.canonicalize()
    assert (parse_query(wire_a).qname == parse_query(wire_b).qname) == same


@pytest.mark.parametrize(
    "labels",
    [
        [b"a.b", b"test"],  # a dot inside a label must not read as two labels
        [b"a\\b", b"test"],
        [b"sp ace", b"test"],
        [b"@", b"$", b"(x)", b'"q"', b";"],
        [b"\x00\x01\x7f\xff", b"test"],
        [b"UPPER\xc3\x89", b"test"],
    ],
)
def test_odd_names_are_escaped_like_dnspython(labels: list[bytes]) -> None:
    name = dns.name.Name([*labels, b""])
    data = dns.message.make_query(name, "A").to_wire()
    assert parse_query(data).qname == oracle_text(name)
    assert parse_query(data).qname == oracle_text(name)  # memo hit or not, the same


def test_zero_octet_inside_a_label_does_not_confuse_the_name_memo() -> None:
    # Prime the memo with the name that the bytes before the first zero would spell.
    parse_query(header() + encode_name(b"x") + struct.pack(">HH", 1, 1))
    tricky = header() + encode_name(b"\x00x", b"test") + struct.pack(">HH", 1, 1)
    assert parse_query(tricky).qname == "\\000x.test."
    # Same bytes up to the first zero octet, different name: must not come from the memo.
    other = header() + encode_name(b"\x00y", b"test") + struct.pack(">HH", 1, 1)
    assert parse_query(other).qname == "\\000y.test."
    short = header() + b"\x02x\x00" + struct.pack(">HH", 1, 1)  # label runs into the type
    for _ in range(2):
        with pytest.raises(WireError):
            parse_query(short)


def test_name_of_exactly_255_octets_is_accepted_and_256_refused() -> None:
    labels = [b"a" * 63] * 3 + [b"b" * 61]  # 3 * 64 + 62 + 1 = 255
    ok = header() + encode_name(*labels) + struct.pack(">HH", 1, 1)
    assert parse_query(ok).qname == dns.name.Name([*labels, b""]).to_text()
    labels[-1] = b"b" * 62
    too_long = header() + encode_name(*labels) + struct.pack(">HH", 1, 1)
    with pytest.raises(WireError) as info:
        parse_query(too_long)
    assert info.value.header_ok


@pytest.mark.parametrize(
    ("data", "header_ok"),
    [
        (b"", False),
        (b"\x12\x34", False),
        (header()[:11], False),
        (header(flags=0x8100) + QUESTION_A, False),  # a response: never answer it
        (header(qd=0), True),
        (header(qd=5) + QUESTION_A * 5, True),
        (header(), True),  # question missing
        (header() + QUESTION_A[:-1], True),
        (header() + b"\x03www\x07exam", True),
        (header() + b"\xc0\x0c" + struct.pack(">HH", 1, 1), True),  # pointer to itself
        (header() + b"\x03www\xc0\x0c" + struct.pack(">HH", 1, 1), True),  # loop through a label
        (header() + b"\xc0\x00" + struct.pack(">HH", 1, 1), True),  # pointer into the header
        (header() + b"\x40" + b"a" * 64 + b"\x00" + struct.pack(">HH", 1, 1), True),  # label of 64
        (header() + b"\x80abc\x00" + struct.pack(">HH", 1, 1), True),  # reserved label type
        (header(ar=1) + QUESTION_A, True),  # the OPT promised is missing
        (header(ar=1) + QUESTION_A + opt_rr()[:7], True),
        (header(ar=1) + QUESTION_A + opt_rr(rdata=b"\x00\x0a\x00\x08abcd")[:-2], True),
        (header(ar=2) + QUESTION_A + opt_rr() + opt_rr(), True),  # RFC 6891: one OPT at most
        (header(ar=1) + QUESTION_A + opt_rr(owner=b"\x01a\x00"), True),
        (header(an=1) + QUESTION_A + b"\xc0\x0c\x00", True),
        (header(ar=65535) + QUESTION_A + opt_rr(), True),
    ],
)
def test_malformed_queries(data: bytes, header_ok: bool) -> None:
    with pytest.raises(WireError) as info:
        parse_query(data)
    assert info.value.header_ok is header_ok


def test_pointer_loop_in_a_record_owner_does_not_hang() -> None:
    # Owners in the other sections are only skipped, so a loop there cannot trap the parser.
    looping = b"\xc0" + bytes([12 + len(QUESTION_A)])  # points at itself
    data = (
        header(an=1, ar=1)
        + QUESTION_A
        + looping
        + struct.pack(">HHIH", 1, 1, 60, 4)
        + b"\x7f\0\0\1"
        + opt_rr()
    )
    assert parse_query(data).edns


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_parse_or_raise_wire_error(data: bytes) -> None:
    assert_wire_error_or_question(data)


@settings(max_examples=500)
@given(
    counts=st.tuples(
        st.integers(0, 3), st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535)
    ),
    body=st.binary(max_size=400),
)
def test_random_bodies_behind_plausible_headers(
    counts: tuple[int, int, int, int], body: bytes
) -> None:
    qd, an, ns, ar = counts
    assert_wire_error_or_question(header(qd=qd, an=an, ns=ns, ar=ar) + body)
    assert_wire_error_or_question(header(an=an % 4, ar=ar % 4) + QUESTION_A + body)


@settings(max_examples=300)
@given(data=st.data(), use_edns=st.booleans())
def test_mutated_queries_parse_or_raise_wire_error(data: st.DataObject, use_edns: bool) -> None:
    packet = bytearray(query_wire(use_edns=0 if use_edns else False, want_dnssec=use_edns))
    for _ in range(data.draw(st.integers(1, 4))):
        packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(packet)))
    assert_wire_error_or_question(bytes(packet))
    assert_wire_error_or_question(bytes(packet[:cut]))


def test_garbage_is_rejected_quickly() -> None:
    # 65535 claimed records, each a bare root owner with a zero-length record: the walk stops
    # at the end of the data rather than at the count.
    data = (
        header(an=65535, ns=65535, ar=65535)
        + QUESTION_A
        + (b"\x00" + struct.pack(">HHIH", 1, 1, 0, 0)) * 5000
    )
    started = time.perf_counter()
    with pytest.raises(WireError):
        parse_query(data)
    assert time.perf_counter() - started < 1.0


# --------------------------------------------------------------------------- responses


def test_parse_response_question_matches_the_query() -> None:
    response = response_with(
        "WwW.Example.Test.", answer=[("www.example.test.", 60, "A", ["192.0.2.1"])]
    )
    data = response.to_wire()
    assert parse_response_question(data) == (response.id, "www.example.test.", 1, 1)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 5,
        query_wire(),  # QR=0
        header(flags=0x8180, qd=0),
        header(flags=0x8180, qd=2) + QUESTION_A * 2,
        header(flags=0x8180) + b"\xc0\x0c\x00\x01\x00\x01",
        header(flags=0x8180) + QUESTION_A[:-2],
    ],
)
def test_parse_response_question_rejects(data: bytes) -> None:
    with pytest.raises(WireError):
        parse_response_question(data)


def test_rcode_truncated_and_extended_rcode() -> None:
    nx = response_with(rcode_value=dns.rcode.NXDOMAIN).to_wire()
    assert rcode(nx) == NXDOMAIN and extended_rcode(nx) == NXDOMAIN and not is_truncated(nx)
    badvers = response_with(rcode_value=dns.rcode.BADVERS).to_wire()
    assert rcode(badvers) == 0  # the header's 4 bits only
    assert extended_rcode(badvers) == 16
    assert inspect_response(badvers).rcode == 16
    message = response_with()
    message.flags |= dns.flags.TC
    assert is_truncated(message.to_wire())
    for function in (rcode, is_truncated, extended_rcode):
        with pytest.raises(WireError):
            function(b"\x00" * 11)


def test_with_id() -> None:
    data = query_wire(id=1)
    out = with_id(data, 0xBEEF)
    assert dns.message.from_wire(out).id == 0xBEEF and out[2:] == data[2:]
    with pytest.raises(WireError):
        with_id(b"\x00", 1)


# --------------------------------------------------------------------------- error_response


@pytest.mark.parametrize("code", [FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED])
@pytest.mark.parametrize(("use_edns", "dnssec"), [(False, False), (True, False), (True, True)])
def test_error_response_parses_in_dnspython(code: int, use_edns: bool, dnssec: bool) -> None:
    query = dns.message.make_query(
        "MiXeD.example.test.",
        "MX",
        use_edns=0 if use_edns else False,
        want_dnssec=dnssec,
        payload=4096,
    )
    query.flags = dns.flags.RD | dns.flags.CD
    data = query.to_wire()
    out = error_response(data, code, parse_query(data))
    reply = dns.message.from_wire(out)
    assert reply.id == query.id
    assert reply.rcode() == code
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RA and reply.flags & dns.flags.RD
    assert reply.flags & dns.flags.CD  # copied, as RFC 4035 3.2.2 asks
    assert reply.opcode() == dns.opcode.QUERY
    # The question comes back as the client spelled it (0x20 case randomisation survives).
    assert [(r.name.to_text(), r.rdtype) for r in reply.question] == [
        ("MiXeD.example.test.", dns.rdatatype.MX)
    ]
    assert query.is_response(reply)
    if use_edns:
        assert reply.edns == 0 and reply.payload == 1232
        assert bool(reply.ednsflags & dns.flags.DO) == dnssec
    else:
        assert reply.edns == -1


def test_error_response_copies_opcode_and_clears_rd() -> None:
    query = dns.message.make_query("example.test.", "SOA")
    query.set_opcode(dns.opcode.UPDATE)
    query.flags &= ~dns.flags.RD
    data = query.to_wire()
    reply = dns.message.from_wire(error_response(data, NOTIMP, parse_query(data)))
    assert reply.opcode() == dns.opcode.UPDATE and not reply.flags & dns.flags.RD


def test_formerr_with_header_only() -> None:
    data = header(ident=0xABCD, qd=2) + b"garbage"
    with pytest.raises(WireError) as info:
        parse_query(data)
    assert info.value.header_ok
    out = error_response(data, FORMERR, None)
    assert len(out) == 12
    reply = dns.message.from_wire(out)
    assert reply.id == 0xABCD and reply.rcode() == dns.rcode.FORMERR and reply.flags & dns.flags.QR
    assert not reply.question


def test_error_response_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rcode"):
        error_response(query_wire(), 16, None)
    with pytest.raises(WireError):
        error_response(b"\x00\x01", FORMERR, None)


# --------------------------------------------------------------------------- truncate


def big_response(use_edns: int | bool, count: int = 100) -> dns.message.Message:
    texts = [f"192.0.2.{i}" for i in range(1, count + 1)]
    return response_with(
        answer=[("www.example.test.", 300, "A", texts)],
        authority=[("example.test.", 3600, "NS", ["ns1.example.test."])],
        additional=[("ns1.example.test.", 3600, "A", ["192.0.2.53"])],
        use_edns=use_edns,
    )


@pytest.mark.parametrize("use_edns", [False, 0])
def test_truncate_keeps_question_and_opt(use_edns: int | bool) -> None:
    message = big_response(use_edns)
    data = message.to_wire(max_size=65535)
    assert len(data) > 512
    out = truncate(data, 512)
    assert len(out) <= 512
    reply = dns.message.from_wire(out)
    assert reply.flags & dns.flags.TC and reply.flags & dns.flags.QR
    assert reply.id == message.id
    assert reply.question == message.question
    assert not reply.answer and not reply.authority and not reply.additional
    assert reply.edns == (-1 if use_edns is False else 0)
    if use_edns is not False:
        assert reply.payload == message.payload


def test_truncate_leaves_small_responses_alone() -> None:
    data = big_response(0, count=2).to_wire()
    assert truncate(data, 512) is data
    assert truncate(data, len(data)) is data


def test_truncate_drops_opt_options_then_opt_when_space_is_short() -> None:
    message = big_response(0)
    message.use_edns(
        0, 0, 1232, options=[dns.edns.GenericOption(dns.edns.OptionType.make(65001), b"x" * 40)]
    )
    data = message.to_wire(max_size=65535)
    question_len = len(message.question[0].name.to_wire() or b"") + 4
    with_options = 12 + question_len + 11 + 44
    without = dns.message.from_wire(truncate(data, with_options - 1))
    assert without.edns == 0 and not without.options
    bare = dns.message.from_wire(truncate(data, 12 + question_len + 5))
    assert bare.edns == -1 and bare.flags & dns.flags.TC
    assert dns.message.from_wire(truncate(data, with_options)).options


def test_truncate_rejects_garbage() -> None:
    with pytest.raises(WireError):
        truncate(header(flags=0x8180, an=3) + QUESTION_A + b"\xff" * 600, 512)


# --------------------------------------------------------------------------- TTLs


def mixed_response() -> dns.message.Message:
    return response_with(
        answer=[
            ("www.example.test.", 300, "CNAME", ["web.example.test."]),
            ("web.example.test.", 120, "A", ["192.0.2.1", "192.0.2.2"]),
            ("web.example.test.", 7200, "TXT", ['"hello world"']),
        ],
        authority=[("example.test.", 86400, "NS", ["ns1.example.test.", "ns2.example.test."])],
        additional=[("ns1.example.test.", 3600, "AAAA", ["2001:db8::1"])],
    )


def test_ttl_offsets_skip_opt_and_follow_compression() -> None:
    data = mixed_response().to_wire()
    assert data.count(b"\xc0") > 3  # the names really are compressed
    offsets = ttl_offsets(data)
    assert (
        ttls_at(data, offsets)
        == ttls_seen_by_dnspython(data)
        == [300, 120, 120, 7200, 86400, 86400, 3600]
    )
    assert min_ttl(data, offsets) == 120
    assert min_ttl(data, []) is None


rdata_choices = st.sampled_from(
    [
        ("A", ["192.0.2.1"]),
        ("A", ["192.0.2.1", "192.0.2.2", "192.0.2.3"]),
        ("AAAA", ["2001:db8::1"]),
        ("CNAME", ["target.example.test."]),
        ("NS", ["ns.example.test.", "ns.other.test."]),
        ("MX", ["10 mx.example.test."]),
        ("TXT", ['"a" "b"']),
        ("SOA", ["ns.example.test. host.example.test. 1 7200 900 1209600 300"]),
    ]
)
records_st = st.lists(
    st.tuples(st.integers(0, 3), rdata_choices, st.integers(0, 2**31 - 1)), max_size=8
)


def build(records: list[tuple[int, tuple[str, list[str]], int]], use_edns: bool) -> bytes:
    sections: list[list[tuple[str, int, str, list[str]]]] = [[], [], []]
    for index, (where, (rdtype, texts), ttl) in enumerate(records):
        sections[where % 3].append((f"r{index}.example.test.", ttl, rdtype, texts))
    message = response_with(
        answer=sections[0],
        authority=sections[1],
        additional=sections[2],
        use_edns=0 if use_edns else False,
    )
    return message.to_wire()


@given(
    records=records_st,
    use_edns=st.booleans(),
    elapsed=st.integers(0, 2**31),
    new_id=st.integers(0, 65535),
)
def test_ttl_offsets_and_adjust_ttls_agree_with_dnspython(
    records: list[tuple[int, tuple[str, list[str]], int]], use_edns: bool, elapsed: int, new_id: int
) -> None:
    data = build(records, use_edns)
    offsets = ttl_offsets(data)
    expected = ttls_seen_by_dnspython(data)
    assert ttls_at(data, offsets) == expected
    info = inspect_response(data)
    assert info.ttl_offsets == offsets
    assert info.min_ttl == (min(expected) if expected else None)
    assert info.max_ttl == (max(expected) if expected else None)

    out = adjust_ttls(data, offsets, elapsed, new_id)
    assert len(out) == len(data)
    reply = dns.message.from_wire(out, one_rr_per_rrset=True)
    original = dns.message.from_wire(data, one_rr_per_rrset=True)
    assert reply.id == new_id
    assert ttls_seen_by_dnspython(out) == [max(0, ttl - elapsed) for ttl in expected]
    # Nothing else changed: same records, same EDNS.
    for got, want in zip(
        (reply.answer, reply.authority, reply.additional),
        (original.answer, original.authority, original.additional),
        strict=True,
    ):
        assert [(r.name, r.rdtype, set(r)) for r in got] == [
            (r.name, r.rdtype, set(r)) for r in want
        ]
    assert (reply.edns, reply.payload) == (original.edns, original.payload)

    stale = set_ttls(data, offsets, 30, new_id)
    assert ttls_seen_by_dnspython(stale) == [30] * len(expected)


def test_adjust_ttls_treats_top_bit_ttls_as_zero() -> None:
    data = bytearray(mixed_response().to_wire())
    offsets = ttl_offsets(bytes(data))
    struct.pack_into(">I", data, offsets[0], 0x80000010)
    out = adjust_ttls(bytes(data), offsets, 1, 7)
    assert struct.unpack_from(">I", out, offsets[0])[0] == 0
    assert inspect_response(bytes(data)).min_ttl == 0  # RFC 2181 §8


def test_adjust_ttls_with_zero_elapsed_only_changes_the_id() -> None:
    data = mixed_response().to_wire()
    out = adjust_ttls(data, ttl_offsets(data), 0, 99)
    assert out[2:] == data[2:] and out[:2] == b"\x00\x63"


SOA_TEXT = "ns.example.test. hostmaster.example.test. 2024 7200 900 1209600 {minimum}"


@pytest.mark.parametrize(
    ("soa_ttl", "minimum", "expected"), [(3600, 300, 300), (60, 300, 60), (0, 300, 0)]
)
def test_negative_ttl_is_min_of_soa_ttl_and_minimum(
    soa_ttl: int, minimum: int, expected: int
) -> None:
    message = response_with(
        authority=[("example.test.", soa_ttl, "SOA", [SOA_TEXT.format(minimum=minimum)])],
        rcode_value=dns.rcode.NXDOMAIN,
    )
    data = message.to_wire()
    assert negative_ttl(data) == expected
    assert inspect_response(data).negative_ttl == expected


def test_negative_ttl_none_without_authority_soa() -> None:
    assert negative_ttl(response_with(rcode_value=dns.rcode.NXDOMAIN).to_wire()) is None
    # An SOA in the answer section (a positive SOA query) is not a negative TTL.
    positive = response_with(
        answer=[("example.test.", 3600, "SOA", [SOA_TEXT.format(minimum=5)])]
    ).to_wire()
    assert negative_ttl(positive) is None
    assert inspect_response(positive).negative_ttl is None


def test_negative_ttl_with_a_short_soa_is_garbage() -> None:
    soa = encode_name(b"example", b"test")[:-1] + b"\x00"
    data = (
        header(flags=0x8183, ns=1)
        + QUESTION_A
        + soa
        + struct.pack(">HHIH", 6, 1, 60, 4)
        + b"\x00\x00\x00\x00"
    )
    with pytest.raises(WireError):
        negative_ttl(data)
    with pytest.raises(WireError):
        inspect_response(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 11,
        header(flags=0x8180, an=1) + QUESTION_A,
        header(flags=0x8180, an=1) + QUESTION_A + b"\xc0\x0c\x00\x01\x00\x01\x00\x00",
        header(flags=0x8180, an=1)
        + QUESTION_A
        + b"\xc0\x0c"
        + struct.pack(">HHIH", 1, 1, 5, 4)
        + b"\x7f",
        header(flags=0x8180, an=1) + QUESTION_A + b"\x40" + b"a" * 64,
        header(flags=0x8180, qd=2) + QUESTION_A,
    ],
)
def test_response_walkers_reject_garbage(data: bytes) -> None:
    for function in (ttl_offsets, negative_ttl, extended_rcode, inspect_response):
        with pytest.raises(WireError):
            function(data)


@settings(max_examples=400)
@given(data=st.binary(max_size=600), limit=st.integers(0, 700))
def test_response_functions_only_raise_wire_error(data: bytes, limit: int) -> None:
    for function in (
        ttl_offsets,
        negative_ttl,
        extended_rcode,
        inspect_response,
        parse_response_question,
    ):
        try:
            function(data)
        except WireError:
            pass
    try:
        out = truncate(data, limit)
    except WireError:
        return
    assert out is data or is_truncated(out)


@settings(max_examples=200)
@given(records=records_st, data=st.data())
def test_mutated_responses_only_raise_wire_error(
    records: list[tuple[int, tuple[str, list[str]], int]], data: st.DataObject
) -> None:
    packet = bytearray(build(records, True))
    for _ in range(data.draw(st.integers(1, 4))):
        packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    mutated = bytes(packet[: data.draw(st.integers(0, len(packet)))])
    try:
        info = inspect_response(mutated)
    except WireError:
        return
    adjust_ttls(mutated, info.ttl_offsets, 5, 1)  # offsets it returned are always in bounds


def test_name_memo_stays_bounded() -> None:
    for index in range(wire._NAME_MEMO_SIZE + 10):
        parse_query(header() + encode_name(b"n%d" % index, b"test") + struct.pack(">HH", 1, 1))
    assert len(wire._NAME_MEMO) <= wire._NAME_MEMO_SIZE


def test_question_is_immutable() -> None:
    q = parse_query(query_wire())
    with pytest.raises(AttributeError):
        q.qname = "evil.test."  # type: ignore[misc]


def _with_opt_data(rdata: bytes, *, extra_record: bool = False) -> bytes:
    """A query for www.example.test whose OPT record carries ``rdata``."""
    q = dns.message.make_query("www.example.test", "A", use_edns=False)
    wire_query = bytearray(q.to_wire())
    arcount = 1
    if extra_record:
        # An A record before the OPT: the parser walks the slow path.
        wire_query += b"\x00" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x7f\x00\x00\x01"
        arcount += 1
    wire_query += b"\x00" + struct.pack("!HHIH", 41, 1232, 0, len(rdata)) + rdata
    struct.pack_into("!H", wire_query, 10, arcount)
    return bytes(wire_query)


COOKIE = struct.pack("!HH", 10, 8) + b"\x01" * 8


@pytest.mark.parametrize("extra_record", [False, True])
@pytest.mark.parametrize(
    "rdata",
    [
        struct.pack("!HH", 10, 9) + b"\x01" * 8,  # the option claims more than there is
        struct.pack("!HH", 10, 7) + b"\x01" * 8,  # ... less: a stray octet at the end
        COOKIE + b"\x00\x0a",  # half an option header after a good option
    ],
)
def test_edns_options_that_do_not_add_up_are_formerr(rdata: bytes, extra_record: bool) -> None:
    """RFC 6891 6.1.2: the options fill the OPT record's data; a query whose option
    lengths do not add up is malformed (FORMERR, with an OPT record in the answer)."""
    data = _with_opt_data(rdata, extra_record=extra_record)
    with pytest.raises(wire.OptError, match="EDNS option"):
        parse_query(data)
    response = dns.message.from_wire(error_response(data, 1, None))
    assert response.rcode() == dns.rcode.FORMERR


@pytest.mark.parametrize("extra_record", [False, True])
def test_well_formed_edns_options_are_taken(extra_record: bool) -> None:
    question = parse_query(
        _with_opt_data(COOKIE + struct.pack("!HH", 3, 0), extra_record=extra_record)
    )
    assert question.edns and question.udp_size == 1232
