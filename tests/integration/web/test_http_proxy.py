"""The http listener and the http (reverse proxy) destination against a real nginx upstream."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NginxFactory
from tests.peers import (
    LOOPBACK,
    GatewayProcess,
    free_port,
    make_tls_cert,
    require_binary,
    wait_until,
)
from tests.peers_web import HangingServer, Nginx, raw_exchange, request

BIG = 100 * 1024 * 1024


def write_config(
    directory: Path,
    port: int,
    urls: list[str],
    *,
    extra_listeners: str = "",
    extra_routes: str = "",
    destination: str = "",
) -> Path:
    url_list = "[" + ", ".join(urls) + "]"
    path = directory / "routes.yaml"
    path.write_text(
        f"""version: 1
spool: {directory}/spool
listeners:
  web:
    protocol: http
    listen: tcp:{port}:interface=127.0.0.1
    max_size: 200MiB
{extra_listeners}
destinations:
  origin:
    protocol: http
    url: {url_list}
    timeout: 2s
    connect_timeout: 2s
{destination}
routes:
{extra_routes}
  - name: to-origin
    from: web
    to: origin
"""
    )
    return path


@pytest.fixture
def gateway_port() -> int:
    return free_port()


def start_gateway(config: Path, port: int | list[int]) -> GatewayProcess:
    return GatewayProcess(config).start(port, timeout=30)


@pytest.fixture
def gateway(tmp_path: Path, nginx: Nginx, gateway_port: int) -> Iterator[GatewayProcess]:
    config = write_config(
        tmp_path,
        gateway_port,
        [nginx.url],
        extra_routes="""  - name: api
    from: web
    match: {prefix: /api/, method: [GET, HEAD]}
    to: api
  - name: by-host
    from: web
    match: {host: [static.example.test]}
    to: origin
""",
        destination=f"""  api:
    protocol: http
    url: {nginx.url}
    strip_prefix: /api
    host: upstream
""",
    )
    with start_gateway(config, gateway_port) as process:
        yield process
        assert "Traceback" not in process.log_text()


def status_of(response: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert m, f"not an HTTP response: {response[:200]!r}"
    return int(m.group(1))


# --- requests and responses -----------------------------------------------------------


def test_get_and_post_are_proxied_with_forwarding_headers(
    gateway: GatewayProcess, gateway_port: int, nginx: Nginx
) -> None:
    status, headers, body = request(gateway_port, "GET", "/file")
    assert status == 200
    assert body == (nginx.root / "file").read_bytes()
    assert headers["content-length"] == "1024"

    payload = os.urandom(1024 * 1024 + 17)
    status, _, body = request(gateway_port, "POST", "/echo", payload)
    assert status == 200
    assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()

    status, _, body = request(
        gateway_port,
        "GET",
        "/headers",
        headers={
            "X-Forwarded-For": "198.51.100.7",
            "X-Custom": "hop",
            "Connection": "X-Custom",
            "Keep-Alive": "timeout=5",
            "X-Forwarded-Proto": "https",
        },
    )
    assert status == 200
    seen = dict(line.split("=", 1) for line in body.decode().splitlines())
    assert seen["xff"] == "198.51.100.7, 127.0.0.1"
    assert seen["proto"] == "http"  # the client cannot claim https
    assert seen["forwarded"] == f'for=127.0.0.1;proto=http;host="127.0.0.1:{gateway_port}"'
    assert seen["host"] == f"127.0.0.1:{gateway_port}"
    # Hop-by-hop fields, and those the client's Connection names, stop at the gateway.
    assert seen["custom"] == ""
    assert seen["keepalive"] == ""

    # Chunked request bodies arrive whole.
    answer = raw_exchange(
        gateway_port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
    )
    assert status_of(answer) == 200
    assert answer.endswith(b"hello world") or b"hello world" in answer


def test_routes_by_prefix_and_host_with_strip_prefix(
    gateway: GatewayProcess, gateway_port: int, nginx: Nginx
) -> None:
    status, _, body = request(gateway_port, "GET", "/api/headers?x=1")
    assert status == 200
    seen = dict(line.split("=", 1) for line in body.decode().splitlines())
    assert seen["uri"] == "/headers?x=1"  # /api stripped
    assert seen["host"] == f"127.0.0.1:{nginx.port}"  # host: upstream
    # The api route takes GET and HEAD only; a POST falls through to the catch-all route.
    status, _, body = request(gateway_port, "POST", "/api/echo", b"x")
    assert status == 404  # nginx has no /api/echo: the request went unstripped to origin
    status, _, body = request(gateway_port, "HEAD", "/api/file")
    assert status == 200 and body == b""
    status, _, body = request(
        gateway_port, "GET", "/headers", headers={"Host": "static.example.test"}
    )
    seen = dict(line.split("=", 1) for line in body.decode().splitlines())
    assert seen["host"] == "static.example.test"


def test_keep_alive_connections_to_the_upstream_are_reused(
    gateway: GatewayProcess, gateway_port: int, nginx: Nginx
) -> None:
    for _ in range(30):  # a new client connection each time
        status, _, _ = request(gateway_port, "GET", "/file")
        assert status == 200
    conn = http.client.HTTPConnection(LOOPBACK, gateway_port, timeout=30)
    for _ in range(30):  # and one client connection for many requests
        conn.request("GET", "/file")
        response = conn.getresponse()
        assert response.status == 200 and len(response.read()) == 1024
    conn.close()
    entries = [e for e in nginx.entries() if e.uri == "/file"]
    assert len(entries) == 60
    assert len({e.connection for e in entries}) == 1, (
        "every request should use one upstream connection"
    )
    assert max(e.connection_requests for e in entries) == 60
    assert all(e.connection_header == "" for e in entries)


def test_a_hundred_megabytes_each_way_with_flat_memory(
    tmp_path: Path, nginx_factory: NginxFactory, gateway_port: int
) -> None:
    curl = require_binary("curl")
    origin = nginx_factory(big_size=BIG)
    config = write_config(tmp_path, gateway_port, [origin.url])
    upload = tmp_path / "upload.bin"
    with upload.open("wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(BIG >> 20):
            f.write(block)
    with start_gateway(config, gateway_port) as gw:
        status, _, _ = request(gateway_port, "GET", "/file")  # warm up
        assert status == 200

        def rss() -> int:
            text = Path(f"/proc/{gw.pid}/status").read_text()
            return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

        baseline = rss()
        peak = [baseline]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            down = subprocess.run(
                [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                 f"http://127.0.0.1:{gateway_port}/big"],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            up = subprocess.run(
                [curl, "-sS", "-w", " %{http_code}", "--data-binary", f"@{upload}",
                 "-H", "Content-Type: application/octet-stream",
                 f"http://127.0.0.1:{gateway_port}/upload"],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            up_chunked = subprocess.run(
                [curl, "-sS", "-w", " %{http_code}", "-T", str(upload),
                 "-H", "Transfer-Encoding: chunked", "-X", "POST",
                 f"http://127.0.0.1:{gateway_port}/upload"],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        finally:
            done.set()
            watcher.join()
        assert down.stdout == f"200 {BIG}", down.stderr
        assert up.stdout.split() == ["received", "200"], up.stderr
        assert up_chunked.stdout.split() == ["received", "200"], up_chunked.stderr
        uploads = [e for e in origin.entries() if e.uri == "/upload"]
        assert len(uploads) == 2 and all(e.request_length > BIG for e in uploads)
        growth = peak[0] - baseline
        assert growth < 32 * 1024 * 1024, f"the gateway grew by {growth >> 20} MiB moving 300 MiB"
        assert "Traceback" not in gw.log_text()


# --- failures of upstreams ---------------------------------------------------------------


def test_an_upstream_that_is_down_gives_502(tmp_path: Path, gateway_port: int) -> None:
    dead = free_port()
    with start_gateway(
        write_config(tmp_path, gateway_port, [f"http://127.0.0.1:{dead}"]), gateway_port
    ) as gw:
        started = time.monotonic()
        status, _, body = request(gateway_port, "GET", "/file")
        assert status == 502
        assert b"to-origin" in body and b"connect" in body
        assert time.monotonic() - started < 10
        assert "Traceback" not in gw.log_text()


def test_an_upstream_that_hangs_gives_504(tmp_path: Path, gateway_port: int) -> None:
    hanging = HangingServer()
    try:
        config = write_config(tmp_path, gateway_port, [f"http://127.0.0.1:{hanging.port}"])
        with start_gateway(config, gateway_port) as gw:
            started = time.monotonic()
            status, _, body = request(gateway_port, "GET", "/file")
            elapsed = time.monotonic() - started
            assert status == 504
            assert b"to-origin" in body
            assert 1.5 <= elapsed < 10  # the destination's timeout is 2s
            assert hanging.accepted, "the gateway never connected to the upstream"
            assert "Traceback" not in gw.log_text()
    finally:
        hanging.close()


def test_two_upstreams_with_one_down(
    tmp_path: Path, gateway_port: int, nginx_factory: NginxFactory
) -> None:
    alive = nginx_factory()
    dead = free_port()
    config = write_config(tmp_path, gateway_port, [f"http://127.0.0.1:{dead}", alive.url])
    with start_gateway(config, gateway_port) as gw:
        for _ in range(10):
            status, _, body = request(gateway_port, "GET", "/whoami")
            assert status == 200
            assert body == f"port {alive.port}\n".encode()
        # The dead one was tried once, then skipped for fail_timeout.
        lines = [line for line in gw.log_text().splitlines() if f"127.0.0.1:{dead}" in line]
        assert len(lines) == 1, lines
        assert "Traceback" not in gw.log_text()


def test_balances_round_robin_over_two_upstreams(
    tmp_path: Path, gateway_port: int, nginx_factory: NginxFactory
) -> None:
    one, two = nginx_factory(), nginx_factory()
    config = write_config(tmp_path, gateway_port, [one.url, two.url])
    with start_gateway(config, gateway_port):
        ports = [request(gateway_port, "GET", "/whoami")[2] for _ in range(10)]
        assert ports.count(f"port {one.port}\n".encode()) == 5
        assert ports.count(f"port {two.port}\n".encode()) == 5


# --- bad requests ----------------------------------------------------------------------


STRICT = """  strict:
    protocol: http
    listen: tcp:{port}:interface=127.0.0.1
    max_header_size: 4KiB
    header_timeout: 1s
    idle_timeout: 3s
    max_size: 1KiB
"""


def strict_config(tmp_path: Path, nginx: Nginx, gateway_port: int) -> tuple[Path, int]:
    """A config with the STRICT listener (routed to nginx) beside the usual one; its port."""
    strict = free_port()
    config = write_config(
        tmp_path,
        gateway_port,
        [nginx.url],
        extra_listeners=STRICT.format(port=strict),
        extra_routes="""  - name: strict-origin
    from: strict
    to: origin
""",
    )
    return config, strict


def test_malformed_requests_get_the_right_status(
    tmp_path: Path, nginx: Nginx, gateway_port: int
) -> None:
    config, strict = strict_config(tmp_path, nginx, gateway_port)
    cases = [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /file HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
        (b"GET /file HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /file HTTP/1.1\r\n\r\n", 400),  # no Host
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            400,
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (b"GET /file HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", 400),
        (b"GET /file HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 8000 + b"\r\n\r\n", 431),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
        (b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n", 405),
    ]
    with start_gateway(config, [gateway_port, strict]) as gw:
        for data, expected in cases:
            answer = raw_exchange(strict, data)
            assert status_of(answer) == expected, (data[:80], answer[:200])
            assert b"Connection: close" in answer
        # A bad chunk in the middle of a streamed body: the upstream saw the start, the
        # client gets 400 because no response has begun.
        answer = raw_exchange(
            strict,
            [b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
             b"5\r\nworldXX\r\n0\r\n\r\n"],
            pause=0.3,
        )  # fmt: skip
        assert status_of(answer) in (400, 502), answer[:200]
        # A chunked body over max_size
        answer = raw_exchange(
            strict,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"400\r\n"
            + b"a" * 1024
            + b"\r\n"
            + b"400\r\n"
            + b"a" * 1024
            + b"\r\n0\r\n\r\n",
        )
        assert status_of(answer) in (413, 400, 502), answer[:200]
        # A header trickled one byte at a time is cut off after header_timeout.
        started = time.monotonic()
        answer = raw_exchange(
            strict, [bytes([b]) for b in b"GET /file HTTP/1.1\r\nHost: x\r\n"], pause=0.2
        )
        elapsed = time.monotonic() - started
        assert status_of(answer) == 408
        assert elapsed < 6.5  # 1s header timeout (+ the sweeper's half second), not 33 * 0.2s
        # A client that connects and says nothing is dropped after idle_timeout.
        started = time.monotonic()
        assert raw_exchange(strict, b"") == b""
        assert 2.5 < time.monotonic() - started < 8
        # After all that the gateway still answers.
        status, _, _ = request(strict, "GET", "/file")
        assert status == 200
        log = gw.log_text()
        assert "Traceback" not in log


def _upload_while_reading(port: int, head: bytes, chunk: bytes, total: int) -> tuple[bytes, str]:
    """Send ``head``, then ``chunk`` repeatedly (up to ``total`` bytes) from a thread while
    this thread reads the answer until the gateway closes. The answer, and how sending ended."""
    sock = socket.create_connection((LOOPBACK, port), timeout=30)
    ended = {"how": "sent everything"}

    def send() -> None:
        try:
            sock.sendall(head)
            sent = 0
            while sent < total:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError as exc:
            ended["how"] = type(exc).__name__

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = b""
    try:
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                received += b"<reset>"
                break
            if not data:
                break
            received += data
    finally:
        sender.join(30)
        sock.close()
    return received, ended["how"]


def test_a_body_far_over_max_size_gets_its_413_while_the_client_is_still_sending(
    tmp_path: Path, nginx: Nginx, gateway_port: int
) -> None:
    """The 413 reaches a client that is still uploading: the gateway drops the rest of the
    body for a while (a lingering close) instead of resetting the connection under it."""
    config, strict = strict_config(tmp_path, nginx, gateway_port)
    piece = b"a" * 65536
    chunk = b"10000\r\n" + piece + b"\r\n"
    with start_gateway(config, [gateway_port, strict]):
        for attempt in range(5):
            # Chunked: the size is learnt only as the body comes, so the 413 comes mid-body.
            answer, how = _upload_while_reading(
                strict,
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                chunk,
                32 * 1024 * 1024,
            )
            assert status_of(answer) == 413, (attempt, how, answer[:200])
            assert b"larger than 1024 bytes" in answer and b"<reset>" not in answer, answer[:300]
            # A declared Content-Length over the limit is refused before the body is read.
            answer, how = _upload_while_reading(
                strict,
                b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (32 << 20),
                piece,
                32 * 1024 * 1024,
            )
            assert status_of(answer) == 413, (attempt, how, answer[:200])
            assert b"(33554432 bytes) is larger than 1024 bytes" in answer, answer[:300]
            assert b"<reset>" not in answer
        # curl, told the size up front, with Expect: 100-continue: 413 without sending it all.
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(1 << 20) * 8)
        started = time.monotonic()
        done = subprocess.run(
            [require_binary("curl"), "--silent", "--show-error", "--noproxy", "*",
             "--max-time", "30", "-o", "/dev/null", "-w", "%{http_code}",
             "-T", str(big), f"http://{LOOPBACK}:{strict}/echo"],
            capture_output=True, text=True, timeout=40,
        )  # fmt: skip
        assert done.stdout == "413", (done.stdout, done.stderr)
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 5  # no waiting out the 1 s Expect timeout, or more


def test_a_client_over_max_connections_gets_its_503_while_still_sending(
    tmp_path: Path, nginx: Nginx, gateway_port: int
) -> None:
    """A client that sends its whole request before it reads gets the 503 for one connection
    too many: the gateway drops what it sends for a while (as after a 413) rather than
    closing under it, which fails the client's upload with a reset and hides the 503.
    (The connection that fills the listener is busy with an upload: an idle one would be
    closed to make room.)"""
    crowded = free_port()
    config = write_config(
        tmp_path,
        gateway_port,
        [nginx.url],
        extra_listeners=f"""  crowded:
    protocol: http
    listen: tcp:{crowded}:interface=127.0.0.1
    max_connections: 1
""",
        extra_routes="""  - name: crowded-origin
    from: crowded
    to: origin
""",
    )
    body = os.urandom(4 << 20)
    with start_gateway(config, [gateway_port, crowded]), contextlib.ExitStack() as stack:
        # A connection busy with an upload that has not ended. (The start-up probe's idle
        # connection, if it is still there, is closed to make room for it.)
        sock = stack.enter_context(socket.create_connection((LOOPBACK, crowded), timeout=30))
        sock.sendall(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nsome")
        time.sleep(0.5)
        for attempt in range(3):
            # As most clients do: the whole request first, then the response.
            client = http.client.HTTPConnection(LOOPBACK, crowded, timeout=30)
            try:
                client.request("PUT", "/echo", body=body)
                response = client.getresponse()
                assert response.status == 503, attempt
                assert response.getheader("Retry-After") == "1"
                assert response.read() == b"too many connections\n"
            finally:
                client.close()
        stack.close()
        # With the first client gone, the next one is served.
        wait_until(lambda: request(crowded, "GET", "/file")[0] == 200, "a 200 again", timeout=10)


def test_https_listener_on_an_ssl_endpoint(tmp_path: Path, nginx: Nginx, gateway_port: int) -> None:
    curl = require_binary("curl")
    cert, key = make_tls_cert(tmp_path / "tls")
    tls_port = free_port()
    config = write_config(
        tmp_path,
        gateway_port,
        [nginx.url],
        extra_listeners=f"""  secure:
    protocol: http
    listen: ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}
""",
        extra_routes="""  - name: secure-origin
    from: secure
    to: origin
  - name: via-tls
    from: web
    match: {prefix: /via-tls/}
    to: tls-upstream
""",
        destination=f"""  tls-upstream:
    protocol: http
    url: https://localhost:{tls_port}
    ca: {cert}
    strip_prefix: /via-tls
""",
    )
    with start_gateway(config, [gateway_port, tls_port]) as gw:
        # An https upstream (the gateway's own TLS listener, verified against its CA file).
        status, _, body = request(gateway_port, "GET", "/via-tls/headers")
        assert status == 200, body
        seen = dict(line.split("=", 1) for line in body.decode().splitlines())
        assert seen["proto"] == "https" and seen["xff"] == "127.0.0.1, 127.0.0.1"
        assert seen["uri"] == "/headers"
        result = subprocess.run(
            [curl, "-sS", "--http1.1", "--cacert", str(cert),
             f"https://localhost:{tls_port}/headers", f"https://localhost:{tls_port}/file",
             "-o", "/dev/stdout", "-o", str(tmp_path / "file.out")],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        seen = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
        assert seen["proto"] == "https"
        assert "proto=https" in seen["forwarded"]
        assert (tmp_path / "file.out").read_bytes() == (nginx.root / "file").read_bytes()
        # HTTP/2 by ALPN (the h2 package is installed with the gateway's h2 extra).
        payload = tmp_path / "payload.bin"
        payload.write_bytes(os.urandom(300_000))
        result = subprocess.run(
            [curl, "-sS", "--http2", "--cacert", str(cert), "-w", "\n%{http_version} %{http_code}",
             f"https://localhost:{tls_port}/headers",
             "--next", "--http2", "--cacert", str(cert), "--data-binary", f"@{payload}",
             "-o", str(tmp_path / "echo.out"), "-w", "\n%{http_version} %{http_code}",
             f"https://localhost:{tls_port}/echo"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        lines = result.stdout.decode().splitlines()
        assert lines[-1] == "2 200" and lines[-2] == "2 200", lines
        assert "proto=https" in result.stdout.decode()
        assert (tmp_path / "echo.out").read_bytes() == payload.read_bytes()
        assert "Traceback" not in gw.log_text()


# --- store-and-forward routes from the same listener -------------------------------------


def test_a_hook_route_and_a_proxy_route_side_by_side(
    tmp_path: Path, nginx: Nginx, gateway_port: int
) -> None:
    maildir = tmp_path / "mail"
    config = write_config(
        tmp_path,
        gateway_port,
        [nginx.url],
        extra_routes="""  - name: hooks
    from: web
    match: {path: '^/hooks/(?P<team>[a-z]+)$', method: [POST]}
    transforms: [http_to_mail]
    options: {from: 'hooks@example.test', to: '{team}@example.test', subject: 'hook {{@path}}'}
    to: box
""",
        destination=f"""  box:
    protocol: maildir
    path: {maildir}
""",
    )
    with start_gateway(config, gateway_port) as gw:
        status, headers, body = request(
            gateway_port, "POST", "/hooks/ops", b'{"text": "deployed"}',
            {"Content-Type": "application/json"},
        )  # fmt: skip
        assert status == 202, body
        assert headers["content-type"] == "application/json"
        ident = json.loads(body)["id"]
        deadline = time.monotonic() + 20
        files: list[Path] = []
        while time.monotonic() < deadline and not files:
            files = list((maildir / "new").glob("*")) if (maildir / "new").exists() else []
            time.sleep(0.05)
        assert len(files) == 1
        mail = files[0].read_bytes()
        assert b"To: ops@example.test" in mail and b"deployed" in mail
        assert ident in gw.log_text()
        # The same listener still proxies everything else.
        status, _, body = request(gateway_port, "GET", "/file")
        assert status == 200 and len(body) == 1024
        assert "Traceback" not in gw.log_text()


def test_reload_changes_routes_and_keeps_client_connections(
    tmp_path: Path, nginx_factory: NginxFactory, gateway_port: int
) -> None:
    one, two = nginx_factory(), nginx_factory()
    path = tmp_path / "routes.yaml"

    def config(catch_all: str) -> None:
        path.write_text(
            f"""version: 1
spool: {tmp_path}/spool
listeners:
  web: {{protocol: http, listen: "tcp:{gateway_port}:interface=127.0.0.1"}}
destinations:
  one: {{protocol: http, url: "{one.url}"}}
  two: {{protocol: http, url: "{two.url}"}}
routes:
  - {{name: pinned, from: web, match: {{prefix: /file}}, to: one}}
  - {{name: rest, from: web, to: {catch_all}}}
"""
        )

    config("one")
    with start_gateway(path, gateway_port) as gw:
        kept = http.client.HTTPConnection(LOOPBACK, gateway_port, timeout=30)
        kept.request("GET", "/whoami")
        first = kept.getresponse()
        assert first.read() == f"port {one.port}\n".encode()
        config("two")
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("configuration reloaded", since=mark, timeout=30)
        kept.request("GET", "/whoami")  # the same client connection, the new routes
        assert kept.getresponse().read() == f"port {two.port}\n".encode()
        kept.close()
        status, _, body = request(gateway_port, "GET", "/file")
        assert status == 200 and len(body) == 1024
        assert [e.uri for e in one.entries()].count("/file") == 1
        # A broken file keeps the routes in force.
        path.write_text("version: 1\nlisteners: {web: {protocol: htp}}\n")
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("reload refused", since=mark, timeout=30)
        assert request(gateway_port, "GET", "/whoami")[2] == f"port {two.port}\n".encode()
        assert "Traceback" not in gw.log_text()


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
def proxy_to_origin(tmp_path: Path, origin: Nginx) -> Iterator[tuple[GatewayProcess, int]]:
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
    proxy_to_origin: tuple[GatewayProcess, int], origin: Nginx
) -> None:
    _, port = proxy_to_origin
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
    proxy_to_origin: tuple[GatewayProcess, int], origin: Nginx, path: str
) -> None:
    _, port = proxy_to_origin
    answer = _exchange(port, b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path.encode())
    assert answer.startswith(b"HTTP/1.1 400 ")
    time.sleep(0.3)
    assert _entries(origin, 0) == []


def test_head_of_a_big_file_answers_at_once_and_keeps_the_connection(
    proxy_to_origin: tuple[GatewayProcess, int], origin: Nginx
) -> None:
    _, port = proxy_to_origin
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
    proxy_to_origin: tuple[GatewayProcess, int], origin: Nginx
) -> None:
    process, port = proxy_to_origin
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


def test_idle_sockets_cannot_keep_clients_out(
    tmp_path: Path, nginx: Nginx, gateway_port: int
) -> None:
    """Defect: 1,000 sockets that connected and sent nothing filled max_connections, and
    every legitimate client got 503. The longest idle connection now makes room."""
    crowded = free_port()
    config = write_config(
        tmp_path,
        gateway_port,
        [nginx.url],
        extra_listeners=f"""  crowded:
    protocol: http
    listen: tcp:{crowded}:interface=127.0.0.1
    max_connections: 200
""",
        extra_routes="""  - name: crowded-origin
    from: crowded
    to: origin
""",
    )
    with start_gateway(config, [gateway_port, crowded]), contextlib.ExitStack() as stack:
        for _ in range(200):
            stack.enter_context(socket.create_connection((LOOPBACK, crowded), timeout=30))
        time.sleep(0.5)
        for _ in range(20):
            status, _, body = request(crowded, "GET", "/file")
            assert status == 200, body[:200]
