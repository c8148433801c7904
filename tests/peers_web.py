"""nginx as a real web peer for the tests and the benchmark: an origin server, or a reverse proxy.

Each instance has its own folder (configuration, PID file, temp paths, logs),
binds 127.0.0.1 on a free port and runs in the foreground with one worker, as
PEERS.md describes.  The origin serves a 1 KiB file, a large file, an echo of
the request body, a JSON hook, the request's forwarding headers, and its own
port (to tell two upstreams apart).  Its access log records each request's
connection number, so tests can count upstream connections.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.peers import (
    LOOPBACK,
    _end_process,
    _tail,
    free_port,
    port_accepts,
    require_binary,
)

ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
FILE_SIZE = 1024

# Fields of the access log, tab-separated.
_LOG_FORMAT = (
    "$connection\\t$connection_requests\\t$request_method\\t$request_uri\\t$status\\t"
    "$request_length\\t$bytes_sent\\t$http_host\\t$http_x_forwarded_for\\t"
    "$http_x_forwarded_proto\\t$http_forwarded\\t$http_connection\\t$http_te"
)


@dataclass(frozen=True)
class AccessLogEntry:
    connection: int
    connection_requests: int
    method: str
    uri: str
    status: int
    request_length: int
    bytes_sent: int
    host: str
    x_forwarded_for: str
    x_forwarded_proto: str
    forwarded: str
    connection_header: str
    te_header: str

    @classmethod
    def parse(cls, line: str) -> AccessLogEntry:
        f = line.rstrip("\n").split("\t")
        if len(f) != 13:
            raise ValueError(f"unexpected nginx access log line: {line!r}")
        return cls(
            int(f[0]), int(f[1]), f[2], f[3], int(f[4]), int(f[5]), int(f[6]),
            *(("" if v == "-" else v) for v in f[7:]),
        )  # fmt: skip


class Nginx:
    """One nginx instance: ``Nginx(dir).start()`` is an origin; ``upstreams=[port]`` a proxy."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        upstreams: list[int] | None = None,
        big_size: int = 0,
        access_log: bool = True,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.port = port or free_port()
        self.upstreams = upstreams
        self.big_size = big_size
        self.access_log = access_log
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.workdir / "nginx.conf"
        self.error_log = self.workdir / "error.log"
        self.access_log_path = self.workdir / "access.log"
        self.root = self.workdir / "www"
        self.posted = self.workdir / "posted"  # request bodies POSTed to /post, one file each

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def config_text(self) -> str:
        w = self.workdir
        temp = "\n".join(
            f"    {kind}_temp_path {w}/tmp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        log = (
            f"    log_format gw '{_LOG_FORMAT}';\n    access_log {self.access_log_path} gw;"
            if self.access_log
            else "    access_log off;"
        )
        if self.upstreams:
            servers = "\n".join(f"        server {LOOPBACK}:{p};" for p in self.upstreams)
            body = f"""
    upstream origin {{
{servers}
        keepalive 128;
    }}
    server {{
        listen {LOOPBACK}:{self.port} reuseport;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}"""
        else:
            body = f"""
    server {{
        listen {LOOPBACK}:{self.port};
        root {self.root};
        client_max_body_size 0;
        keepalive_requests 100000;
        location = /file {{ default_type application/octet-stream; }}
        # The same files at 100 kB/s, for streaming (TFTP reads from the web).
        location /slow/ {{ alias {self.root}/; limit_rate 100k; }}
        location = /big {{ default_type application/octet-stream; }}
        location = /echo {{
            client_body_buffer_size 4m;
            echo_read_request_body;
            echo_request_body;
        }}
        location = /upload {{
            client_body_buffer_size 1m;
            echo_read_request_body;
            echo "received";
        }}
        # Uploads: PUT below /dav/ (WebDAV, folders made), POSTs kept whole in posted/.
        location /dav/ {{ dav_methods PUT; create_full_put_path on; }}
        location = /post {{
            client_body_in_file_only on;
            client_body_temp_path {self.posted};
            echo_read_request_body;
            echo "stored";
        }}
        location = /hook {{
            default_type application/json;
            return 200 '{{"ok": true}}\\n';
        }}
        location = /whoami {{
            default_type text/plain;
            return 200 "port $server_port\\n";
        }}
        location = /headers {{
            default_type text/plain;
            echo "host=$http_host";
            echo "xff=$http_x_forwarded_for";
            echo "proto=$http_x_forwarded_proto";
            echo "forwarded=$http_forwarded";
            echo "connection=$http_connection";
            echo "keepalive=$http_keep_alive";
            echo "custom=$http_x_custom";
            echo "uri=$request_uri";
        }}
    }}"""
        # As root, workers would run as nobody and could not read a private test folder.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""load_module {ECHO_MODULE};
{user}daemon off;
master_process on;
worker_processes 1;
pid {w}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 4096; }}
http {{
{temp}
{log}
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60s;
{body}
}}
"""

    def start(self, timeout: float = 10.0) -> Self:
        binary = require_binary("nginx")
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "dav").mkdir(exist_ok=True)
        self.posted.mkdir(exist_ok=True)
        (self.root / "file").write_bytes(bytes(range(256)) * (FILE_SIZE // 256))
        if self.big_size:
            big = self.root / "big"
            if not big.exists() or big.stat().st_size != self.big_size:
                with big.open("wb") as f:
                    block = os.urandom(1 << 20)
                    for _ in range(self.big_size >> 20):
                        f.write(block)
                    f.write(block[: self.big_size & ((1 << 20) - 1)])
        self.conf.write_text(self.config_text())
        check = subprocess.run(
            [binary, "-t", "-c", str(self.conf), "-e", str(self.error_log)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejects its test configuration:\n{check.stderr}")
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf), "-e", str(self.error_log)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "stderr.log").open("ab"),
            start_new_session=True,
        )
        import time

        deadline = time.monotonic() + timeout
        while not port_accepts(LOOPBACK, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"nginx did not listen on {LOOPBACK}:{self.port}:\n{_tail(self.error_log)}"
                )
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            # SIGTERM to the master is nginx's fast shutdown; _end_process kills the group after.
            _end_process(self.proc, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("nginx is not running")
        return self.proc.pid

    def entries(self) -> list[AccessLogEntry]:
        """The access log so far (nginx writes each line when its request ends)."""
        try:
            text = self.access_log_path.read_text()
        except FileNotFoundError:
            return []
        return [AccessLogEntry.parse(line) for line in text.splitlines() if line.strip()]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw_exchange(
    port: int, data: bytes | list[bytes], *, pause: float = 0.0, timeout: float = 15.0
) -> bytes:
    """Send bytes (pieces with a pause between them), then read until the gateway closes."""
    pieces = [data] if isinstance(data, bytes) else data
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway gave up on us; its answer is in the socket
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received


class HangingServer:
    """Accepts connections, reads what comes, never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.sock.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()
