"""The admin site: /healthz while the process runs, /readyz only once listeners are bound."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.peers import GatewayProcess, free_port


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_and_readyz(tmp_path: Path) -> None:
    smtp, admin, other = free_port(), free_port(), free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  in: {{protocol: smtp, listen: "tcp:{smtp}:interface=127.0.0.1"}}
destinations:
  box: {{protocol: maildir, path: mail}}
routes:
  - {{from: in, match: {{rcpt: '@x\\.test$'}}, to: box}}
"""
    )
    with GatewayProcess(path) as gw:
        gw.start([smtp, admin])
        assert fetch(admin, "/healthz") == (200, "ok\n")
        assert fetch(admin, "/readyz")[1].startswith("ready\n")
        assert fetch(admin, "/nothing")[0] == 404
        # The admin endpoint moves on reload.
        path.write_text(path.read_text().replace(f"tcp:{admin}:", f"tcp:{other}:"))
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("configuration reloaded", since=mark)
        assert fetch(other, "/readyz")[1].startswith("ready\n")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                fetch(admin, "/healthz")
            except urllib.error.URLError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the old admin port is still open after the reload")


def _metric(text: str, name: str) -> float:
    [value] = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


def test_readyz_and_metrics_tell_how_the_last_reload_went(tmp_path: Path) -> None:
    smtp, admin = free_port(), free_port()
    path = tmp_path / "routes.yaml"
    good = f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  in: {{protocol: smtp, listen: "tcp:{smtp}:interface=127.0.0.1"}}
destinations:
  box: {{protocol: maildir, path: mail}}
routes:
  - {{from: in, match: {{rcpt: '@x\\.test$'}}, to: box}}
"""
    path.write_text(good)
    with GatewayProcess(path) as gw:
        gw.start([smtp, admin])
        started = time.time()
        code, text = fetch(admin, "/readyz")
        assert code == 200 and text.startswith("ready\nconfiguration: loaded 20"), text
        assert text.endswith(" at start\n")
        metrics = fetch(admin, "/metrics")[1]
        assert _metric(metrics, "gateway_config_last_reload_successful") == 1
        assert abs(_metric(metrics, "gateway_config_last_reload_timestamp_seconds") - started) < 30
        # A file that does not check: refused; the gateway stays ready on the old one.
        path.write_text(good.replace("to: box", "to: bx"))
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("reload refused", since=mark)
        code, text = fetch(admin, "/readyz")
        assert code == 200, text
        line = text.splitlines()[1]
        assert line.startswith("configuration: reload refused 20"), line
        assert "the one loaded" in line and "stays" in line and "'bx'" in line, line
        metrics = fetch(admin, "/metrics")[1]
        assert _metric(metrics, "gateway_config_last_reload_successful") == 0
        refused_at = _metric(metrics, "gateway_config_last_reload_timestamp_seconds")
        assert refused_at >= started - 1
        # A good file again.
        path.write_text(good)
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("configuration reloaded", since=mark)
        assert fetch(admin, "/readyz")[1].splitlines()[1].startswith("configuration: reloaded 20")
        metrics = fetch(admin, "/metrics")[1]
        assert _metric(metrics, "gateway_config_last_reload_successful") == 1
        assert _metric(metrics, "gateway_config_last_reload_timestamp_seconds") >= refused_at
        assert 'gateway_reloads_total{outcome="failed"} 1.0' in metrics
