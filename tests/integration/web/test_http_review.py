"""Findings of the HTTP review, checked through a real gateway process against a real nginx."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.web.conftest import NginxFactory
from tests.peers import LOOPBACK, GatewayProcess, free_port
from tests.peers_web import Nginx

BIG = 8 * 1024 * 1024


def _config(directory: Path, port: int, upstream: str) -> Path:
    path = directory / "routes.yaml"
    path.write_text(
        f"""version: 1
spool: {directory}/spool
listeners:
  web:
    protocol: http
    listen: tcp:{port}:interface=127.0.0.1
    idle_timeout: 4s
destinations:
  origin:
    protocol: http
    url: [{upstream}]
    timeout: 1s
    connect_timeout: 2s
    fail_timeout: 60s
routes:
  - name: public
    from: web
    match: {{prefix: /public/}}
    to: origin
  - name: to-origin
    from: web
    match: {{prefix: /, method: [GET, HEAD, POST]}}
    to: origin
"""
    )
    return path


@pytest.fixture
def origin(nginx_factory: NginxFactory) -> Nginx:
    return nginx_factory(big_size=BIG)


@pytest.fixture
def gateway(tmp_path: Path, origin: Nginx) -> Iterator[tuple[GatewayProcess, int]]:
    port = free_port()
    with GatewayProcess(_config(tmp_path, port, origin.url)).start(port, timeout=30) as process:
        yield process, port
        assert "Traceback" not in process.log_text()


def _exchange(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send raw bytes, read until the gateway closes or goes quiet for a second."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        sock.settimeout(1.0)
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                if out:
                    break
                continue
            if not piece:
                break
            out += piece
        return out


def _entries(origin: Nginx, wanted: int) -> list[str]:
    """The nginx access log's "METHOD uri" pairs, once it has at least ``wanted`` of them."""
    deadline = time.monotonic() + 10
    while True:
        entries = [f"{e.method} {e.uri}" for e in origin.entries()]
        if len(entries) >= wanted or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def test_connection_naming_content_length_cannot_smuggle_a_request(
    gateway: tuple[GatewayProcess, int], origin: Nginx
) -> None:
    _, port = gateway
    smuggled = b"GET /file HTTP/1.1\r\nHost: h\r\n\r\n"
    answer = _exchange(
        port,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nConnection: Content-Length\r\n"
        b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled,
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert smuggled in answer  # the "request" came back as the POST's body
    time.sleep(0.5)
    assert _entries(origin, 1) == ["POST /echo"]


@pytest.mark.parametrize("path", ["/public/../file", "/public/%2e%2e/file", "/public/..%2Ffile"])
def test_dot_segments_do_not_leave_the_route(
    gateway: tuple[GatewayProcess, int], origin: Nginx, path: str
) -> None:
    _, port = gateway
    answer = _exchange(port, b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path.encode())
    assert answer.startswith(b"HTTP/1.1 400 ")
    time.sleep(0.3)
    assert _entries(origin, 0) == []


def test_head_of_a_big_file_answers_at_once_and_keeps_the_connection(
    gateway: tuple[GatewayProcess, int], origin: Nginx
) -> None:
    _, port = gateway
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        started = time.monotonic()
        conn.request("HEAD", "/big")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == str(BIG)
        assert response.read() == b""
        assert time.monotonic() - started < 5
        conn.request("GET", "/file")
        response = conn.getresponse()
        assert response.status == 200 and len(response.read()) == 1024
    finally:
        conn.close()


def test_a_client_that_stalls_its_upload_gets_408_and_the_upstream_stays_healthy(
    gateway: tuple[GatewayProcess, int], origin: Nginx
) -> None:
    process, port = gateway
    # The destination's timeout is 1s, the listener's idle timeout 4s: the stall is the
    # client's, so it is the listener that answers, and nginx is not marked failed.
    answer = _exchange(
        port, b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    )
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert "skipped for" not in process.log_text()
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        conn.request("POST", "/echo", body=b"y" * 100)
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"y" * 100
    finally:
        conn.close()
