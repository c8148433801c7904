"""Tests for the TLS pieces the web hook and DNS-over-HTTPS clients share, with in-memory handshakes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.protocol import Factory

from gateway.client_tls import UnverifiedTls, is_ip, load_trust_root
from tests.support.tls import server_key_and_certificate


def handshake(creator: UnverifiedTls, alpn: list[bytes]) -> dict[str, object]:
    """Run a handshake against a server with a self-signed certificate; what the server saw."""
    key, cert = server_key_and_certificate()  # self-signed, for doh.test
    seen: dict[str, object] = {"sni": None, "offered": None}
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate(cert)
    context.use_privatekey(key)
    context.set_tlsext_servername_callback(
        lambda conn: seen.__setitem__("sni", conn.get_servername())
    )

    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
        seen["offered"] = offered
        return next(p for p in offered if p in alpn)

    context.set_alpn_select_callback(select)
    server = SSL.Connection(context, None)
    server.set_accept_state()
    # What TLSMemoryBIOProtocol looks like to the creator: a factory wrapping the application's.
    tls_protocol = SimpleNamespace(factory=SimpleNamespace(wrappedFactory=Factory()))
    client = creator.clientConnectionForTLS(tls_protocol)
    client.set_connect_state()
    for _ in range(20):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        moved = False
        for src, dst in ((client, server), (server, client)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            dst.bio_write(data)
            moved = True
        if not moved:
            break
    seen["negotiated"] = client.get_alpn_proto_negotiated()
    seen["finished"] = client.get_finished() is not None
    return seen


def test_unverified_tls_accepts_any_certificate_and_sends_sni_for_names() -> None:
    seen = handshake(UnverifiedTls("hook.example"), [])
    assert seen["finished"]
    assert seen["sni"] == b"hook.example"
    assert seen["offered"] is None  # no ALPN unless asked for


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_unverified_tls_sends_no_sni_for_addresses(address: str) -> None:
    seen = handshake(UnverifiedTls(address), [])
    assert seen["finished"]
    assert seen["sni"] is None


def test_unverified_tls_offers_the_protocols_given() -> None:
    seen = handshake(UnverifiedTls("doh.example", [b"h2", b"http/1.1"]), [b"h2"])
    assert seen["offered"] == [b"h2", b"http/1.1"]
    assert seen["negotiated"] == b"h2"


def test_is_ip() -> None:
    assert is_ip("192.0.2.1") and is_ip("2001:db8::1")
    assert not is_ip("hook.example") and not is_ip("")


def test_load_trust_root(tmp_path: Path) -> None:
    _, cert = server_key_and_certificate()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    good = tmp_path / "ca.pem"
    good.write_bytes(b"a comment first\n" + cert_pem)
    assert load_trust_root(str(good)) is not None
    with pytest.raises(ValueError, match=r"cannot read the CA file .*missing\.pem"):
        load_trust_root(str(tmp_path / "missing.pem"))
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificate here\n")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        load_trust_root(str(empty))
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="holds a certificate that cannot be read"):
        load_trust_root(str(broken))
