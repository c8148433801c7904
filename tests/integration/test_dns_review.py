"""Defects found reviewing the DNS listener as its clients see it: a real gateway process,
unbound upstream, dig (and raw sockets for exact bytes) as clients.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from tests.integration.test_dns_gateway import start_gateway
from tests.peers import GatewayProcess, Unbound, dig

RECORDS = ("www.example.test. 300 IN A 192.0.2.10",)


@pytest.fixture
def upstream(unbound_factory) -> Unbound:  # type: ignore[no-untyped-def]
    server: Unbound = unbound_factory(records=RECORDS)
    return server


@pytest.fixture
def gateway(tmp_path: Path, upstream: Unbound) -> Iterator[tuple[GatewayProcess, int]]:
    gw, port = start_gateway(
        tmp_path,
        routes="""  - name: local
    from: dns-in
    match: {qname: ["printer.lan.test"]}
    answer: ["printer.lan.test. 60 IN A 192.0.2.200"]
  - {name: fwd, from: dns-in, to: inside, cache: true}
""",
        destinations=f"""  inside: {{protocol: dns, servers: ["127.0.0.1:{upstream.port}"], timeout: 2s}}
""",
    )
    yield gw, port
    gw.stop()


def _udp(port: int, wire: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(wire, ("127.0.0.1", port))
        data, _ = s.recvfrom(65535)
    return data


def test_edns_version_1_is_answered_badvers_on_local_and_cached_routes(
    gateway: tuple[GatewayProcess, int],
) -> None:
    """Defect: an EDNS version 1 query got a local route's records, or a cached answer, with
    NOERROR, where RFC 6891 §6.1.3 requires BADVERS and an OPT of version 0."""
    gw, port = gateway
    server = ("@127.0.0.1", "-p", str(port))
    warm = dig(*server, "www.example.test", "+short")
    assert warm.stdout.strip() == "192.0.2.10", warm.stdout + warm.stderr
    for name in ("printer.lan.test", "www.example.test"):
        out = dig(*server, name, "+edns=1", "+noednsnegotiation")
        assert "status: BADVERS" in out.stdout, out.stdout + out.stderr
        assert "EDNS: version: 0" in out.stdout, out.stdout
        assert "ANSWER: 0" in out.stdout, out.stdout
    # Version 0 is answered as before, and the listener is still healthy.
    again = dig(*server, "www.example.test", "+short")
    assert again.stdout.strip() == "192.0.2.10", again.stdout + again.stderr
    assert "Traceback" not in gw.log_text()


def test_local_answers_copy_do_and_refuse_other_classes(
    gateway: tuple[GatewayProcess, int],
) -> None:
    """Defect: a local route's answer to a DNSSEC-OK query had the DO bit cleared (RFC 3225 §3
    says copy it), and a CHAOS-class query got the class IN records."""
    _, port = gateway
    server = ("@127.0.0.1", "-p", str(port))
    out = dig(*server, "printer.lan.test", "+dnssec")
    assert "status: NOERROR" in out.stdout and "192.0.2.200" in out.stdout, out.stdout
    assert "EDNS: version: 0, flags: do;" in out.stdout, out.stdout
    chaos = dig(*server, "-c", "CH", "printer.lan.test", "A")
    assert "status: REFUSED" in chaos.stdout, chaos.stdout + chaos.stderr
    assert "ANSWER: 0" in chaos.stdout, chaos.stdout


def test_cached_answers_repeat_the_clients_question_case(
    gateway: tuple[GatewayProcess, int], upstream: Unbound
) -> None:
    """Defect: a cache hit carried the question (and, by compression, the answer names) as the
    client who filled the cache spelled it; a 0x20 client (random case, as unbound's
    use-caps-for-id) sees another question than it asked and throws the answer away."""
    _, port = gateway
    first = dns.message.make_query("www.example.test.", "A", id=1)
    assert dns.message.from_wire(_udp(port, first.to_wire())).answer
    count = upstream.query_count()
    second = dns.message.make_query("wWw.ExAmPlE.TeSt.", "A", id=2)
    raw = _udp(port, second.to_wire())
    assert upstream.query_count() == count, "the second query was not a cache hit"
    assert b"\x03wWw\x07ExAmPlE\x04TeSt\x00" in raw[:40]
    reply = dns.message.from_wire(raw)
    assert reply.id == 2 and reply.question[0].name.to_text() == "wWw.ExAmPlE.TeSt."
    assert reply.answer[0][0].address == "192.0.2.10"


def test_malformed_edns_and_other_opcodes_get_the_right_error(
    gateway: tuple[GatewayProcess, int],
) -> None:
    """Defect: a query with two OPT records got a bare FORMERR with no OPT (RFC 6891 §7 wants
    one, so the client does not conclude the server lacks EDNS), and a DSO message (opcode 6,
    no question, RFC 8490) got FORMERR instead of NOTIMP."""
    gw, port = gateway
    good = dns.message.make_query("www.example.test.", "A", use_edns=0, id=0x6161).to_wire()
    two = good[:10] + b"\x00\x02" + good[12:] + good[-11:]
    reply = dns.message.from_wire(_udp(port, two))
    assert reply.id == 0x6161 and reply.rcode() == dns.rcode.FORMERR
    assert reply.edns == 0 and reply.question
    dso = struct.pack(">HHHHHH", 0x6262, 6 << 11, 0, 0, 0, 0)
    reply = dns.message.from_wire(_udp(port, dso))
    assert reply.id == 0x6262 and reply.rcode() == dns.rcode.NOTIMP and reply.opcode() == 6
    assert "Traceback" not in gw.log_text()
