"""The TLS every listener speaks on an ssl: endpoint, as testssl.sh sees it.

Defect (issue 16): Twisted's defaults offered CBC suites (LUCKY13 "potentially
vulnerable") and static RSA key exchange, resumed no session, and the DoH
listener named TwistedWeb and its version and sent no HSTS. The listeners now
share one policy (gateway.tls). The SMTP listener here uses a Twisted ssl:
endpoint string, the others a tls: endpoint with a tls: block.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import (
    TESTSSL_IGNORED,
    GatewayProcess,
    free_port,
    make_ca_signed_cert,
    run_testssl,
    tls_session_resumed,
)


@dataclasses.dataclass(frozen=True)
class TlsGateway:
    ports: dict[str, int]  # doh, http, smtp
    ca: Path
    root: Path


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsGateway]:
    root = tmp_path_factory.mktemp("tls")
    ca, chain, key = make_ca_signed_cert(root / "pki")
    ports = {"doh": free_port(), "http": free_port(), "smtp": free_port()}
    tls = f"privateKey={key}:certKey={chain}"
    path = root / "routes.yaml"
    path.write_text(
        f"""
version: 1
listeners:
  doh-in:
    protocol: doh
    listen: "tls:{ports["doh"]}:interface=127.0.0.1"
    tls: {{certificate: '{chain}', key: '{key}'}}
  web-in:
    protocol: http
    listen: "tls:{ports["http"]}:interface=127.0.0.1"
    tls: {{certificate: '{chain}', key: '{key}'}}
  mail-in:
    protocol: smtp
    listen: "ssl:{ports["smtp"]}:interface=127.0.0.1:{tls}"
    hostname: gw.test
destinations:
  box: {{protocol: maildir, path: box}}
routes:
  - {{from: doh-in, answer: ["www.example.test. 60 IN A 192.0.2.10"]}}
  - {{from: mail-in, to: box}}
  - {{from: web-in, transforms: [http_to_mail], options: {{from: a@b.test, to: c@d.test}}, to: box}}
"""
    )
    gateway = GatewayProcess(path)
    gateway.start(list(ports.values()))
    try:
        yield TlsGateway(ports, ca, root)
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def listeners(tls_gateway: TlsGateway) -> dict[str, dict[str, dict[str, str]]]:
    """testssl.sh's findings per listener, by id."""
    # The three scans at once: each is mostly waiting for handshakes.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = {
            name: pool.submit(
                run_testssl, port, tls_gateway.ca, tls_gateway.root / f"{name}.json",
                http=name != "smtp",
            )
            for name, port in tls_gateway.ports.items()
        }  # fmt: skip
        return {name: {f["id"]: f for f in run.result()} for name, run in runs.items()}


@pytest.mark.parametrize("listener", ["doh", "http", "smtp"])
def test_no_finding_is_high_or_critical_and_only_modern_tls_is_offered(
    listeners: dict[str, dict[str, dict[str, str]]], listener: str
) -> None:
    scan = listeners[listener]
    serious = [
        f"{f['id']}: {f['finding']}"
        for f in scan.values()
        if f["severity"] in ("HIGH", "CRITICAL", "FATAL") and f["id"] not in TESTSSL_IGNORED
    ]
    assert serious == []
    assert scan["TLS1"]["finding"] == "not offered"
    assert scan["TLS1_1"]["finding"] == "not offered"
    assert scan["TLS1_2"]["finding"] == "offered"
    assert scan["TLS1_3"]["finding"].startswith("offered")
    assert scan["LUCKY13"]["severity"] == "OK"  # no CBC suite
    ciphers = [f["finding"] for id_, f in scan.items() if id_.startswith("cipher-tls1_2_")]
    assert ciphers, "testssl.sh listed no TLS 1.2 cipher"
    for cipher in ciphers:
        name = cipher.split()[3]
        # Forward secret key exchange and an AEAD cipher, nothing else.
        assert name.startswith(("ECDHE-", "DHE-")), cipher
        assert "GCM" in name or "CHACHA20" in name, cipher


@pytest.mark.parametrize("listener", ["doh", "http", "smtp"])
@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
def test_sessions_are_resumed(tls_gateway: TlsGateway, listener: str, version: str) -> None:
    """A reconnecting client skips the full handshake (by ticket in TLS 1.3, by ticket or
    session ID in 1.2). testssl.sh checks this too, but hangs up before TLS 1.3 tickets
    arrive on a busy machine and then reports "connect problem"; s_client here waits."""
    gw = tls_gateway
    assert tls_session_resumed(gw.ports[listener], gw.ca, version, gw.root)


def test_the_doh_listener_names_no_software_and_sends_hsts(
    listeners: dict[str, dict[str, dict[str, str]]],
) -> None:
    scan = listeners["doh"]
    assert scan["banner_server"]["finding"] == "gateway"
    assert scan["HSTS_time"]["severity"] == "OK"
