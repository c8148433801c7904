"""TLS listeners (``ssl:`` endpoints) and clients that offer ALPN protocols.

Twisted's own ALPN choice aborts the handshake ("tlsv1 alert internal error")
when the listener's factory names no protocol the client offers; SMTP and NNTP
factories name none, so every client offering ALPN (curl, ``openssl s_client
-alpn h2,http/1.1``, many TLS libraries by default) failed. The gateway now
goes on without ALPN then. Each protocol is checked with a real TLS client that
offers ``h2`` and ``http/1.1``: Python's ssl (OpenSSL) for a whole SMTP
transaction and an NNTP session, and the openssl command line tool.
"""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

from tests.peers import GatewayProcess, free_port, make_tls_cert, require_binary

OFFERED = ["h2", "http/1.1"]


def tls_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(OFFERED)
    return context


def write_config(tmp_path: Path, smtps: int, nntps: int) -> Path:
    cert, key = make_tls_cert(tmp_path / "tls")
    tls = f"interface=127.0.0.1:certKey={cert}:privateKey={key}"
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
spool: spool
listeners:
  smtps: {{protocol: smtp, listen: "ssl:{smtps}:{tls}", hostname: gw.test}}
  nntps: {{protocol: nntp, listen: "ssl:{nntps}:{tls}", hostname: gw.test}}
destinations:
  box: {{protocol: maildir, path: mail}}
routes:
  - {{name: mail, from: smtps, match: {{rcpt: '@example\\.test$'}}, to: box}}
  - name: news
    from: nntps
    transforms: [news_to_mail]
    options: {{to: news@example.test}}
    to: box
"""
    )
    return path


def maildir_files(tmp_path: Path, count: int, timeout: float = 20.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted((tmp_path / "mail" / "new").glob("*"))
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def read_line(tls: ssl.SSLSocket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        piece = tls.recv(1)
        if not piece:
            break
        line += piece
    return line


def test_smtps_with_alpn_offer_takes_mail(tmp_path: Path) -> None:
    smtps, nntps = free_port(), free_port()
    path = write_config(tmp_path, smtps, nntps)
    cert = tmp_path / "tls" / "cert.pem"
    with GatewayProcess(path) as gw:
        gw.start([smtps, nntps])
        with smtplib.SMTP_SSL("127.0.0.1", smtps, context=tls_context(cert), timeout=20) as client:
            sock = client.sock
            assert isinstance(sock, ssl.SSLSocket)
            assert sock.selected_alpn_protocol() is None  # no ALPN, but no failure either
            client.ehlo("client.test")
            refused = client.sendmail(
                "alice@client.test",
                ["bob@example.test"],
                b"Subject: over smtps\r\nFrom: alice@client.test\r\n\r\nALPN was offered\r\n",
            )
            assert refused == {}
        [stored] = maildir_files(tmp_path, 1)
        mail = email.message_from_bytes(stored.read_bytes(), policy=email.policy.default)
        assert mail["Subject"] == "over smtps"
        assert "tlsv1 alert" not in gw.log_text()


def test_nntps_with_alpn_offer_greets(tmp_path: Path) -> None:
    smtps, nntps = free_port(), free_port()
    path = write_config(tmp_path, smtps, nntps)
    cert = tmp_path / "tls" / "cert.pem"
    with GatewayProcess(path) as gw:
        gw.start([smtps, nntps])
        raw = socket.create_connection(("127.0.0.1", nntps), timeout=20)
        with tls_context(cert).wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() is None
            assert read_line(tls).startswith(b"200 "), "no NNTP greeting over TLS"
            article = (
                b"From: alice@client.test\r\nNewsgroups: local.test\r\n"
                b"Subject: over nntps\r\n\r\nALPN was offered\r\n.\r\n"
            )
            tls.sendall(b"POST\r\n")
            assert read_line(tls).startswith(b"340 ")
            tls.sendall(article)
            assert read_line(tls).startswith(b"240 ")
            tls.sendall(b"QUIT\r\n")
            assert read_line(tls).startswith(b"205 ")
        [stored] = maildir_files(tmp_path, 1)
        assert b"Subject: over nntps" in stored.read_bytes()


def test_openssl_client_offering_h2_gets_each_banner(tmp_path: Path) -> None:
    openssl = require_binary("openssl")
    smtps, nntps = free_port(), free_port()
    path = write_config(tmp_path, smtps, nntps)
    cert = tmp_path / "tls" / "cert.pem"
    with GatewayProcess(path) as gw:
        gw.start([smtps, nntps])
        for port, banner in ((smtps, "220 gw.test"), (nntps, "200 gw.test")):
            # Without -quiet, s_client prints the handshake's outcome, then what the server
            # says; it is stopped once the banner came (or the handshake failed).
            argv = [
                openssl, "s_client", "-alpn", ",".join(OFFERED), "-CAfile", str(cert),
                "-connect", f"127.0.0.1:{port}", "-verify_return_error", "-ign_eof",
            ]  # fmt: skip
            out = run_until(argv, banner, timeout=30)
            assert "alert internal error" not in out, out
            assert "No ALPN negotiated" in out, out
            assert banner in out, out
        assert "Traceback" not in gw.log_text()


def run_until(argv: list[str], wanted: str, timeout: float) -> str:
    """Run argv until it prints ``wanted`` or exits (bounded by timeout); all it printed."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while wanted.encode() not in out and time.monotonic() < deadline:
            piece = proc.stdout.read()
            if piece:
                out += piece
            elif proc.poll() is not None:
                out += proc.stdout.read() or b""
                break
            else:
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdin is not None:
            proc.stdin.close()
        proc.stdout.close()
    return out.decode("utf-8", "replace")
