"""STARTTLS from the gateway's SMTP destination to a real Postfix smtpd.

Postfix offers STARTTLS with a self-signed certificate and relays to an
smtp-sink; its log says whether the gateway's connection used TLS.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers import (
    GatewayProcess,
    PostfixRelay,
    SmtpSink,
    SwaksExit,
    free_port,
    make_tls_cert,
    swaks_send,
)


def gateway_to(tmp_path: Path, postfix_port: int, tls_options: str) -> tuple[GatewayProcess, int]:
    port = free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
listeners:
  in: {{protocol: smtp, listen: "tcp:{port}:interface=127.0.0.1", hostname: gw.test}}
destinations:
  postfix: {{protocol: smtp, connect: "tcp:127.0.0.1:{postfix_port}", {tls_options}, retry_min: 1h}}
routes:
  - {{from: in, match: {{rcpt: '@relay\\.test$'}}, to: postfix}}
"""
    )
    gw = GatewayProcess(path)
    gw.start(port)
    return gw, port


@pytest.fixture
def sink(tmp_path: Path) -> SmtpSink:
    with SmtpSink(tmp_path / "sink").start() as s:
        yield s


def test_starttls_used_when_offered_and_verified_with_the_ca(
    tmp_path: Path, sink: SmtpSink
) -> None:
    with PostfixRelay(tmp_path / "postfix", relay_to=sink.port, tls=True) as postfix:
        assert postfix.cert is not None
        gw, port = gateway_to(
            tmp_path, postfix.port, f"tls: require, tls_verify: true, ca: '{postfix.cert}'"
        )
        try:
            code, transcript = swaks_send(port, "x@relay.test", headers={"Subject": "over tls"})
            assert code == SwaksExit.OK, transcript
            [msg] = sink.wait_for(1, timeout=20)
            assert msg.headers["Subject"] == "over tls"
            log = postfix.wait_for_log("TLS connection established from")
            assert "TLS connection established from localhost[127.0.0.1]" in log
        finally:
            gw.stop()


def test_tls_none_does_not_start_tls(tmp_path: Path, sink: SmtpSink) -> None:
    with PostfixRelay(tmp_path / "postfix", relay_to=sink.port, tls=True) as postfix:
        gw, port = gateway_to(tmp_path, postfix.port, "tls: none")
        try:
            assert swaks_send(port, "x@relay.test")[0] == SwaksExit.OK
            sink.wait_for(1, timeout=20)
            assert "TLS connection established" not in postfix.log_text()
        finally:
            gw.stop()


def test_require_without_starttls_and_a_wrong_ca_are_temporary_failures(
    tmp_path: Path, sink: SmtpSink
) -> None:
    with PostfixRelay(tmp_path / "plain", relay_to=sink.port, tls=False) as plain:
        gw, port = gateway_to(tmp_path, plain.port, "tls: require")
        try:
            assert swaks_send(port, "x@relay.test")[0] == SwaksExit.OK
            gw.wait_for_log("outcome=temporary", timeout=20)
            assert "STARTTLS" in gw.log_text()
        finally:
            gw.stop()
    other_ca, _ = make_tls_cert(tmp_path / "other-ca")
    with PostfixRelay(tmp_path / "tls", relay_to=sink.port, tls=True) as postfix:
        gw, port = gateway_to(
            tmp_path, postfix.port, f"tls: require, tls_verify: true, ca: '{other_ca}'"
        )
        try:
            assert swaks_send(port, "x@relay.test")[0] == SwaksExit.OK
            gw.wait_for_log("outcome=temporary", timeout=20)
        finally:
            gw.stop()
    assert sink.captured() == []
