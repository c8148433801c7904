"""The DNS peer fixtures work against the real programs (unbound, dnsdist, dig, kdig, curl)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.conftest import DnsdistFactory, UnboundFactory
from tests.peers import (
    LOOPBACK,
    Unbound,
    dig,
    dns_probe,
    doh_query,
    kdig,
    make_tls_cert,
    port_accepts,
)


def dig_at(port: int, *args: str) -> str:
    """dig's full output for a query to 127.0.0.1:port; fails the test if dig fails."""
    result = dig(f"@{LOOPBACK}", "-p", str(port), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def header(output: str) -> tuple[str, set[str], dict[str, int]]:
    """(status, flags, section counts) from dig's or kdig's header lines."""
    status = re.search(r"->>HEADER<<- opcode: \w+[,;] status: (\w+)", output)
    flags = re.search(r"flags: ([a-z ]*);", output, re.IGNORECASE)
    counts = dict(re.findall(r"(QUERY|ANSWER|AUTHORITY|ADDITIONAL): (\d+)", output))
    assert status and flags, output
    return status.group(1), set(flags.group(1).split()), {k: int(v) for k, v in counts.items()}


def test_dig_gets_the_a_record_over_udp_and_tcp(unbound: Unbound) -> None:
    for transport in ("+notcp", "+tcp"):
        output = dig_at(unbound.port, transport, "www.example.test", "A")
        status, flags, counts = header(output)
        assert status == "NOERROR"
        assert "aa" in flags  # local data is authoritative
        assert counts["ANSWER"] == 1
        assert re.search(r"^www\.example\.test\.\s+300\s+IN\s+A\s+192\.0\.2\.10$", output, re.M)
    assert "(TCP)" in output


def test_big_name_is_truncated_over_udp_and_whole_over_tcp(unbound: Unbound) -> None:
    udp = dig_at(unbound.port, "+noedns", "+ignore", "big.example.test", "A")
    status, flags, counts = header(udp)
    assert status == "NOERROR"
    assert "tc" in flags
    assert counts["ANSWER"] < 100

    tcp = dig_at(unbound.port, "+tcp", "big.example.test", "A")
    status, flags, counts = header(tcp)
    assert "tc" not in flags
    assert counts["ANSWER"] == 100
    answers = set(re.findall(r"^big\.example\.test\.\s+300\s+IN\s+A\s+(\S+)$", tcp, re.M))
    assert answers == {f"192.0.2.{i}" for i in range(1, 101)}


def test_names_outside_the_data(unbound: Unbound) -> None:
    status, _, counts = header(dig_at(unbound.port, "www.example.com", "A"))
    assert status == "REFUSED"
    assert counts["ANSWER"] == 0

    missing = dig_at(unbound.port, "missing.example.test", "A")
    status, flags, counts = header(missing)
    assert status == "NXDOMAIN"
    assert "aa" in flags
    # The zone's SOA rides along, as from a real authoritative server.
    assert counts["AUTHORITY"] == 1
    assert re.search(r"^example\.test\.\s+\d+\s+IN\s+SOA\s", missing, re.M)

    # Outside our zones but under test.: unbound's built-in zone says NXDOMAIN.
    assert header(dig_at(unbound.port, "other.test", "A"))[0] == "NXDOMAIN"


def test_query_count_counts_each_query_exactly(unbound: Unbound) -> None:
    # The readiness probes of start() are not counted.
    assert unbound.query_count() == 0
    dig_at(unbound.port, "www.example.test", "A")
    dig_at(unbound.port, "+tcp", "www.example.test", "A")
    dig_at(unbound.port, "missing.example.test", "AAAA")
    dig_at(unbound.port, "www.example.com", "A")
    assert dns_probe(unbound.port)  # a probe: left out again
    assert unbound.query_count() == 4
    assert unbound.query_count("www.example.test") == 2
    assert unbound.query_count("missing.example.test", "AAAA") == 1
    assert unbound.query_count(include_probes=True) > 5
    [*_, last] = unbound.queries()
    assert (last.client, last.name, last.rdtype, last.rdclass) == (
        LOOPBACK,
        "www.example.com.",
        "A",
        "IN",
    )


def test_two_unbounds_answer_different_whoami(
    unbound: Unbound, unbound_factory: UnboundFactory
) -> None:
    other = unbound_factory(records=["www.example.test. 300 IN A 192.0.2.20"])
    assert other.port != unbound.port
    expected = [(unbound, "unbound-1", "192.0.2.10"), (other, "unbound-2", "192.0.2.20")]
    for server, whoami, address in expected:
        assert dig_at(server.port, "+short", "whoami.test", "TXT").split() == [f'"{whoami}"']
        assert dig_at(server.port, "+short", "www.example.test", "A").split() == [address]


def test_dnsdist_forwards_and_passes_tc_refused_nxdomain(
    unbound: Unbound, dnsdist_factory: DnsdistFactory
) -> None:
    dnsdist = dnsdist_factory(upstreams=[unbound.port])
    assert dig_at(dnsdist.dns_port, "+short", "www.example.test").split() == ["192.0.2.10"]
    whoami = dig_at(dnsdist.dns_port, "+short", "+tcp", "whoami.test", "TXT")
    assert whoami.split() == ['"unbound-1"']
    status, flags, _ = header(dig_at(dnsdist.dns_port, "+noedns", "+ignore", "big.example.test"))
    assert status == "NOERROR" and "tc" in flags
    assert header(dig_at(dnsdist.dns_port, "www.example.com"))[0] == "REFUSED"
    status, _, counts = header(dig_at(dnsdist.dns_port, "missing.example.test"))
    assert status == "NXDOMAIN" and counts["AUTHORITY"] == 1
    # Every query went through to unbound (no cache); health checks are not counted.
    assert unbound.query_count() == 5


@pytest.mark.parametrize(("cache", "upstream_queries"), [(False, 3), (True, 1)])
def test_dnsdist_packet_cache(
    unbound: Unbound, dnsdist_factory: DnsdistFactory, cache: bool, upstream_queries: int
) -> None:
    dnsdist = dnsdist_factory(upstreams=[unbound.port], cache=cache)
    query = dns.message.make_query("www.example.test", "A")
    for _ in range(3):
        answer = dns.query.udp(query, LOOPBACK, timeout=2, port=dnsdist.dns_port)
        assert answer.rcode() == dns.rcode.NOERROR
    assert unbound.query_count("www.example.test") == upstream_queries


@pytest.mark.parametrize(("method", "http_version"), [("POST", "2"), ("POST", "1.1"), ("GET", "2")])
def test_dnsdist_doh_with_curl(
    unbound: Unbound,
    dnsdist_factory: DnsdistFactory,
    method: Literal["POST", "GET"],
    http_version: Literal["1.1", "2"],
) -> None:
    dnsdist = dnsdist_factory(upstreams=[unbound.port])
    assert dnsdist.doh_url == f"https://127.0.0.1:{dnsdist.doh_port}/dns-query"
    query = dns.message.make_query("www.example.test", "A")
    response = doh_query(
        dnsdist.doh_url,
        query,
        cacert=dnsdist.cert,
        method=method,
        http_version=http_version,
    )
    assert response.status == 200
    assert response.headers["content-type"] == "application/dns-message"
    assert response.headers["cache-control"] == "max-age=300"
    answer = response.message()
    assert answer.id == query.id
    assert answer.flags & dns.flags.QR
    [rrset] = answer.answer
    assert rrset.rdtype == dns.rdatatype.A
    assert [r.to_text() for r in rrset] == ["192.0.2.10"]
    assert unbound.query_count() == 1


def test_kdig_over_doh(unbound: Unbound, dnsdist_factory: DnsdistFactory, tmp_path: Path) -> None:
    dnsdist = dnsdist_factory(upstreams=[unbound.port])
    base = (f"@{LOOPBACK}", "-p", str(dnsdist.doh_port), "+https")
    result = kdig(*base, f"+tls-ca={dnsdist.cert}", "www.example.test", "A")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(HTTP/2-POST)" in result.stdout
    status, _, counts = header(result.stdout)
    assert status == "NOERROR" and counts["ANSWER"] == 1
    assert re.search(r"^www\.example\.test\.\s+300\s+IN\s+A\s+192\.0\.2\.10$", result.stdout, re.M)

    # kdig really checks the certificate: another CA fails the handshake.
    other_ca, _ = make_tls_cert(tmp_path / "other-ca")
    assert other_ca != dnsdist.cert
    refused = kdig(*base, f"+tls-ca={other_ca}", "www.example.test", "A")
    assert refused.returncode != 0
    assert "handshake failed" in refused.stdout + refused.stderr
    assert unbound.query_count() == 1


def test_make_tls_cert_is_made_once_per_directory(tmp_path: Path) -> None:
    cert, key = make_tls_cert(tmp_path / "tls")
    pem = cert.read_bytes()
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in key.read_bytes()
    assert make_tls_cert(tmp_path / "tls") == (cert, key)
    assert cert.read_bytes() == pem
    assert make_tls_cert(tmp_path / "elsewhere")[0].read_bytes() != pem


def test_stop_reaps_unbound_and_frees_its_port(tmp_path: Path) -> None:
    server = Unbound(tmp_path / "u", whoami="x").start()
    assert server.proc is not None
    assert dns_probe(server.port)
    server.stop()
    assert server.proc.returncode is not None  # reaped: no zombie left
    assert not port_accepts(LOOPBACK, server.port)
    assert not dns_probe(server.port)
    server.stop()  # a second stop is harmless


def test_stop_reaps_dnsdist(unbound: Unbound, dnsdist_factory: DnsdistFactory) -> None:
    dnsdist = dnsdist_factory(upstreams=[unbound.port])
    assert dnsdist.proc is not None
    dnsdist.stop()
    assert dnsdist.proc.returncode is not None
    assert not port_accepts(LOOPBACK, dnsdist.dns_port)
    assert not port_accepts(LOOPBACK, dnsdist.doh_port)


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]
        server = Unbound(tmp_path / "u", port=port)
        with pytest.raises(RuntimeError, match=r"(?i)address already in use"):
            server.start(timeout=5)
        assert server.proc is not None and server.proc.returncode is not None


def test_bad_extra_config_is_reported_before_starting(tmp_path: Path) -> None:
    server = Unbound(tmp_path / "u", extra_config="no-such-option: yes")
    with pytest.raises(RuntimeError, match="unbound-checkconf rejects"):
        server.start()
    assert server.proc is None
