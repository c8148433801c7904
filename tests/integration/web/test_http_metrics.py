"""/metrics of the http listener and destinations after real traffic through nginx.

The gateway runs as a process with an admin endpoint; requests go through it
to a real nginx origin, to a port where nothing listens (502), to a server
that never answers (504), to a web hook route (202, 401) and to no route at
all (404); mail goes to a ``webhook`` destination at nginx. The page is parsed
with prometheus_client's own parser and each counter must match what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.peers import LOOPBACK, GatewayProcess, SwaksExit, free_port, swaks_send
from tests.peers_web import HangingServer, Nginx, raw_exchange, request

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SECRET = "metrics-secret"


def scrape(admin: int) -> Samples:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{admin}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the page does not have it."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def write_config(tmp_path: Path, web: int, smtp: int, admin: int, nginx: Nginx, hang: int) -> Path:
    closed = free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""version: 1
spool: {tmp_path}/spool
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  web: {{protocol: http, listen: "tcp:{web}:interface=127.0.0.1"}}
  mail-in: {{protocol: smtp, listen: "tcp:{smtp}:interface=127.0.0.1"}}
destinations:
  origin: {{protocol: http, url: "{nginx.url}", timeout: 5s}}
  dead: {{protocol: http, url: "http://127.0.0.1:{closed}", connect_timeout: 2s, fail_timeout: 1h}}
  slow: {{protocol: http, url: "http://127.0.0.1:{hang}", timeout: 1s, fail_timeout: 1h}}
  box: {{protocol: maildir, path: {tmp_path}/mail}}
  hook-out: {{protocol: webhook, url: "{nginx.url}/hook", timeout: 10s}}
routes:
  - name: hooks
    from: web
    match: {{path: '^/hooks/(?P<team>[a-z]+)$'}}
    transforms: [http_to_mail]
    options: {{from: hooks@example.test, to: '{{team}}@example.test', secret: {SECRET}}}
    to: box
  - {{name: down, from: web, match: {{prefix: /down/}}, to: dead}}
  - {{name: hang, from: web, match: {{prefix: /hang/}}, to: slow}}
  - {{name: site, from: web, match: {{path: '^/(file|missing)$', method: [GET]}}, to: origin}}
  - {{name: to-hook, from: mail-in, match: {{rcpt: '@hook\\.test$'}}, to: hook-out}}
"""
    )
    return path


def signed(body: bytes) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}


def test_http_metrics_count_real_traffic(tmp_path: Path, nginx: Nginx) -> None:
    web, smtp, admin = free_port(), free_port(), free_port()
    hanging = HangingServer()
    try:
        config = write_config(tmp_path, web, smtp, admin, nginx, hanging.port)
        with GatewayProcess(config).start([web, smtp, admin], timeout=30) as gw:
            before = scrape(admin)
            assert value(before, "gateway_listener_requests_total", listener="web") == 0
            assert value(before, "gateway_http_upstream_down", destination="dead",
                         upstream=f"http://127.0.0.1:{gw_closed_port(config)}") == 0  # fmt: skip

            for _ in range(5):
                status, _, body = request(web, "GET", "/file")
                assert status == 200 and len(body) == 1024
            status, _, _ = request(web, "GET", "/missing")
            assert status == 404  # nginx's own 404, proxied
            for _ in range(2):
                status, _, body = request(web, "GET", "/down/x")
                assert status == 502 and b"route 'down'" in body
            status, _, body = request(web, "GET", "/hang/x")
            assert status == 504 and b"route 'hang'" in body
            payload = b'{"text": "deployed"}'
            for _ in range(2):
                status, _, body = request(web, "POST", "/hooks/ops", payload, signed(payload))
                assert status == 202, body
            status, _, _ = request(web, "POST", "/hooks/ops", payload, signed(b"other"))
            assert status == 401
            status, _, _ = request(web, "GET", "/nowhere")
            assert status == 404  # no route: the gateway's 404
            assert raw_exchange(web, b"BOGUS\r\n\r\n").startswith(b"HTTP/1.1 400 ")
            code, transcript = swaks_send(smtp, "anyone@hook.test")
            assert code == SwaksExit.OK, transcript

            # One keep-alive client stays connected while the page is read.
            held = http.client.HTTPConnection(LOOPBACK, web, timeout=30)
            held.request("GET", "/file")
            assert held.getresponse().read()

            # The mail reaches nginx through the delivery workers.
            deadline = time.monotonic() + 30
            while True:
                samples = scrape(admin)
                hook = value(samples, "gateway_deliveries_total", destination="hook-out",
                             outcome="delivered")  # fmt: skip
                open_now = value(samples, "gateway_listener_open_connections", listener="web")
                if (hook == 1 and open_now == 1) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            held.close()

            assert hook == 1
            assert open_now == 1
            assert [e.uri for e in nginx.entries()].count("/hook") == 1

            def requests(route: str, outcome: str) -> float:
                return value(samples, "gateway_http_requests_total", listener="web",
                             route=route, outcome=outcome)  # fmt: skip

            def responses(route: str, code: str) -> float:
                return value(samples, "gateway_http_responses_total", listener="web",
                             route=route, code=code)  # fmt: skip

            assert requests("site", "proxied") == 7  # 5 + /missing + the held one
            assert responses("site", "2xx") == 6
            assert responses("site", "4xx") == 1
            assert requests("down", "proxied") == 2 and responses("down", "5xx") == 2
            assert requests("hang", "proxied") == 1 and responses("hang", "5xx") == 1
            assert requests("hooks", "queued") == 2 and responses("hooks", "2xx") == 2
            assert requests("hooks", "rejected") == 1 and responses("hooks", "4xx") == 1
            assert requests("", "rejected") == 1 and responses("", "4xx") == 1
            assert requests("", "error") == 0
            total = 7 + 2 + 1 + 3 + 1
            assert value(samples, "gateway_listener_requests_total", listener="web") == total
            assert value(samples, "gateway_http_malformed_requests_total", listener="web") == 1
            assert value(samples, "gateway_http_request_duration_seconds_count",
                         listener="web") == total  # fmt: skip
            assert value(samples, "gateway_http_request_duration_seconds_bucket",
                         listener="web", le="+Inf") == total  # fmt: skip
            # The 504 took the destination's whole timeout (1s).
            assert value(samples, "gateway_http_request_duration_seconds_sum",
                         listener="web") >= 1.0  # fmt: skip

            def upstream(dest: str, url: str, outcome: str) -> float:
                return value(samples, "gateway_http_upstream_requests_total",
                             destination=dest, upstream=url, outcome=outcome)  # fmt: skip

            dead_url = f"http://127.0.0.1:{gw_closed_port(config)}"
            slow_url = f"http://127.0.0.1:{hanging.port}"
            assert upstream("origin", nginx.url, "ok") == 7
            assert upstream("origin", nginx.url, "connect_failed") == 0
            assert upstream("dead", dead_url, "connect_failed") == 2
            assert upstream("dead", dead_url, "ok") == 0
            assert upstream("slow", slow_url, "timeout") == 1
            assert value(samples, "gateway_http_upstream_down", destination="dead",
                         upstream=dead_url) == 1  # fmt: skip
            assert value(samples, "gateway_http_upstream_down", destination="slow",
                         upstream=slow_url) == 1  # fmt: skip
            assert value(samples, "gateway_http_upstream_down", destination="origin",
                         upstream=nginx.url) == 0  # fmt: skip
            assert value(samples, "gateway_http_upstream_active_requests",
                         destination="origin", upstream=nginx.url) == 0  # fmt: skip

            # Connections that end are no longer counted.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if value(scrape(admin), "gateway_listener_open_connections", listener="web") == 0:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the closed keep-alive connection is still counted")
            assert "Traceback" not in gw.log_text()
    finally:
        hanging.close()


def gw_closed_port(config: Path) -> int:
    text = config.read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith("dead:"))
    return int(line.split("127.0.0.1:")[1].split('"')[0])


def test_a_client_that_goes_away_is_counted_without_a_response(
    tmp_path: Path, nginx: Nginx
) -> None:
    web, smtp, admin = free_port(), free_port(), free_port()
    hanging = HangingServer()
    try:
        config = write_config(tmp_path, web, smtp, admin, nginx, hanging.port)
        with GatewayProcess(config).start([web, smtp, admin], timeout=30) as gw:
            # The client gives up while the upstream is still silent.
            with socket.create_connection((LOOPBACK, web), timeout=10) as sock:
                sock.sendall(b"GET /hang/y HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.3)
            deadline = time.monotonic() + 10
            while True:
                samples = scrape(admin)
                none = value(samples, "gateway_http_responses_total", listener="web",
                             route="hang", code="none")  # fmt: skip
                if none == 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert none == 1
            assert value(samples, "gateway_http_requests_total", listener="web",
                         route="hang", outcome="proxied") == 1  # fmt: skip
            assert value(samples, "gateway_http_request_duration_seconds_count",
                         listener="web") == 1  # fmt: skip
            assert "Traceback" not in gw.log_text()
    finally:
        hanging.close()


# --------------------------------------------------------------------------- the default routes.yaml


def test_default_routes_yaml_web_hook_and_proxy_routes(tmp_path: Path) -> None:
    """The repository's routes.yaml, its ports moved to free ones: the web hook route files
    mail in the mailbox, and with nothing on the web application's port a request gets 502."""
    import shutil

    from tests.peers import REPO_ROOT, curl

    text = (REPO_ROOT / "routes.yaml").read_text()
    web, app = free_port(), free_port()
    ports = {"tcp:8080:": f"tcp:{web}:", "127.0.0.1:8081": f"127.0.0.1:{app}"}
    for old in ("tcp:2525:", "tcp:5870:", "tcp:1119:", "udp:5353:", "tcp:5353:", "tcp:9100:"):
        ports[old] = f"{old.split(':')[0]}:{free_port()}:"
    for old, new in ports.items():
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "routes.yaml").write_text(text)
    shutil.copytree(REPO_ROOT / "plugins", tmp_path / "plugins")
    shutil.copy(REPO_ROOT / "users", tmp_path / "users")
    shutil.copy(REPO_ROOT / "webhook.secret", tmp_path / "webhook.secret")
    payload = b'{"title": "Release 1.2", "by": "ci"}'
    digest = hmac.new(b"change-me", payload, hashlib.sha256).hexdigest()
    hook_url = f"http://{LOOPBACK}:{web}/hooks/deploy"
    with GatewayProcess(tmp_path / "routes.yaml").start([web], timeout=30) as gw:
        answer = curl(
            "-i", "-X", "POST", "-H", "Content-Type: application/json",
            "-H", f"X-Hub-Signature-256: sha256={digest}",
            "--data-binary", payload.decode(), hook_url,
        )  # fmt: skip
        assert answer.stdout.startswith("HTTP/1.1 202 "), answer.stdout + answer.stderr
        assert '"status": "queued"' in answer.stdout
        first_answer = answer.stdout
        unsigned = curl(
            "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
            "-H", "Content-Type: application/json", "--data-binary", payload.decode(), hook_url,
        )  # fmt: skip
        assert unsigned.stdout == "401"
        untitled = b'{"by": "ci"}'
        digest2 = hmac.new(b"change-me", untitled, hashlib.sha256).hexdigest()
        answer = curl(
            "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
            "-H", "Content-Type: application/json", "-H", f"X-Hub-Signature-256: sha256={digest2}",
            "--data-binary", untitled.decode(), hook_url,
        )  # fmt: skip
        assert answer.stdout == "400"  # the subject needs {{title}}
        answer = curl("-i", f"http://{LOOPBACK}:{web}/")
        assert answer.stdout.startswith("HTTP/1.1 502 "), answer.stdout + answer.stderr
        assert "route 'web-app'" in answer.stdout
        deadline = time.monotonic() + 20
        files: list[Path] = []
        new = tmp_path / "var" / "mail" / "new"
        while time.monotonic() < deadline and not files:
            files = sorted(new.glob("*")) if new.exists() else []
            time.sleep(0.1)
        assert len(files) == 1
        mail = files[0].read_text()
        assert "Subject: [deploy] Release 1.2" in mail
        assert "To: hooks@example.test" in mail
        assert '"by": "ci"' in mail  # the JSON, pretty-printed, is the text
        # The id of the 202 is the message's queue id: its log lines carry it.
        accepted = json.loads(first_answer[first_answer.index("{") :])
        qid = accepted["id"]
        log = gw.log_text()
        assert f"id={qid} " in log and f"delivery={qid}.1 " in log, log[-2000:]
        assert "Traceback" not in log


def test_http2_requests_are_counted_once(tmp_path: Path, nginx: Nginx) -> None:
    """HTTP/2 streams (curl --http2 on an ssl: listener) count as HTTP/1.1 requests do."""
    from tests.peers import make_tls_cert, require_binary

    curl = require_binary("curl")
    cert, key = make_tls_cert(tmp_path / "tls")
    tls, admin = free_port(), free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""version: 1
spool: {tmp_path}/spool
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  secure: {{protocol: http, listen: "ssl:{tls}:interface=127.0.0.1:privateKey={key}:certKey={cert}"}}
destinations:
  origin: {{protocol: http, url: "{nginx.url}"}}
  box: {{protocol: maildir, path: {tmp_path}/mail}}
routes:
  - name: hooks
    from: secure
    match: {{prefix: /hooks/}}
    transforms: [http_to_mail]
    options: {{from: hooks@example.test, to: ops@example.test}}
    to: box
  - {{name: site, from: secure, match: {{path: '^/file$'}}, to: origin}}
"""
    )
    base = f"https://localhost:{tls}"
    with GatewayProcess(path).start([tls, admin], timeout=30) as gw:
        common = ["-sS", "--http2", "--cacert", str(cert), "-o", "/dev/null"]
        result = subprocess.run(
            [curl, *common, "-w", "%{http_version} %{http_code}\n", f"{base}/file",
             "--next", *common, "-w", "%{http_version} %{http_code}\n", f"{base}/file",
             "--next", *common, "-w", "%{http_version} %{http_code}\n",
             "-H", "Content-Type: application/json", "--data-binary", '{"a": 1}', f"{base}/hooks/x",
             "--next", *common, "-w", "%{http_version} %{http_code}\n", f"{base}/nowhere"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.stdout.split("\n")[:4] == ["2 200", "2 200", "2 202", "2 404"], (
            result.stdout + result.stderr
        )
        samples = scrape(admin)

        def requests(route: str, outcome: str) -> float:
            return value(samples, "gateway_http_requests_total", listener="secure",
                         route=route, outcome=outcome)  # fmt: skip

        assert requests("site", "proxied") == 2
        assert requests("hooks", "queued") == 1
        assert requests("", "rejected") == 1
        assert value(samples, "gateway_http_responses_total", listener="secure",
                     route="site", code="2xx") == 2  # fmt: skip
        assert value(samples, "gateway_http_request_duration_seconds_count",
                     listener="secure") == 4  # fmt: skip
        assert value(samples, "gateway_http_upstream_requests_total", destination="origin",
                     upstream=nginx.url, outcome="ok") == 2  # fmt: skip
        assert "Traceback" not in gw.log_text()
