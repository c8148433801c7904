"""The gateway's outbound SMTP against misbehaving peers: a real gateway process relays
to a small scripted SMTP server on 127.0.0.1 (smtp-sink cannot give these replies)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_smtp_gateway import start_gateway
from tests.peers import free_port, swaks_send


class _Peer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, bad_data_reply: bytes, bad_times: int) -> None:
        self.bad_data_reply = bad_data_reply
        self.bad_left = bad_times
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Session)


class _Session(socketserver.StreamRequestHandler):
    server: _Peer
    timeout = 60

    def handle(self) -> None:
        out = self.wfile
        out.write(b"220 peer.test ESMTP\r\n")
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.write(b"250-peer.test\r\n250 8BITMIME\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                out.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                with self.server.lock:
                    bad = self.server.bad_left > 0
                    self.server.bad_left -= 1
                if bad:
                    out.write(self.server.bad_data_reply)
                    continue
                out.write(b"354 go ahead\r\n")
                body = b""
                while (chunk := self.rfile.readline(65536)) not in (b".\r\n", b""):
                    body += chunk
                with self.server.lock:
                    self.server.bodies.append(body)
                out.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                out.write(b"221 Bye\r\n")
                return
            else:
                out.write(b"502 5.5.2 what\r\n")


@pytest.fixture
def peer_port() -> int:
    return free_port()


def _serve(port: int, reply: bytes, times: int) -> Iterator[_Peer]:
    peer = _Peer(port, reply, times)
    thread = threading.Thread(target=peer.serve_forever, daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        peer.shutdown()
        peer.server_close()


def _wait_bodies(peer: _Peer, count: int, timeout: float) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with peer.lock:
            if len(peer.bodies) >= count:
                return list(peer.bodies)
        time.sleep(0.2)
    with peer.lock:
        return list(peer.bodies)


@pytest.mark.parametrize(
    "reply",
    [b"250 2.0.0 Ok\r\n", b"250-2.0.0 fine\r\n550 5.7.1 no\r\n"],
    ids=["data-answered-250", "inconsistent-multiline"],
)
def test_confused_data_reply_is_retried_not_delivered(tmp_path: Path, reply: bytes) -> None:
    """Defect: a 2xx (or mixed-code) reply to DATA made the gateway drop the message as delivered."""
    port = free_port()
    for peer in _serve(port, reply, 1):
        gw, gw_port = start_gateway(tmp_path, port)
        try:
            code, transcript = swaks_send(
                gw_port, "bob@relay.test", headers={"Subject": "confused peer"}
            )
            assert code == 0, transcript
            bodies = _wait_bodies(peer, 1, 30)
            assert len(bodies) == 1, gw.log_text()
            assert b"Subject: confused peer" in bodies[0]
        finally:
            gw.stop()
    with socket.socket() as probe:  # the peer is gone: nothing listens any more
        assert probe.connect_ex(("127.0.0.1", port)) != 0
