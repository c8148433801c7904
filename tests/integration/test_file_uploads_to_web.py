"""Uploaded files sent on to a web service by a ``webhook`` destination, against nginx: PUT
at the URL plus the file's name (nginx's WebDAV module stores it), POST as
multipart/form-data (nginx keeps the body whole); a refusal is a dead letter, a server
that is down gets the file later."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from gateway.users import hash_password
from tests.conftest import GatewayFactory, NginxFactory
from tests.peers import GatewayProcess, free_port, require_binary, wait_until

HASH = hash_password("pw")


def _gateway(gateway_factory: GatewayFactory, url: str, method: str) -> tuple[int, GatewayProcess]:
    ftp, admin = free_port(), free_port()
    gw = gateway_factory(f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  drop:
    protocol: ftp
    listen: tcp:{ftp}:interface=127.0.0.1
    users: {{scan: '{HASH}'}}
destinations:
  service:
    protocol: webhook
    url: {url}
    method: {method}
    retry_min: 1s
    retry_max: 2s
routes:
  - {{name: uploads, from: drop, to: service}}
""")
    gw.start([ftp, admin])
    return ftp, gw


def _put(ftp: int, local: Path, name: str) -> str:
    done = subprocess.run(
        [require_binary("curl"), "-sS", "-w", "%{response_code}", "-T", str(local),
         f"ftp://scan:pw@127.0.0.1:{ftp}/{name}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return done.stdout


def test_files_are_put_below_the_url(
    gateway_factory: GatewayFactory, nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    nginx = nginx_factory()
    ftp, gw = _gateway(gateway_factory, f"{nginx.url}/dav/", "PUT")
    data = os.urandom(4 * 1024 * 1024 + 5)
    local = tmp_path / "scan.pdf"
    local.write_bytes(data)
    assert _put(ftp, local, "office/2026/scan%201.pdf") == "226"
    stored = nginx.root / "dav" / "office" / "2026" / "scan 1.pdf"
    wait_until(lambda: (stored.exists() and stored.stat().st_size == len(data)) or None, "the PUT")
    assert stored.read_bytes() == data
    # A web service cannot be asked to add to a file: APPE is refused before data moves.
    done = subprocess.run(
        [require_binary("curl"), "-sS", "--append", "-w", "%{response_code}", "-T", str(local),
         f"ftp://scan:pw@127.0.0.1:{ftp}/office/2026/scan%201.pdf"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout == "550", done
    # A URL where the server refuses PUT (405): a dead letter that says so.
    gw.stop()
    ftp, gw = _gateway(gateway_factory, f"{nginx.url}/hook/", "PUT")
    assert _put(ftp, local, "x.pdf") == "226"
    dead = wait_until(lambda: gw.queue("dead") or None, "the dead letter")
    assert "405" in json.dumps(dead), dead


def test_files_are_posted_as_form_data_and_wait_for_a_server_that_is_down(
    gateway_factory: GatewayFactory, nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    port = free_port()
    ftp, gw = _gateway(gateway_factory, f"http://127.0.0.1:{port}/post", "POST")
    data = b"%PDF-1.4\n" + os.urandom(300_000)
    local = tmp_path / "scan.pdf"
    local.write_bytes(data)
    assert _put(ftp, local, "scans/a.pdf") == "226"
    waiting = wait_until(
        lambda: [d for d in gw.queue("list") if "refused" in json.dumps(d)] or None,
        "the delivery to wait for the server",
    )
    assert len(waiting) == 1, waiting
    nginx = nginx_factory(port=port)
    # nginx writes the body file as it arrives: read it once the delivery is done.
    wait_until(lambda: not gw.queue("list") or None, "the POST delivered", timeout=30)
    posted = list(nginx.posted.rglob("*"))
    files = [p for p in posted if p.is_file()]
    assert len(files) == 1, posted
    body = files[0].read_bytes()
    head, _, rest = body.partition(b"\r\n\r\n")
    assert b'Content-Disposition: form-data; name="file"; filename="a.pdf"' in head, head
    assert b"Content-Type: application/pdf" in head
    boundary = head.split(b"\r\n")[0]
    assert rest == data + b"\r\n" + boundary + b"--\r\n"
