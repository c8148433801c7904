"""The TFTP listener against real clients: tftp-hpa, atftp and curl read files from a
folder through the gateway, with the block sizes and windows they ask for, block-number
roll-over, netascii, and every error a client can meet; a raw socket plays the client
that stops ACKing, ACKs twice, or is a stranger to the transfer."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.protocols.tftp import codec
from tests.conftest import GatewayFactory, NginxFactory
from tests.peers import free_port, require_binary, wait_until

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tftp-root")
    (root / "pxelinux").mkdir()
    # Sizes that are no multiple of any block size; one past 65535 blocks of 512.
    (root / "pxelinux" / "rand5m.bin").write_bytes(os.urandom(5 * MIB + 777))
    (root / "pxelinux" / "big.bin").write_bytes(os.urandom(40 * MIB + 1234))
    (root / "pxelinux" / "exact.bin").write_bytes(os.urandom(1468 * 4))
    (root / "pxelinux" / "text.cfg").write_bytes(b"DEFAULT linux\nLABEL linux\n\tKERNEL vmlinuz\n")
    (root / "secret.txt").write_text("outside the route's names\n")
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(port: int, admin: int, root: Path, extra: str = "") -> str:
    return f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  boot:
    protocol: tftp
    listen: "udp:{port}:interface=127.0.0.1"
{extra}
destinations:
  bootfiles: {{protocol: folder, path: "{root}"}}
routes:
  - {{name: pxe, from: boot, match: {{name: '^/?pxelinux/'}}, to: bootfiles}}
"""


def _answers(port: int) -> bool | None:
    """Whether the TFTP listener answers (a request for a name no route serves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        s.sendto(codec.request(codec.RRQ, "probe"), ("127.0.0.1", port))
        try:
            s.recvfrom(600)
        except TimeoutError:
            return None
        return True


def _gateway(gateway_factory: GatewayFactory, root: Path, extra: str = "") -> tuple[int, int]:
    port, admin = free_port("udp"), free_port()
    gw = gateway_factory(_config(port, admin, root, extra))
    gw.start(admin)
    wait_until(lambda: _answers(port), "the TFTP listener to answer")
    return port, admin


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def test_real_clients_read_files_with_the_block_sizes_they_ask_for(
    gateway_factory: GatewayFactory, files: Path, tmp_path: Path
) -> None:
    port, admin = _gateway(gateway_factory, files)
    want = _sha(files / "pxelinux" / "rand5m.bin")
    tftp, atftp, curl = require_binary("tftp"), require_binary("atftp"), require_binary("curl")
    out = tmp_path / "hpa.bin"
    done = _run([tftp, "-m", "binary", "127.0.0.1", str(port), "-c", "get",
                 "pxelinux/rand5m.bin", str(out)])  # fmt: skip
    assert done.returncode == 0 and _sha(out) == want, done
    for blksize in (1468, 65464):
        out = tmp_path / f"atftp-{blksize}.bin"
        done = _run([atftp, "--get", "-r", "/pxelinux/rand5m.bin", "-l", str(out),
                     "--option", f"blksize {blksize}", "--option", "tsize 0",
                     "127.0.0.1", str(port)])  # fmt: skip
        assert done.returncode == 0 and _sha(out) == want, done
        assert f"Option blksize = {blksize}" in done.stderr
    out = tmp_path / "window.bin"
    done = _run([atftp, "--get", "-r", "pxelinux/rand5m.bin", "-l", str(out),
                 "--option", "blksize 1468", "--option", "windowsize 4", "127.0.0.1", str(port)])  # fmt: skip
    assert done.returncode == 0 and _sha(out) == want, done
    assert "Option windowsize = 4" in done.stderr
    out = tmp_path / "curl.bin"
    done = _run([curl, "-sS", "-o", str(out), "--tftp-blksize", "1468",
                 f"tftp://127.0.0.1:{port}/pxelinux/rand5m.bin"])  # fmt: skip
    assert done.returncode == 0 and _sha(out) == want, done
    # A file of whole blocks ends with an empty one.
    out = tmp_path / "exact.bin"
    done = _run([curl, "-sS", "-o", str(out), "--tftp-blksize", "1468",
                 f"tftp://127.0.0.1:{port}/pxelinux/exact.bin"])  # fmt: skip
    assert done.returncode == 0 and _sha(out) == _sha(files / "pxelinux" / "exact.bin")
    metrics = _run([curl, "-s", f"http://127.0.0.1:{admin}/metrics"]).stdout
    assert 'gateway_tftp_transfers_total{listener="boot",outcome="complete",route="pxe"} 6.0' in (
        metrics
    ), metrics


def test_past_65535_blocks_the_numbers_roll_over(
    gateway_factory: GatewayFactory, files: Path, tmp_path: Path
) -> None:
    port, _ = _gateway(gateway_factory, files)
    out = tmp_path / "big.bin"
    done = _run([require_binary("tftp"), "-m", "binary", "127.0.0.1", str(port), "-c", "get",
                 "pxelinux/big.bin", str(out)], timeout=180)  # fmt: skip
    assert done.returncode == 0, done
    assert out.stat().st_size == 40 * MIB + 1234  # 81,923 blocks of 512
    assert _sha(out) == _sha(files / "pxelinux" / "big.bin")


def test_netascii_turns_line_ends_into_cr_lf_on_the_wire_and_tsize_is_the_size(
    gateway_factory: GatewayFactory, files: Path
) -> None:
    port, _ = _gateway(gateway_factory, files)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(
            codec.request(codec.RRQ, "pxelinux/rand5m.bin", blksize="1468", tsize="0", foo="1"),
            ("127.0.0.1", port),
        )
        packet, peer = s.recvfrom(600)
        assert codec.parse(packet) == codec.OptionAck(
            {"blksize": "1468", "tsize": str(5 * MIB + 777)}
        )
        s.sendto(codec.error(0, "only asking"), peer)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(codec.request(codec.RRQ, "pxelinux/text.cfg", "netascii"), ("127.0.0.1", port))
        packet, peer = s.recvfrom(600)
        s.sendto(codec.ack(1), peer)
    assert codec.parse(packet) == codec.Data(
        1, b"DEFAULT linux\r\nLABEL linux\r\n\tKERNEL vmlinuz\r\n"
    )


@pytest.mark.parametrize(
    ("name", "curl_exit", "text"),
    [
        ("pxelinux/missing.bin", 68, "no file 'pxelinux/missing.bin'"),  # 1: file not found
        ("secret.txt", 68, "no route serves this name"),  # 1
        ("pxelinux/../../etc/passwd", 69, "leads out of the folder"),  # 2: access violation
    ],
)
def test_what_cannot_be_read_gets_the_right_error(
    gateway_factory: GatewayFactory, files: Path, name: str, curl_exit: int, text: str
) -> None:
    port, _ = _gateway(gateway_factory, files)
    # atftp sends the name as given (curl would tidy the '..' away itself).
    done = _run([require_binary("atftp"), "--get", "-r", name, "-l", os.devnull,
                 "127.0.0.1", str(port)])  # fmt: skip
    assert done.returncode != 0 and text in done.stderr, done
    done = _run([require_binary("curl"), "-s", "-o", os.devnull,
                 f"tftp://127.0.0.1:{port}/{name.replace('../', '%2E%2E/')}"])  # fmt: skip
    assert done.returncode == curl_exit, done


def test_uploads_and_strangers_are_refused(
    gateway_factory: GatewayFactory, files: Path, tmp_path: Path
) -> None:
    port, _ = _gateway(gateway_factory, files, "    allow: [127.0.0.1/32]")
    local = tmp_path / "up.txt"
    local.write_text("x\n")
    done = _run([require_binary("curl"), "-s", "-T", str(local),
                 f"tftp://127.0.0.1:{port}/pxelinux/up.txt"])  # fmt: skip
    assert done.returncode == 69, done  # access violation: no uploads
    assert not (files / "pxelinux" / "up.txt").exists()
    # 127.0.0.2 is outside the allow list.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        s.settimeout(2)
        s.sendto(codec.request(codec.RRQ, "pxelinux/rand5m.bin"), ("127.0.0.1", port))
        packet = codec.parse(s.recvfrom(600)[0])
    assert packet == codec.Error(codec.ACCESS_VIOLATION, "not allowed from this address")


def test_a_client_that_stops_acking_is_given_up_on_after_its_retries(
    gateway_factory: GatewayFactory, files: Path
) -> None:
    port, admin = _gateway(gateway_factory, files, "    timeout: 200ms\n    retries: 3")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(codec.request(codec.RRQ, "pxelinux/rand5m.bin"), ("127.0.0.1", port))
        started = time.monotonic()
        got = []
        while True:
            packet = codec.parse(s.recvfrom(600)[0])
            got.append(packet)
            if isinstance(packet, codec.Error):
                break
    # Block 1, sent again after 0.2, 0.4 and 0.8 s; then an error after 1.6 s more.
    assert got[:-1] == [codec.Data(1, (files / "pxelinux" / "rand5m.bin").read_bytes()[:512])] * 4
    assert got[-1] == codec.Error(codec.NOT_DEFINED, "timed out waiting for an ACK")
    assert 2.5 < time.monotonic() - started < 4.5
    metrics = _run([require_binary("curl"), "-s", f"http://127.0.0.1:{admin}/metrics"]).stdout
    assert 'outcome="timeout",route="pxe"} 1.0' in metrics


def test_a_duplicate_ack_does_not_double_the_blocks_and_a_stranger_is_told_off(
    gateway_factory: GatewayFactory, files: Path
) -> None:
    port, _ = _gateway(gateway_factory, files)
    data = (files / "pxelinux" / "rand5m.bin").read_bytes()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger,
    ):
        s.settimeout(0.5)
        stranger.settimeout(2)
        s.sendto(codec.request(codec.RRQ, "pxelinux/rand5m.bin"), ("127.0.0.1", port))
        first, peer = s.recvfrom(600)
        assert codec.parse(first) == codec.Data(1, data[:512])
        stranger.sendto(codec.ack(1), peer)
        assert codec.parse(stranger.recvfrom(600)[0]) == codec.Error(
            codec.UNKNOWN_TID, "unknown transfer ID"
        )
        s.sendto(codec.ack(1), peer)
        s.sendto(codec.ack(1), peer)  # the same ACK again
        assert codec.parse(s.recvfrom(600)[0]) == codec.Data(2, data[512:1024])
        with pytest.raises(TimeoutError):  # no second block 2 (timeout is 1 s)
            s.recvfrom(600)
        s.sendto(codec.error(0, "enough"), peer)


def test_a_busy_listener_says_so(gateway_factory: GatewayFactory, files: Path) -> None:
    port, _ = _gateway(gateway_factory, files, "    max_transfers: 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(codec.request(codec.RRQ, "pxelinux/rand5m.bin"), ("127.0.0.1", port))
        _, peer = s.recvfrom(600)  # a transfer runs and waits for its ACK
        done = _run([require_binary("curl"), "-s", "-o", os.devnull,
                     f"tftp://127.0.0.1:{port}/pxelinux/rand5m.bin"])  # fmt: skip
        assert done.returncode == 71, done  # error 0 (not defined): busy
        s.sendto(codec.error(0, "enough"), peer)


def _web_config(port: int, admin: int, url: str, extra: str = "") -> str:
    return f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  boot: {{protocol: tftp, listen: "udp:{port}:interface=127.0.0.1"}}
destinations:
  web: {{protocol: http, url: "{url}", timeout: 5s{extra}}}
routes:
  - {{name: from-web, from: boot, to: web}}
"""


def _web_gateway(gateway_factory: GatewayFactory, url: str, extra: str = "") -> tuple[int, int]:
    port, admin = free_port("udp"), free_port()
    gateway_factory(_web_config(port, admin, url, extra)).start(admin)
    wait_until(lambda: _answers(port), "the TFTP listener to answer")
    return port, admin


def test_files_are_read_from_a_web_server_with_its_size_and_errors(
    gateway_factory: GatewayFactory, nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    origin = nginx_factory()
    boot = origin.root / "boot" / "pxelinux"
    boot.mkdir(parents=True)
    data = os.urandom(5 * MIB + 777)
    (boot / "rand5m.bin").write_bytes(data)
    port, _ = _web_gateway(gateway_factory, f"{origin.url}/boot/")
    atftp, curl = require_binary("atftp"), require_binary("curl")
    for blksize in (512, 1468, 65464):
        out = tmp_path / f"web-{blksize}.bin"
        done = _run([atftp, "--get", "-r", "pxelinux/rand5m.bin", "-l", str(out),
                     "--option", f"blksize {blksize}", "127.0.0.1", str(port)])  # fmt: skip
        assert done.returncode == 0 and out.read_bytes() == data, done
    # tsize is the answer's Content-Length.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(codec.request(codec.RRQ, "/pxelinux/rand5m.bin", tsize="0"), ("127.0.0.1", port))
        packet, peer = s.recvfrom(600)
        assert codec.parse(packet) == codec.OptionAck({"tsize": str(len(data))})
        s.sendto(codec.error(0, "only asking"), peer)
    assert "GET\t/boot/pxelinux/rand5m.bin\t200" in origin.access_log_path.read_text()
    # A name the server does not have: 404 there, "file not found" here; '..' may not
    # climb above the URL's path.
    done = _run([curl, "-s", "-o", os.devnull, f"tftp://127.0.0.1:{port}/pxelinux/nothere"])
    assert done.returncode == 68, done
    done = _run([atftp, "--get", "-r", "../file", "-l", os.devnull, "127.0.0.1", str(port)])
    assert "leads out of the folder" in done.stderr, done
    # The web server down: an error packet at once, not a hang.
    origin.stop()
    started = time.monotonic()
    done = _run([curl, "-s", "-o", os.devnull, f"tftp://127.0.0.1:{port}/pxelinux/rand5m.bin"])
    assert done.returncode == 71 and time.monotonic() - started < 5, done  # 0: not defined


def test_the_first_block_goes_out_long_before_a_slow_file_has_arrived(
    gateway_factory: GatewayFactory, nginx_factory: NginxFactory
) -> None:
    origin = nginx_factory()
    data = os.urandom(2 * MIB)  # 20 s at the origin's 100 kB/s
    (origin.root / "slow.bin").write_bytes(data)
    port, _ = _web_gateway(gateway_factory, f"{origin.url}/slow/")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        started = time.monotonic()
        s.sendto(codec.request(codec.RRQ, "slow.bin", blksize="1468"), ("127.0.0.1", port))
        packet, peer = s.recvfrom(2000)
        assert codec.parse(packet) == codec.OptionAck({"blksize": "1468"})
        s.sendto(codec.ack(0), peer)
        packet, _ = s.recvfrom(2000)
        assert codec.parse(packet) == codec.Data(1, data[:1468])
        assert time.monotonic() - started < 2.0
        s.sendto(codec.error(0, "that will do"), peer)


def _upload_gateway(
    gateway_factory: GatewayFactory, tmp_path: Path, extra: str = ""
) -> tuple[int, int, Path, Any]:
    port, admin = free_port("udp"), free_port()
    inbox = tmp_path / "inbox"
    gw = gateway_factory(f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  boot:
    protocol: tftp
    listen: "udp:{port}:interface=127.0.0.1"
{extra}
destinations:
  inbox: {{protocol: folder, path: "{inbox}", uploads: true}}
  readonly: {{protocol: folder, path: "{tmp_path}"}}
routes:
  - {{name: uploads, from: boot, match: {{name: '\\.cfg$'}}, to: inbox}}
  - {{name: reads, from: boot, to: readonly}}
""")
    gw.start(admin)
    wait_until(lambda: _answers(port), "the TFTP listener to answer")
    return port, admin, inbox, gw


def test_uploads_by_each_client_land_whole_in_the_folder(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    port, admin, inbox, _ = _upload_gateway(gateway_factory, tmp_path)
    data = os.urandom(3 * MIB + 321)
    local = tmp_path / "local.cfg"
    local.write_bytes(data)
    tftp, atftp, curl = require_binary("tftp"), require_binary("atftp"), require_binary("curl")
    done = _run([tftp, "-m", "binary", "127.0.0.1", str(port), "-c", "put", str(local), "hpa.cfg"])
    assert done.returncode == 0 and "Error" not in done.stdout, done
    done = _run([atftp, "--put", "-l", str(local), "-r", "sites/atftp.cfg", "--option",
                 "blksize 1468", "--option", "windowsize 4", "--option", f"tsize {len(data)}",
                 "127.0.0.1", str(port)])  # fmt: skip
    assert done.returncode == 0, done
    done = _run([curl, "-sS", "-T", str(local), f"tftp://127.0.0.1:{port}/curl.cfg"])
    assert done.returncode == 0, done
    for name in ("hpa.cfg", "sites/atftp.cfg", "curl.cfg"):
        path = wait_until(lambda n=name: (inbox / n).exists() and inbox / n, f"{name} delivered")
        assert path.read_bytes() == data, name
    text = tmp_path / "text.cfg"
    text.write_bytes(b"interface eth0\nend\n")
    done = _run([tftp, "-m", "netascii", "127.0.0.1", str(port), "-c", "put", str(text), "t.cfg"])
    assert done.returncode == 0, done
    wait_until(lambda: (inbox / "t.cfg").exists() or None, "the netascii upload")
    assert (inbox / "t.cfg").read_bytes() == b"interface eth0\nend\n"
    metrics = _run([curl, "-s", f"http://127.0.0.1:{admin}/metrics"]).stdout
    assert (
        'gateway_tftp_transfers_total{listener="boot",outcome="complete",route="uploads"} 4.0'
        in (metrics)
    )
    assert 'gateway_deliveries_total{destination="inbox",outcome="delivered"} 4.0' in metrics
    # The spool keeps nothing once they are delivered.
    spool = tmp_path / "var" / "spool"
    assert list((spool / "incoming").iterdir()) == [] and list((spool / "files").iterdir()) == []


def test_uploads_that_cannot_be_taken_are_refused_and_leave_nothing(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    port, _, inbox, _ = _upload_gateway(
        gateway_factory, tmp_path, "    max_size: 1MiB\n    timeout: 200ms\n    retries: 2"
    )
    curl = require_binary("curl")
    big = tmp_path / "big.cfg"
    big.write_bytes(os.urandom(2 * MIB))
    # Announced too large (tsize): refused at once; curl maps error 3 (disk full) to 70.
    done = _run([curl, "-s", "-T", str(big), f"tftp://127.0.0.1:{port}/big.cfg"])
    assert done.returncode == 70, done
    # Not announced: refused when it grows past max_size.
    done = _run([require_binary("tftp"), "-m", "binary", "127.0.0.1", str(port), "-c", "put",
                 str(big), "big2.cfg"])  # fmt: skip
    assert "larger than 1048576 octets" in done.stdout, done
    # A name for reads only (the read-only folder): access violation (curl 69).
    done = _run([curl, "-s", "-T", str(big), f"tftp://127.0.0.1:{port}/notes.txt"])
    assert done.returncode == 69, done
    # A client that stops in the middle: the transfer times out, nothing is delivered.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(codec.request(codec.WRQ, "half.cfg"), ("127.0.0.1", port))
        packet, peer = s.recvfrom(600)
        assert codec.parse(packet) == codec.Ack(0)
        s.sendto(codec.data(1, b"x" * 512), peer)
        assert codec.parse(s.recvfrom(600)[0]) == codec.Ack(1)
        while not isinstance(codec.parse(s.recvfrom(600)[0]), codec.Error):
            pass  # ACK 1 again, then the error
    time.sleep(0.5)
    assert not inbox.exists() or list(inbox.iterdir()) == []
    spool = tmp_path / "var" / "spool"
    assert list((spool / "incoming").iterdir()) == []


def test_no_acknowledged_upload_is_lost_when_the_gateway_is_killed(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    port, admin, inbox, gw = _upload_gateway(gateway_factory, tmp_path)
    curl = require_binary("curl")
    local = tmp_path / "local.cfg"
    results: dict[str, int] = {}
    killed_at = 15
    for n in range(40):
        local.write_bytes(f"upload {n}\n".encode() * 20000)
        if n == killed_at:
            gw.kill9()  # no shutdown at all
        done = _run([curl, "-s", "--max-time", "3", "-T", str(local),
                     f"tftp://127.0.0.1:{port}/u{n}.cfg"])  # fmt: skip
        results[f"u{n}.cfg"] = done.returncode
        if n == killed_at + 5:
            gw.start(admin)
            wait_until(lambda: _answers(port), "the TFTP listener to answer again")
    acknowledged = [name for name, code in results.items() if code == 0]
    assert len(acknowledged) >= 30, results
    for name in acknowledged:
        path = wait_until(lambda n=name: (inbox / n).exists() and inbox / n, f"{name} delivered")
        n = int(name[1:-4])
        assert path.read_bytes() == f"upload {n}\n".encode() * 20000, name
