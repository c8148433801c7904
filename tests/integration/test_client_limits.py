"""Limits per client against real clients: smtp-source and swaks for SMTP, curl for HTTP.

Defect (issue 16): nothing limited how many connections one address could
hold or how fast it could send; one busy client could keep every other out.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import GatewayProcess, curl, free_port, smtp_source, swaks_send


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, dict[str, int]]]:
    ports = {"smtp": free_port(), "http": free_port(), "admin": free_port()}
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
admin: tcp:{ports["admin"]}:interface=127.0.0.1
listeners:
  mail-in:
    protocol: smtp
    listen: tcp:{ports["smtp"]}:interface=127.0.0.1
    hostname: gw.test
    limits: {{connections: 3, message_rate: 200/h}}
  web-in:
    protocol: http
    listen: tcp:{ports["http"]}:interface=127.0.0.1
    limits: {{request_rate: 5/m}}
destinations:
  box: {{protocol: maildir, path: box}}
routes:
  - {{from: mail-in, to: box}}
  - {{from: web-in, transforms: [http_to_mail], options: {{from: a@b.test, to: c@d.test}}, to: box}}
"""
    )
    gw = GatewayProcess(path)
    gw.start([ports["smtp"], ports["http"], ports["admin"]])
    try:
        yield gw, ports
    finally:
        gw.stop()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


def test_smtp_source_over_its_connection_limit_gets_421_while_another_client_gets_in(
    gateway: tuple[GatewayProcess, dict[str, int]],
) -> None:
    _, ports = gateway
    busy = smtp_source(ports["smtp"], sessions=20, messages=100)
    # smtp-source stops at the first refused session, saying what it was told.
    assert busy.returncode != 0
    assert "421 4.7.0 gw.test Too many connections from 127.0.0.1" in busy.stderr
    # Another address (127.0.0.2 is loopback too) is not held back.
    status, transcript = swaks_send(
        ports["smtp"], "c@d.test", extra_args=["--local-interface", "127.0.0.2"]
    )
    assert status == 0, transcript
    metrics = _metrics(ports["admin"])
    refused = re.search(
        r'gateway_listener_connections_refused_total\{listener="mail-in",'
        r'reason="client_connections"\} (\d+)',
        metrics,
    )
    assert refused is not None and int(refused.group(1)) >= 1
    assert 'gateway_listener_limit{limit="connections",listener="mail-in"} 3.0' in metrics
    assert 'gateway_listener_limit_clients{limit="message_rate",listener="mail-in"}' in metrics


def test_curl_over_the_request_rate_gets_429_with_retry_after(
    gateway: tuple[GatewayProcess, dict[str, int]],
) -> None:
    _, ports = gateway
    url = f"http://127.0.0.1:{ports['http']}/hook"
    # Seven requests on one connection: the burst of five, then two over the rate.
    args: list[str] = []
    for n in range(7):
        args += [*(["--next"] if n else []), "--include", "--data", "x", url]
    result = curl(*args)
    statuses = re.findall(r"^HTTP/1.1 (\d{3})", result.stdout, re.MULTILINE)
    assert statuses == ["202"] * 5 + ["429"] * 2, result.stdout
    assert re.search(r"^Retry-After: (\d+)\r?$", result.stdout, re.MULTILINE | re.IGNORECASE)
    wait = int(re.findall(r"^Retry-After: (\d+)", result.stdout, re.MULTILINE)[0])
    assert 1 <= wait <= 12  # a token every 12 s at 5/m
    metrics = _metrics(ports["admin"])
    assert 'gateway_listener_rate_limited_total{limit="request_rate",listener="web-in"} 2.0' in (
        metrics
    )
