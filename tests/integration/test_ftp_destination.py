"""The FTP destination against vsftpd: uploads taken by the gateway's FTP and TFTP listeners
land on the server whole, in their folders, in TLS or in the clear; an existing name is
kept (a dead letter says why) unless the destination may overwrite; a server that is down
or refuses the password gets the files later, and nothing is lost."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from gateway.users import hash_password
from tests.conftest import GatewayFactory
from tests.peers import GatewayProcess, free_port, require_binary, wait_until
from tests.peers_files import Vsftpd

HASH = hash_password("pw")


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _gateway(
    gateway_factory: GatewayFactory,
    vsftpd: Vsftpd,
    settings: str = "",
    password: str = "",
    routes: str = "",
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
  archive:
    protocol: ftp
    url: ftp://{vsftpd.USER}@127.0.0.1:{vsftpd.port}/incoming/
    password: '{password or vsftpd.PASSWORD}'
    retry_min: 1s
    retry_max: 2s
{settings}
routes:
{routes}  - {{name: uploads, from: [drop, boot], match: {{name: '\\.(cfg|bin)$'}}, to: archive}}
""")
    gw.start([ftp, admin])
    return ftp, tftp, admin, gw


def _put(ftp: int, local: Path, name: str) -> str:
    done = _run([require_binary("curl"), "-sS", "-w", "%{response_code}", "-T", str(local),
                 f"ftp://scan:pw@127.0.0.1:{ftp}/{name}"])  # fmt: skip
    return done.stdout


def test_uploads_land_on_vsftpd_in_tls_and_in_the_clear(
    gateway_factory: GatewayFactory, vsftpd: Vsftpd, tmp_path: Path
) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    local = tmp_path / "image.bin"
    local.write_bytes(data)
    for tls in ("require", "none"):
        ftp, tftp, _, gw = _gateway(gateway_factory, vsftpd, f"    tls: {tls}")
        assert _put(ftp, local, f"{tls}/cam1/image.bin") == "226"
        config = tmp_path / "sw1.cfg"
        config.write_bytes(b"hostname sw1\n" * 50)
        done = _run([require_binary("tftp"), "-m", "binary", "127.0.0.1", str(tftp), "-c", "put",
                     str(config), f"{tls}/sw1.cfg"])  # fmt: skip
        assert done.returncode == 0, done
        image = vsftpd.incoming / tls / "cam1" / "image.bin"
        wait_until(lambda p=image: p.exists() or None, f"the image ({tls}) on vsftpd")
        assert hashlib.sha256(image.read_bytes()).digest() == hashlib.sha256(data).digest()
        switch = vsftpd.incoming / tls / "sw1.cfg"
        wait_until(lambda p=switch: p.exists() or None, f"sw1.cfg ({tls}) on vsftpd")
        assert switch.read_bytes() == config.read_bytes()
        assert [p.name for p in image.parent.iterdir()] == ["image.bin"]  # no .part left
        gw.stop()
    log = vsftpd.log_path.read_text()
    assert "AUTH TLS" in log and "PROT P" in log, log[-2000:]
    # The same name again: kept as it was, and the delivery is a dead letter saying why.
    ftp, _, _, gw = _gateway(gateway_factory, vsftpd)
    local.write_bytes(b"another")
    assert _put(ftp, local, "none/cam1/image.bin") == "226"
    dead = wait_until(lambda: gw.queue("dead") or None, "the dead letter")
    assert "exists already" in json.dumps(dead), dead
    image = vsftpd.incoming / "none" / "cam1" / "image.bin"
    assert hashlib.sha256(image.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_with_overwrite_the_new_file_replaces_the_old(
    gateway_factory: GatewayFactory, vsftpd: Vsftpd, tmp_path: Path
) -> None:
    ftp, _, _, _ = _gateway(gateway_factory, vsftpd, "    overwrite: true")
    local = tmp_path / "r1.cfg"
    target = vsftpd.incoming / "r1.cfg"
    for text in (b"version 1\n", b"version 2\n"):
        local.write_bytes(text)
        assert _put(ftp, local, "r1.cfg") == "226"
        wait_until(lambda t=text: (target.exists() and target.read_bytes() == t) or None, "r1.cfg")


def test_a_server_that_is_down_or_refuses_the_login_gets_the_files_later(
    gateway_factory: GatewayFactory, vsftpd: Vsftpd, tmp_path: Path
) -> None:
    ftp, _, _, gw = _gateway(gateway_factory, vsftpd)
    vsftpd.stop()
    local = tmp_path / "late.bin"
    for n in range(3):
        local.write_bytes(f"late {n}\n".encode() * 1000)
        assert _put(ftp, local, f"late{n}.bin") == "226"
    waiting = wait_until(
        lambda: [d for d in gw.queue("list") if "cannot connect" in json.dumps(d)] or None,
        "the deliveries to wait, saying why",
    )
    assert len(waiting) == 3, waiting
    vsftpd.start()
    for n in range(3):
        path = vsftpd.incoming / f"late{n}.bin"
        wait_until(lambda p=path: p.exists() or None, f"late{n}.bin", timeout=30)
        assert path.read_bytes() == f"late {n}\n".encode() * 1000
    gw.stop()
    ftp, _, _, gw = _gateway(gateway_factory, vsftpd, password="wrong")
    assert _put(ftp, local, "refused.bin") == "226"
    waiting = wait_until(
        lambda: [d for d in gw.queue("list") if "530" in json.dumps(d)] or None,
        "the delivery to wait, saying the login was refused",
    )
    assert len(waiting) == 1 and not (vsftpd.incoming / "refused.bin").exists()


def test_downloads_listings_and_tftp_reads_come_from_the_ftp_server(
    gateway_factory: GatewayFactory, vsftpd: Vsftpd, tmp_path: Path
) -> None:
    pub = vsftpd.incoming / "pub"
    pub.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 11)
    (pub / "image.bin").write_bytes(data)
    (pub / "sub").mkdir()
    ftp, tftp, _, _ = _gateway(
        gateway_factory,
        vsftpd,
        "    tls: require",
        routes="  - {name: reads, from: [drop, boot], match: {name: '^pub(/|$)'}, to: archive}\n",
    )
    curl = require_binary("curl")
    out = tmp_path / "got.bin"
    done = _run([curl, "-sS", "-o", str(out), f"ftp://scan:pw@127.0.0.1:{ftp}/pub/image.bin"])
    assert done.returncode == 0 and out.read_bytes() == data, done
    listing = _run([curl, "-sS", f"ftp://scan:pw@127.0.0.1:{ftp}/pub/"])
    lines = listing.stdout.splitlines()
    assert any(line.endswith(" image.bin") and f" {len(data)} " in line for line in lines), lines
    assert any(line.startswith("d") and line.endswith(" sub") for line in lines), lines
    done = _run([curl, "-sS", f"ftp://scan:pw@127.0.0.1:{ftp}/pub/missing.bin"])
    assert done.returncode == 78, done  # 550: the file does not exist
    # TFTP reads from the FTP server too, streamed.
    out = tmp_path / "tftp.bin"
    done = _run([require_binary("atftp"), "--get", "-r", "pub/image.bin", "-l", str(out),
                 "--option", "blksize 1468", "127.0.0.1", str(tftp)])  # fmt: skip
    assert done.returncode == 0 and out.read_bytes() == data, done


def test_a_server_that_wants_the_tls_session_resumed_on_data_connections_gets_it(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    # vsftpd's default: data connections must resume the control connection's session.
    with Vsftpd(tmp_path / "strict-vsftpd", ssl_reuse=True) as strict:
        strict.start()
        ftp, _, _, _ = _gateway(gateway_factory, strict, "    tls: require")
        local = tmp_path / "r.bin"
        for n in range(3):
            local.write_bytes(f"resumed {n}\n".encode() * 5000)
            assert _put(ftp, local, f"r{n}.bin") == "226"
        for n in range(3):
            path = strict.incoming / f"r{n}.bin"
            wait_until(lambda p=path: p.exists() or None, f"r{n}.bin on vsftpd", timeout=8)
            assert path.read_bytes() == f"resumed {n}\n".encode() * 5000
