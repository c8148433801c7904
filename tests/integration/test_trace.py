"""``gateway trace`` against a running gateway: mail sent with swaks shows up as its routing
decision and its delivery within 2 s; filters hold back what does not match."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import GatewayFactory
from tests.peers import REPO_ROOT, SwaksExit, free_port, swaks_send

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


class Tracing:
    """``gateway trace --json`` in the background; its events on a queue."""

    def __init__(self, config: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "trace", "-c", str(config), "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        # It says so on stderr once it follows the stream.
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        assert line.startswith("tracing the gateway at"), line

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.put(json.loads(line))

    def next(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def test_a_mail_appears_in_the_trace_with_its_route_and_delivery(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    smtp, admin = free_port(), free_port()
    gw = gateway_factory(f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  mail-in: {{protocol: smtp, listen: "tcp:{smtp}:interface=127.0.0.1"}}
destinations:
  box: {{protocol: maildir, path: mail}}
routes:
  - {{name: local, from: mail-in, match: {{rcpt: '@example\\.test$'}}, to: box}}
""")
    gw.start([smtp, admin])
    everything = Tracing(gw.config_path)
    other_route = Tracing(gw.config_path, "--route", "elsewhere")
    try:
        sent = time.monotonic()
        code, transcript = swaks_send(smtp, "ann@example.test")
        assert code == SwaksExit.OK, transcript
        routed = everything.next(timeout=2)
        assert routed is not None, "no routing decision within 2 s"
        assert routed["event"] == "routed" and routed["outcome"] == "queued"
        assert routed["listener"] == "mail-in" and routed["client"] == "127.0.0.1"
        assert routed["routes"] == ["local"] and routed["destinations"] == ["box"]
        assert routed["to"] == ["ann@example.test"]
        assert any("route 'local' matches" in step for step in routed["steps"])
        assert routed["id"] in transcript  # "250 ... queued as ID"
        delivery = everything.next(timeout=2)
        assert delivery is not None and time.monotonic() - sent < 4
        assert delivery["event"] == "delivery" and delivery["outcome"] == "delivered"
        assert delivery["id"] == routed["id"] and delivery["destination"] == "box"
        # A recipient no route takes: refused at RCPT, so nothing is routed; a refusal
        # after DATA would be traced as "refused".
        assert swaks_send(smtp, "x@elsewhere.test")[0] == SwaksExit.RCPT_REJECTED
        assert other_route.next(timeout=1) is None  # --route elsewhere saw nothing
        # A trace being read does not hold the gateway up when it stops.
        stopping = time.monotonic()
        assert gw.stop() == 0
        assert time.monotonic() - stopping < 10
        assert everything.process.wait(10) == 1
    finally:
        everything.stop()
        other_route.stop()


def test_trace_without_an_admin_site_says_what_to_add(tmp_path: Path) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text("version: 1\nlisteners:\n  in: {protocol: smtp, listen: 'tcp:2525'}\n")
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "trace", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert out.returncode == 1
    assert "has no admin site on a TCP port" in out.stderr


def test_dns_queries_and_http_requests_are_traced_with_the_route_taken(
    tmp_path: Path, gateway_factory: GatewayFactory
) -> None:
    import urllib.error
    import urllib.request

    import dns.message
    import dns.query

    dns_port, web, admin = free_port(), free_port(), free_port()
    gw = gateway_factory(f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  dns-in: {{protocol: dns, listen: "udp:{dns_port}:interface=127.0.0.1"}}
  web-in: {{protocol: http, listen: "tcp:{web}:interface=127.0.0.1"}}
destinations:
  app: {{protocol: http, url: "http://127.0.0.1:{free_port()}"}}
routes:
  - {{name: printer, from: dns-in, match: {{qname: printer.test}},
     answer: ["printer.test. 60 IN A 192.0.2.5"]}}
  - {{name: site, from: web-in, match: {{prefix: /app/}}, to: app}}
""")
    gw.start([web, admin])
    tracing = Tracing(gw.config_path)
    try:
        query = dns.message.make_query("printer.test.", "A")
        dns.query.udp(query, "127.0.0.1", port=dns_port, timeout=5)
        event = tracing.next(timeout=2)
        assert event is not None and event["event"] == "dns"
        assert (event["qname"], event["route"]) == ("printer.test.", "printer")
        assert event["action"] == "answered from the route's records"
        dns.query.udp(
            dns.message.make_query("other.test.", "A"), "127.0.0.1", port=dns_port, timeout=5
        )
        event = tracing.next(timeout=2)
        assert event is not None and event["action"] == "refused: no route takes it"
        for path, action in (("/nothing", "404: no route takes it"), ("/app/x", "proxied to app")):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{web}{path}", timeout=10)
            except urllib.error.HTTPError:
                pass  # 404, and 502 from the proxy: nothing listens where app is
            event = tracing.next(timeout=2)
            assert event is not None and event["event"] == "http", event
            assert (event["target"], event["action"]) == (path, action)
    finally:
        tracing.stop()
