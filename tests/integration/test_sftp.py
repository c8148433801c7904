"""The SFTP destination against OpenSSH's sshd: uploads taken by FTP and TFTP land on the
server whole, in their folders, under their names; an existing name is kept (a dead
letter says why) unless the destination may overwrite; a server that is down, or whose
key is not the pinned one, gets the files later or never, and nothing is lost."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from gateway.users import hash_password
from tests.conftest import GatewayFactory
from tests.peers import GatewayProcess, free_port, require_binary, wait_until
from tests.peers_files import Sshd

PASSWORD = "pw"
HASH = hash_password(PASSWORD)


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _gateway(
    gateway_factory: GatewayFactory, sshd: Sshd, known_hosts: Path | None = None, extra: str = ""
) -> tuple[int, int, int, GatewayProcess]:
    ftp, tftp, admin = free_port(), free_port("udp"), free_port()
    gw = gateway_factory(f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  drop:
    protocol: ftp
    listen: tcp:{ftp}:interface=127.0.0.1
    users: {{scan: '{HASH}'}}
  boot:
    protocol: tftp
    listen: "udp:{tftp}:interface=127.0.0.1"
destinations:
  backups:
    protocol: sftp
    url: sftp://{sshd.USER}@127.0.0.1:{sshd.port}/incoming/
    key: {sshd.client_key}
    known_hosts: {known_hosts or sshd.known_hosts}
    retry_min: 1s
    retry_max: 2s
{extra}
routes:
  - {{name: uploads, from: [drop, boot], match: {{name: '\\.(cfg|bin)$'}}, to: backups}}
""")
    gw.start([ftp, admin])
    return ftp, tftp, admin, gw


def test_uploads_by_ftp_and_tftp_land_on_the_sftp_server(
    gateway_factory: GatewayFactory, sshd: Sshd, tmp_path: Path
) -> None:
    ftp, tftp, _, gw = _gateway(gateway_factory, sshd)
    curl = require_binary("curl")
    data = os.urandom(3 * 1024 * 1024 + 99)
    local = tmp_path / "image.bin"
    local.write_bytes(data)
    done = _run([curl, "-sS", "-w", "%{response_code}", "-T", str(local),
                 f"ftp://scan:{PASSWORD}@127.0.0.1:{ftp}/site-a/cam1/image.bin"])  # fmt: skip
    assert done.stdout == "226", done
    config = tmp_path / "sw1.cfg"
    config.write_bytes(b"hostname sw1\n" * 100)
    done = _run([require_binary("tftp"), "-m", "binary", "127.0.0.1", str(tftp), "-c", "put",
                 str(config), "switches/sw1.cfg"])  # fmt: skip
    assert done.returncode == 0, done
    done = _run([require_binary("atftp"), "--put", "-l", str(config), "-r", "switches/sw2.cfg",
                 "--option", "blksize 1468", "127.0.0.1", str(tftp)])  # fmt: skip
    assert done.returncode == 0, done
    done = _run([curl, "-sS", "-T", str(config), f"tftp://127.0.0.1:{tftp}/switches/sw3.cfg"])
    assert done.returncode == 0, done
    image = sshd.incoming / "site-a" / "cam1" / "image.bin"
    wait_until(lambda: image.exists() or None, "the image on the SFTP server")
    assert hashlib.sha256(image.read_bytes()).digest() == hashlib.sha256(data).digest()
    for n in (1, 2, 3):
        switch = sshd.incoming / "switches" / f"sw{n}.cfg"
        wait_until(lambda s=switch: s.exists() or None, f"sw{n}.cfg on the SFTP server")
        assert switch.read_bytes() == config.read_bytes()
    # Nothing half-written is left beside them, and OpenSSH's client sees the same.
    assert [p.name for p in image.parent.iterdir()] == ["image.bin"]
    listing = sshd.sftp("ls -l /incoming/site-a/cam1")
    assert f" {len(data)} " in listing.stdout, listing
    # The same name again: kept as it was, and the delivery is a dead letter saying why.
    local.write_bytes(b"another image")
    done = _run([curl, "-sS", "-w", "%{response_code}", "-T", str(local),
                 f"ftp://scan:{PASSWORD}@127.0.0.1:{ftp}/site-a/cam1/image.bin"])  # fmt: skip
    assert done.stdout == "226", done
    dead = wait_until(lambda: gw.queue("dead") or None, "the dead letter")
    assert "exists already" in json.dumps(dead), dead
    assert hashlib.sha256(image.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_with_overwrite_the_new_file_replaces_the_old(
    gateway_factory: GatewayFactory, sshd: Sshd, tmp_path: Path
) -> None:
    ftp, _, _, _ = _gateway(gateway_factory, sshd, extra="    overwrite: true")
    curl = require_binary("curl")
    local = tmp_path / "r1.cfg"
    target = sshd.incoming / "r1.cfg"
    for text in (b"version 1\n", b"version 2\n"):
        local.write_bytes(text)
        done = _run([curl, "-sS", "-w", "%{response_code}", "-T", str(local),
                     f"ftp://scan:{PASSWORD}@127.0.0.1:{ftp}/r1.cfg"])  # fmt: skip
        assert done.stdout == "226", done
        wait_until(lambda t=text: (target.exists() and target.read_bytes() == t) or None, "r1.cfg")


def test_a_server_that_is_down_gets_the_files_once_it_is_back(
    gateway_factory: GatewayFactory, sshd: Sshd, tmp_path: Path
) -> None:
    ftp, _, admin, gw = _gateway(gateway_factory, sshd)
    sshd.stop()
    curl = require_binary("curl")
    local = tmp_path / "late.bin"
    for n in range(5):
        local.write_bytes(f"late {n}\n".encode() * 1000)
        done = _run([curl, "-sS", "-w", "%{response_code}", "-T", str(local),
                     f"ftp://scan:{PASSWORD}@127.0.0.1:{ftp}/late{n}.bin"])  # fmt: skip
        assert done.stdout == "226", done  # stored: the server being down is no matter
    waiting = wait_until(
        lambda: [d for d in gw.queue("list") if "connect" in json.dumps(d)] or None,
        "the deliveries to wait, saying why",
    )
    assert len(waiting) == 5, waiting
    sshd.start()
    for n in range(5):
        path = sshd.incoming / f"late{n}.bin"
        wait_until(lambda p=path: p.exists() or None, f"late{n}.bin", timeout=30)
        assert path.read_bytes() == f"late {n}\n".encode() * 1000
    metrics = _run([curl, "-s", f"http://127.0.0.1:{admin}/metrics"]).stdout
    assert 'gateway_deliveries_total{destination="backups",outcome="delivered"} 5.0' in metrics


def test_a_server_whose_key_is_not_the_pinned_one_gets_nothing(
    gateway_factory: GatewayFactory, sshd: Sshd, tmp_path: Path
) -> None:
    other = tmp_path / "other_key"
    subprocess.run([require_binary("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f",
                    str(other)], check=True)  # fmt: skip
    known = tmp_path / "known_hosts"
    key = " ".join(Path(f"{other}.pub").read_text().split()[:2])
    known.write_text(f"[127.0.0.1]:{sshd.port} {key}\n")
    ftp, _, _, gw = _gateway(gateway_factory, sshd, known_hosts=known)
    local = tmp_path / "x.bin"
    local.write_bytes(b"secret")
    done = _run([require_binary("curl"), "-sS", "-w", "%{response_code}", "-T", str(local),
                 f"ftp://scan:{PASSWORD}@127.0.0.1:{ftp}/x.bin"])  # fmt: skip
    assert done.stdout == "226", done
    waiting = wait_until(
        lambda: [d for d in gw.queue("list") if "not the one in" in json.dumps(d)] or None,
        "the delivery to wait, saying why",
    )
    assert len(waiting) == 1, waiting
    assert not (sshd.incoming / "x.bin").exists()
