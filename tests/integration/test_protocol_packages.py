"""A protocol from outside the gateway, installed through the ``gateway.protocols`` entry point.

``tests/support/echo`` is a complete small protocol (a listener, a destination,
a message kind of its own) that no core file knows.  Installed as a
distribution with an entry point, it is in ``gateway schema``, passes ``gateway
check``, runs, routes through the spool, and has metrics.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.peers import REPO_ROOT, GatewayProcess, free_port, wait_until

ENTRY_POINT = "echo = tests.support.echo.entry:PROTOCOLS\n"


def install_echo(site: Path) -> dict[str, str]:
    """A distribution 'gateway-echo' in ``site`` whose entry point names the echo protocol."""
    dist = site / "gateway_echo-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gateway-echo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[gateway.protocols]\n{ENTRY_POINT}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(site)])
    return env


CONFIG = """\
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  lines-in:
    protocol: echo
    listen: tcp:{port}:interface=127.0.0.1
    greeting: hello from the echo package
destinations:
  lines-file:
    protocol: echo-file
    path: lines.txt
    retry_min: 1s
routes:
  - name: lines
    from: lines-in
    match: {{text: '^(?P<word>[a-z]+)'}}
    to: lines-file
"""


def gateway(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_installed_protocol_shows_in_schema_and_check(tmp_path: Path) -> None:
    env = install_echo(tmp_path / "site")
    schema = json.loads(gateway(["schema"], env, tmp_path).stdout)
    listeners = schema["properties"]["listeners"]["additionalProperties"]["oneOf"]
    echo = [s for s in listeners if s["properties"]["protocol"] == {"enum": ["echo"]}]
    assert echo and "greeting" in echo[0]["properties"]
    match = schema["properties"]["routes"]["anyOf"][0]["properties"]["match"]["properties"]
    assert "(echo)" in match["text"]["description"]
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(port=free_port(), admin=free_port()))
    assert gateway(["check", "-c", str(config)], env, tmp_path).returncode == 0
    # A key the package does not declare is refused like any other, at its line.
    config.write_text(config.read_text().replace("greeting:", "greting:"))
    checked = gateway(["check", "-c", str(config)], env, tmp_path)
    assert checked.returncode == 1
    assert "routes.yaml:7:5: listener 'lines-in': unknown key 'greting'; did you mean" in (
        checked.stderr
    )
    # Without the entry point the protocol is unknown.
    plain = dict(env, PYTHONPATH=str(REPO_ROOT))
    checked = gateway(["check", "-c", str(config)], plain, tmp_path)
    assert "unknown protocol 'echo'" in checked.stderr


def test_an_installed_protocol_runs_routes_and_has_metrics(tmp_path: Path) -> None:
    env = install_echo(tmp_path / "site")
    port, admin = free_port(), free_port()
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(port=port, admin=admin))
    process = GatewayProcess(config, env=env)
    process.start([port, admin])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            reader = conn.makefile("rb")
            assert reader.readline() == b"hello from the echo package\n"
            conn.sendall(b"first line\n")
            assert reader.readline().startswith(b"+OK ")
            conn.sendall(b"42 is not a word\n")  # no route takes it
            assert reader.readline().startswith(b"-ERR no-route: ")
            conn.sendall(b"second line\n")
            assert reader.readline().startswith(b"+OK ")
            lines = tmp_path / "lines.txt"
            wait_until(
                lambda: lines.exists() and lines.read_text().count("\n") == 2,
                timeout=10,
                what="both lines in the file",
            )
            assert lines.read_text() == "first line\nsecond line\n"
            page = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10)
            metrics = page.read().decode()
        assert 'gateway_listener_messages_total{listener="lines-in",outcome="accepted"} 2.0' in (
            metrics
        )
        assert 'gateway_listener_messages_total{listener="lines-in",outcome="rejected"} 1.0' in (
            metrics
        )
        assert 'gateway_listener_open_connections{listener="lines-in"} 1.0' in metrics
        assert 'gateway_deliveries_total{destination="lines-file",outcome="delivered"} 2.0' in (
            metrics
        )
    finally:
        process.stop()
