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
        assert fetch(admin, "/readyz") == (200, "ready\n")
        assert fetch(admin, "/nothing")[0] == 404
        # The admin endpoint moves on reload.
        path.write_text(path.read_text().replace(f"tcp:{admin}:", f"tcp:{other}:"))
        mark = gw.log_mark()
        gw.hup()
        gw.wait_for_log("configuration reloaded", since=mark)
        assert fetch(other, "/readyz") == (200, "ready\n")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                fetch(admin, "/healthz")
            except urllib.error.URLError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the old admin port is still open after the reload")
