"""The DNS listener as a real process: dig and kdig in, unbound upstream.

Each test starts unbound (offline, local zones only) and a gateway on free
ports of 127.0.0.1, and stops them afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.peers import (
    LOOPBACK,
    GatewayProcess,
    Unbound,
    curl,
    dig,
    doh_query,
    free_port,
    free_udp_tcp_port,
    kdig,
    make_tls_cert,
)


def start_gateway(
    tmp_path: Path, routes: str, destinations: str, **extra: str
) -> tuple[GatewayProcess, int]:
    port = free_udp_tcp_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
listeners:
  dns-in:
    protocol: dns
    listen: ["udp:{port}:interface=127.0.0.1", "tcp:{port}:interface=127.0.0.1"]
destinations:
{destinations}
routes:
{routes}
"""
    )
    gw = GatewayProcess(path)
    gw.start(port)
    return gw, port


def ask(
    port: int,
    name: str,
    rdtype: str = "A",
    *,
    tcp: bool = False,
    source: str = "127.0.0.1",
    **kw: object,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=5, source=source)
    return dns.query.udp(
        query, "127.0.0.1", port=port, timeout=5, source=source, ignore_trailing=True
    )


@pytest.fixture
def forwarding(tmp_path: Path, unbound: Unbound) -> tuple[GatewayProcess, int, Unbound]:
    gw, port = start_gateway(
        tmp_path,
        "  - {name: fwd, from: dns-in, to: inside}",
        f'  inside: {{protocol: dns, servers: ["127.0.0.1:{unbound.port}"], timeout: 1s}}',
    )
    yield gw, port, unbound
    gw.stop()


def test_dig_over_udp_and_tcp(forwarding: tuple[GatewayProcess, int, Unbound]) -> None:
    _, port, _ = forwarding
    out = dig("@127.0.0.1", "-p", str(port), "www.example.test", "+short")
    assert out.stdout.strip() == "192.0.2.10", out.stdout + out.stderr
    out = dig("@127.0.0.1", "-p", str(port), "www.example.test", "+tcp", "+short")
    assert out.stdout.strip() == "192.0.2.10", out.stdout + out.stderr
    answer = ask(port, "www.example.test", id=4242)
    assert answer.id == 4242 and answer.rcode() == dns.rcode.NOERROR
    assert answer.flags & dns.flags.RD and answer.flags & dns.flags.QR


def test_pipelined_tcp_queries_on_one_connection(
    forwarding: tuple[GatewayProcess, int, Unbound],
) -> None:
    _, port, _ = forwarding
    out = kdig(
        "@127.0.0.1",
        "-p",
        str(port),
        "+tcp",
        "+keepopen",
        "+short",
        "www.example.test",
        "loopback.example.test",
        "whoami.test",
        "TXT",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.split()
    assert "192.0.2.10" in lines and "127.0.0.1" in lines and '"unbound-1"' in lines
    # Several queries written at once on one raw connection: every one answered, IDs kept.
    queries = [
        dns.message.make_query(n, "A")
        for n in ("www.example.test", "loopback.example.test", "alias.example.test")
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries)))
        answers = {}
        buffer = b""
        while len(answers) < 3:
            buffer += s.recv(65535)
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack("!H", buffer[:2])[0]:
                length = struct.unpack("!H", buffer[:2])[0]
                message = dns.message.from_wire(buffer[2 : 2 + length])
                buffer = buffer[2 + length :]
                answers[message.id] = message
    assert set(answers) == {q.id for q in queries}


def test_large_answer_truncated_for_small_udp_buffer_and_whole_over_tcp(
    forwarding: tuple[GatewayProcess, int, Unbound],
) -> None:
    _, port, _ = forwarding
    small = ask(port, "big.example.test", use_edns=False)
    assert small.flags & dns.flags.TC and not small.answer
    assert small.question[0].name.to_text() == "big.example.test."
    out = dig("@127.0.0.1", "-p", str(port), "big.example.test", "+noedns", "+ignore")
    assert " tc " in out.stdout or "flags: qr tc" in out.stdout
    whole = ask(port, "big.example.test", tcp=True)
    assert len(whole.answer[0]) == 100
    # A client with a big buffer still gets at most 1232 octets over UDP (DNS flag day
    # 2020): the rest is TC, and it asks again over TCP.
    roomy = ask(port, "big.example.test", use_edns=0, payload=65000)
    assert roomy.flags & dns.flags.TC and not roomy.answer


def test_cache_answers_without_asking_upstream_and_counts_ttl_down(
    forwarding: tuple[GatewayProcess, int, Unbound],
) -> None:
    _, port, unbound = forwarding
    before = unbound.query_count()
    first = ask(port, "www.example.test")
    assert unbound.query_count() == before + 1
    time.sleep(2.1)
    second = ask(port, "www.example.test")
    assert unbound.query_count() == before + 1, "the second query reached unbound"
    assert second.answer[0].ttl <= first.answer[0].ttl - 2
    # NXDOMAIN is cached too (RFC 2308), for the SOA's minimum.
    missing = ask(port, "nothing-here.example.test")
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.authority
    count = unbound.query_count()
    again = ask(port, "nothing-here.example.test")
    assert again.rcode() == dns.rcode.NXDOMAIN
    assert unbound.query_count() == count
    # The DO bit is part of the key: a DNSSEC-OK query is a separate entry.
    ask(port, "www.example.test", want_dnssec=True)
    assert unbound.query_count() == count + 1


def test_split_horizon_by_client_network(tmp_path: Path, unbound: Unbound, unbound_factory) -> None:  # type: ignore[no-untyped-def]
    other = unbound_factory(records=["www.example.test. 300 IN A 192.0.2.99"])
    gw, port = start_gateway(
        tmp_path,
        "  - {name: lab, from: dns-in, match: {client: [127.0.0.2/32], qname: ['*.test']}, to: lab}\n"
        "  - {name: main, from: dns-in, to: main}",
        f'  main: {{protocol: dns, servers: ["127.0.0.1:{unbound.port}"]}}\n'
        f'  lab: {{protocol: dns, servers: ["127.0.0.1:{other.port}"]}}',
    )
    try:
        assert ask(port, "whoami.test", "TXT").answer[0].to_text().endswith('"unbound-1"')
        assert (
            ask(port, "whoami.test", "TXT", source="127.0.0.2")
            .answer[0]
            .to_text()
            .endswith('"unbound-2"')
        )
        assert (
            ask(port, "www.example.test", source="127.0.0.2").answer[0][0].address == "192.0.2.99"
        )
        assert ask(port, "www.example.test").answer[0][0].address == "192.0.2.10"
    finally:
        gw.stop()


def test_dead_upstream_gives_servfail_in_time_and_next_server_is_tried(
    tmp_path: Path, unbound: Unbound
) -> None:
    dead = free_udp_tcp_port()
    gw, port = start_gateway(
        tmp_path,
        "  - {name: only-dead, from: dns-in, match: {qname: 'whoami.test'}, to: dead}\n"
        "  - {name: failover, from: dns-in, to: both}",
        f'  dead: {{protocol: dns, servers: ["127.0.0.1:{dead}"], timeout: 500ms}}\n'
        f'  both: {{protocol: dns, servers: ["127.0.0.1:{dead}", "127.0.0.1:{unbound.port}"], timeout: 500ms}}',
    )
    try:
        started = time.monotonic()
        answer = ask(port, "whoami.test", "TXT")
        assert answer.rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - started < 2.0
        assert ask(port, "www.example.test").answer[0][0].address == "192.0.2.10"
        assert "SERVFAIL for whoami.test." in gw.log_text()
    finally:
        gw.stop()


def test_serve_stale_when_every_upstream_fails(tmp_path: Path, unbound_factory) -> None:  # type: ignore[no-untyped-def]
    upstream = unbound_factory(records=["short.example.test. 1 IN A 192.0.2.55"])
    gw, port = start_gateway(
        tmp_path,
        "  - {name: fwd, from: dns-in, to: inside, serve_stale: 1h}",
        f'  inside: {{protocol: dns, servers: ["127.0.0.1:{upstream.port}"], timeout: 500ms}}',
    )
    try:
        assert ask(port, "short.example.test").answer[0][0].address == "192.0.2.55"
        upstream.stop()
        time.sleep(1.5)
        stale = ask(port, "short.example.test")
        assert stale.rcode() == dns.rcode.NOERROR
        assert stale.answer[0][0].address == "192.0.2.55"
        assert stale.answer[0].ttl == 30  # RFC 8767's recommended stale TTL
        assert "serving a stale answer" in gw.log_text()
    finally:
        gw.stop()


def test_local_answers_and_block_list(tmp_path: Path, unbound: Unbound) -> None:
    (tmp_path / "block.txt").write_text("# blocked\nads.example.test\n*.tracker.test\n")
    gw, port = start_gateway(
        tmp_path,
        "  - {name: block, from: dns-in, match: {qname_file: block.txt}, action: nxdomain}\n"
        "  - {name: refuse-any, from: dns-in, match: {qtype: [ANY]}, action: refuse}\n"
        "  - {name: local, from: dns-in, match: {qname: ['printer.lan.test']}, answer: ['printer.lan.test. 60 IN A 192.0.2.200', 'printer.lan.test. 60 IN TXT \"hp\"']}\n"
        "  - {name: fwd, from: dns-in, to: inside}",
        f'  inside: {{protocol: dns, servers: ["127.0.0.1:{unbound.port}"]}}',
    )
    try:
        assert ask(port, "ads.example.test").rcode() == dns.rcode.NXDOMAIN
        assert ask(port, "a.b.tracker.test").rcode() == dns.rcode.NXDOMAIN
        assert ask(port, "www.example.test", "ANY").rcode() == dns.rcode.REFUSED
        local = ask(port, "printer.lan.test")
        assert local.flags & dns.flags.AA and local.answer[0][0].address == "192.0.2.200"
        nodata = ask(port, "printer.lan.test", "AAAA")
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
        # The block list is re-read on SIGHUP.
        (tmp_path / "block.txt").write_text("www.example.test\n")
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("configuration reloaded", since=mark)
        assert ask(port, "www.example.test").rcode() == dns.rcode.NXDOMAIN
        assert ask(port, "loopback.example.test").answer[0][0].address == "127.0.0.1"
    finally:
        gw.stop()


def test_bad_input_never_breaks_the_listener(
    forwarding: tuple[GatewayProcess, int, Unbound],
) -> None:
    gw, port, _ = forwarding
    good = dns.message.make_query("www.example.test", "A").to_wire()
    header = good[:12]
    loop = bytearray(header)
    loop[4:6] = b"\x00\x01"
    loop += b"\xc0\x0c\x00\x01\x00\x01"  # a compression pointer to itself
    cases = [
        b"",
        b"\x00",
        header[:7],
        bytes(loop),
        header[:4] + b"\x00\x00" + header[6:],  # QDCOUNT 0
        header[:4] + b"\x00\x05" + header[6:] + good[12:],  # QDCOUNT 5, one question
        good[:-3],  # cut in the question
        bytes(random.Random(7).getrandbits(8) for _ in range(300)),
        b"\x80" * 12,  # a response, not a query
    ]
    rng = random.Random(1)
    cases += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 80))) for _ in range(200)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        formerr = 0
        for case in cases[:9]:
            s.sendto(case, ("127.0.0.1", port))
            try:
                data = s.recv(65535)
            except TimeoutError:
                continue
            assert data[:2] == case[:2], "the answer must carry the query's ID"
            if data[3] & 0x0F == dns.rcode.FORMERR:
                formerr += 1
        for case in cases[9:]:
            s.sendto(case, ("127.0.0.1", port))
        s.settimeout(1.0)
        try:
            while True:
                s.recv(65535)
        except TimeoutError:
            pass
    assert formerr >= 4
    assert ask(port, "www.example.test").answer[0][0].address == "192.0.2.10"
    log = gw.log_text()
    assert "Traceback" not in log, log[-3000:]


def _established(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return len([line for line in out.stdout.splitlines() if line.strip()])


def test_dns_to_web_through_dnsdist_doh_with_a_bounded_pool(
    tmp_path: Path, unbound: Unbound, dnsdist_factory
) -> None:  # type: ignore[no-untyped-def]
    dnsdist = dnsdist_factory(upstreams=[unbound.port])
    gw, port = start_gateway(
        tmp_path,
        "  - {name: web, from: dns-in, to: doh, cache: false}",
        f"  doh: {{protocol: doh, url: '{dnsdist.doh_url}', ca: '{dnsdist.cert}', connections: 2}}",
    )
    try:
        assert ask(port, "www.example.test").answer[0][0].address == "192.0.2.10"
        out = dig("@127.0.0.1", "-p", str(port), "whoami.test", "TXT", "+short")
        assert out.stdout.strip() == '"unbound-1"', out.stdout + out.stderr
        # Under load the gateway keeps to its pool of two connections to dnsdist.
        # Batches of 50 queries in flight at once (UDP: a lost datagram is asked again).
        peak = 0
        answered = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            for batch in range(6):
                pending = {}
                for i in range(50):
                    q = dns.message.make_query(f"n{batch}-{i}.example.test", "A")
                    q.id = batch * 50 + i + 1  # distinct: random IDs collide now and then
                    pending[q.id] = q.to_wire()
                for _attempt in range(3):
                    for wire in pending.values():
                        s.sendto(wire, ("127.0.0.1", port))
                    peak = max(peak, _established(dnsdist.doh_port))
                    try:
                        while pending:
                            data = s.recv(65535)
                            if pending.pop(int.from_bytes(data[:2], "big"), None) is not None:
                                answered += 1
                    except TimeoutError:
                        continue
                    break
                peak = max(peak, _established(dnsdist.doh_port))
        assert answered == 300
        assert 1 <= peak <= 2, f"{peak} connections to dnsdist"
    finally:
        gw.stop()


def test_web_to_dns_curl_kdig_and_json(tmp_path: Path, unbound: Unbound) -> None:
    cert, key = make_tls_cert(tmp_path / "tls")
    dns_port, doh_port, admin = free_udp_tcp_port(), free_port(), free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  doh-in:
    protocol: doh
    listen: "ssl:{doh_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
  dns-in:
    protocol: dns
    listen: "udp:{dns_port}:interface=127.0.0.1"
destinations:
  inside: {{protocol: dns, servers: ["127.0.0.1:{unbound.port}"]}}
routes:
  - {{from: [doh-in, dns-in], to: inside}}
"""
    )
    with GatewayProcess(path) as gw:
        gw.start(doh_port)
        url = f"https://127.0.0.1:{doh_port}/dns-query"
        answer = doh_query(url, dns.message.make_query("www.example.test", "A"), cacert=cert)
        assert answer.status == 200
        assert answer.message().answer[0][0].address == "192.0.2.10"
        assert "max-age=" in answer.headers.get("cache-control", "")
        get = doh_query(
            url,
            dns.message.make_query("www.example.test", "A"),
            cacert=cert,
            method="GET",
            http_version="1.1",
        )
        assert get.status == 200 and get.message().answer[0][0].address == "192.0.2.10"
        out = kdig(
            "@127.0.0.1",
            "-p",
            str(doh_port),
            "+https",
            f"+tls-ca={cert}",
            "+short",
            "loopback.example.test",
        )
        assert out.stdout.strip() == "127.0.0.1", out.stdout + out.stderr
        # curl resolving a host name through the gateway, then fetching from it.
        out = curl(
            "--doh-url",
            url,
            "--cacert",
            str(cert),
            "-o",
            "/dev/null",
            "-w",
            "%{remote_ip}",
            f"https://loopback.example.test:{doh_port}/dns-query?name=www.example.test",
            "-k",
        )
        assert out.stdout.strip() == "127.0.0.1", out.stdout + out.stderr
        out = curl(
            "--cacert",
            str(cert),
            "-H",
            "accept: application/dns-json",
            f"{url}?name=www.example.test&type=A",
        )
        body = json.loads(out.stdout)
        assert body["Status"] == 0 and body["Answer"][0]["data"] == "192.0.2.10"
        out = curl("--cacert", str(cert), "-o", "/dev/null", "-w", "%{http_code}", f"{url}?dns=!!!")
        assert out.stdout == "400"
        out = curl(
            "--cacert",
            str(cert),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "content-type: text/plain",
            "--data-binary",
            "x",
            url,
        )
        assert out.stdout == "415"
        # HTTP/2 is offered by ALPN (curl takes it when offered).
        out = curl(
            "--cacert",
            str(cert),
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "-H",
            "accept: application/dns-json",
            f"{url}?name=www.example.test&type=A",
        )
        assert out.stdout == "2", out.stdout + out.stderr
        # /metrics counts the DoH listener's open connections.
        context = ssl.create_default_context(cafile=str(cert))
        with (
            socket.create_connection((LOOPBACK, doh_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as held,
        ):
            held.sendall(b"GET /dns-query?name=www.example.test HTTP/1.1\r\nHost: x\r\n\r\n")
            assert held.recv(4096).startswith(b"HTTP/1.1 200 ")
            assert _open_connections(admin, "doh-in") == 1.0
        deadline = time.monotonic() + 10
        while _open_connections(admin, "doh-in") != 0.0:
            assert time.monotonic() < deadline, "the closed DoH connection is still counted"
            time.sleep(0.1)


def _open_connections(admin: int, listener: str) -> float | None:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{admin}/metrics", timeout=10) as response:
        text = response.read().decode()
    prefix = f'gateway_listener_open_connections{{listener="{listener}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


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


# --- who is answered, and how much over UDP ------------------------------------------------

HUGE = tuple(f"huge.example.test. 300 IN A 10.0.{i // 250}.{i % 250 + 1}" for i in range(600))


def test_answers_over_8192_octets_from_upstream_are_passed_on_whole_or_truncated(
    tmp_path: Path, unbound_factory
) -> None:  # type: ignore[no-untyped-def]
    """Defect: the upstream socket read 8,192 octets of each datagram (Twisted's default),
    so a longer answer reached the client cut short, claiming all its records, without TC.
    Now it is read whole; a client gets it whole if the listener's max_udp_size and its
    buffer allow, else TC (and over TCP it gets everything)."""
    upstream = unbound_factory(
        records=HUGE, extra_config="max-udp-size: 65535\nedns-buffer-size: 65535"
    )
    gw, port = start_gateway(
        tmp_path,
        "  - {name: fwd, from: dns-in, to: inside, cache: false}",
        f'  inside: {{protocol: dns, servers: ["127.0.0.1:{upstream.port}"]}}',
    )
    try:
        capped = ask(port, "huge.example.test", use_edns=0, payload=65000)
        assert capped.flags & dns.flags.TC and not capped.answer
        whole = ask(port, "huge.example.test", tcp=True)
        assert len(whole.answer[0]) == 600
    finally:
        gw.stop()
    path = tmp_path / "routes.yaml"
    path.write_text(
        path.read_text().replace("protocol: dns\n", "protocol: dns\n    max_udp_size: 65535\n", 1)
    )
    roomy_gw = GatewayProcess(path)
    roomy_gw.start(port)
    try:
        roomy = ask(port, "huge.example.test", use_edns=0, payload=65000)
        assert not roomy.flags & dns.flags.TC and len(roomy.answer[0]) == 600
        assert len(roomy.to_wire()) > 8192
    finally:
        roomy_gw.stop()


def test_clients_outside_allow_get_refused_over_udp_tcp_and_doh(
    tmp_path: Path, unbound: Unbound
) -> None:
    """Defect: 'allow' of DNS and DoH listeners was accepted and never enforced: with
    allow: [10.99.0.0/16], 127.0.0.1 was answered over UDP, TCP and DoH (an open
    resolver to the world when listening on a public address)."""
    cert, key = make_tls_cert(tmp_path / "tls")
    dns_port, doh_port = free_udp_tcp_port(), free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
listeners:
  dns-in:
    protocol: dns
    listen: ["udp:{dns_port}:interface=127.0.0.1", "tcp:{dns_port}:interface=127.0.0.1"]
    allow: [10.99.0.0/16, 127.0.0.2/32]
  doh-in:
    protocol: doh
    listen: "ssl:{doh_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    allow: [10.99.0.0/16]
destinations:
  inside: {{protocol: dns, servers: ["127.0.0.1:{unbound.port}"]}}
routes:
  - {{from: [dns-in, doh-in], to: inside}}
"""
    )
    with GatewayProcess(path) as gw:
        gw.start([dns_port, doh_port])
        for tcp in (False, True):
            refused = ask(dns_port, "www.example.test", tcp=tcp)
            assert refused.rcode() == dns.rcode.REFUSED and not refused.answer
        answered = ask(dns_port, "www.example.test", source="127.0.0.2")
        assert answered.answer[0][0].address == "192.0.2.10"
        out = dig("@127.0.0.1", "-p", str(dns_port), "www.example.test")
        assert "status: REFUSED" in out.stdout, out.stdout + out.stderr
        url = f"https://127.0.0.1:{doh_port}/dns-query"
        over_doh = doh_query(url, dns.message.make_query("www.example.test", "A"), cacert=cert)
        assert over_doh.status == 200 and over_doh.message().rcode() == dns.rcode.REFUSED
        queries = tmp_path / "queries.txt"
        queries.write_text("www.example.test A\nloopback.example.test A\n")
        perf = subprocess.run(
            ["dnsperf", "-s", "127.0.0.1", "-p", str(dns_port), "-d", str(queries), "-l", "1"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert "REFUSED" in perf.stdout and "NOERROR" not in perf.stdout, perf.stdout
        assert unbound.query_count() == 1  # only the allowed client's query went on


def test_http2_rapid_reset_on_doh_closes_the_connection_with_one_log_line(
    tmp_path: Path,
) -> None:
    """Defect: HEADERS then RST_STREAM at once (HTTP/2 rapid reset, CVE-2023-44487) made
    twisted.web log "critical Unhandled Error" twice per connection (StreamIDTooLowError,
    StreamClosedError). The connection is now counted, closed and logged once."""
    import h2.config
    import h2.connection

    cert, key = make_tls_cert(tmp_path / "tls")
    port, admin = free_port(), free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  doh-in:
    protocol: doh
    listen: "ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
routes:
  - {{from: doh-in, answer: ["www.example.test. 60 IN A 192.0.2.10"]}}
"""
    )
    query = base64.urlsafe_b64encode(dns.message.make_query("www.example.test", "A").to_wire())
    target = b"/dns-query?dns=" + query.rstrip(b"=")
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    with GatewayProcess(path) as gw:
        gw.start([port, admin])
        for _ in range(3):
            with context.wrap_socket(socket.create_connection(("127.0.0.1", port))) as tls:
                assert tls.selected_alpn_protocol() == "h2"
                client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                client.initiate_connection()
                for _ in range(50):
                    stream = client.get_next_available_stream_id()
                    headers = [
                        (":method", "GET"),
                        (":path", target.decode()),
                        (":scheme", "https"),
                        (":authority", "localhost"),
                    ]
                    client.send_headers(stream, headers, end_stream=True)
                    client.reset_stream(stream)
                tls.sendall(client.data_to_send())
                tls.settimeout(10)
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    while tls.recv(65536):
                        pass  # until the gateway closes the connection
        # The listener still answers well-behaved clients.
        answer = doh_query(
            f"https://127.0.0.1:{port}/dns-query",
            dns.message.make_query("www.example.test", "A"),
            cacert=cert,
        )
        assert answer.message().answer[0][0].address == "192.0.2.10"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
        log = gw.log_text()
    assert "critical" not in log and "Traceback" not in log, log
    assert log.count("rapid reset") == 3, log
    assert (
        'gateway_listener_connections_aborted_total{listener="doh-in",reason="stream_reset"} 3.0'
        in metrics
    )


def test_response_rate_limiting_holds_a_flood_to_the_rate_and_others_are_answered(
    tmp_path: Path,
) -> None:
    """dnsperf floods one query from 127.0.0.1: answers are held to rate_limit (slip 0: the
    rest dropped) while another client, and the same client over TCP, are answered."""
    port, slipping = free_udp_tcp_port(), free_udp_tcp_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
listeners:
  dns-in:
    protocol: dns
    listen: ["udp:{port}:interface=127.0.0.1", "tcp:{port}:interface=127.0.0.1"]
    allow: [127.0.0.0/8]
    rate_limit: {{responses: 20/s, slip: 0, ipv4_prefix: 32}}
  dns-slip:
    protocol: dns
    listen: ["udp:{slipping}:interface=127.0.0.1", "tcp:{slipping}:interface=127.0.0.1"]
    rate_limit: {{responses: 5/m, slip: 1}}
destinations: {{}}
routes:
  - {{from: [dns-in, dns-slip], answer: ["www.example.test. 60 IN A 192.0.2.10"]}}
"""
    )
    with GatewayProcess(path) as gw:
        gw.start([port, slipping])
        queries = tmp_path / "queries.txt"
        queries.write_text("www.example.test A\n")
        flood = subprocess.Popen(
            ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", "3",
             "-Q", "600", "-q", "5000", "-t", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            # During the flood: another client, and the flooded one over TCP.
            other = ask(port, "www.example.test", source="127.0.0.2")
            assert other.answer[0][0].address == "192.0.2.10"
            over_tcp = ask(port, "www.example.test", tcp=True)
            assert over_tcp.answer[0][0].address == "192.0.2.10"
            output, _ = flood.communicate(timeout=30)
        finally:
            flood.kill()
        sent = int(re.search(r"Queries sent:\s+(\d+)", output).group(1))  # type: ignore[union-attr]
        completed = int(re.search(r"Queries completed:\s+(\d+)", output).group(1))  # type: ignore[union-attr]
        # 3 s at 20/s after a burst of 20: about 80 answers out of some 1,800 queries.
        assert sent > 1000, output
        assert 50 <= completed <= 110, output
        metrics = gw.log_text()
        assert "Traceback" not in metrics

        # slip: 1 sends every answer over the rate truncated; the client retries over TCP.
        for _ in range(5):
            assert not ask(slipping, "www.example.test").flags & dns.flags.TC
        truncated = ask(slipping, "www.example.test")
        assert truncated.flags & dns.flags.TC and not truncated.answer
        out = dig("@127.0.0.1", "-p", str(slipping), "www.example.test")
        assert "192.0.2.10" in out.stdout and "Truncated, retrying in TCP mode" in out.stdout, (
            out.stdout
        )
