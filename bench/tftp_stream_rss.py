#!/usr/bin/env python3
"""Memory while streaming: one TFTP read of a large file that the gateway fetches from nginx.

Run from the repository with the project's virtualenv:

    .venv/bin/python bench/tftp_stream_rss.py [--size-gib 1] [--blksize 65464]

Debian packages it needs (it installs nothing): ``atftp nginx-light curl``.

nginx serves a sparse file of ``--size-gib`` GiB (zeros: it costs no disk);
the gateway's tftp listener answers a read of it from an ``http`` destination,
streaming (at most 256 KiB read ahead of the client).  The gateway's resident
set size (VmRSS) is sampled every 50 ms from before the transfer to its end;
the report gives the growth (the peak less the RSS just before) and whether
it stays under ``--limit-mib`` (20 MiB by default, the issue's target).  The
copy's size is checked; the exit status is 1 when the growth is over the limit.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import BenchError, gateway_env, spawn_logged, stop_process, wait_until
from tests.peers import free_port
from tests.peers_web import Nginx


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def _answers(port: int) -> bool:
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "--max-time", "1", f"tftp://127.0.0.1:{port}/.none"],
        check=False,
    )
    return done.returncode in (68, 69)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--blksize", type=int, default=65464)
    parser.add_argument("--limit-mib", type=float, default=20.0)
    args = parser.parse_args()
    for program in ("atftp", "nginx", "curl"):
        if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
            print(f"error: {program} is missing (see the docstring for the packages)")
            return 1
    size = int(args.size_gib * 1024**3)
    work = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    work.chmod(0o755)
    origin = Nginx(work / "nginx")
    gateway = None
    try:
        origin.start()
        with open(origin.root / "huge.bin", "wb") as huge:
            huge.truncate(size)
        port, admin = free_port("udp"), free_port()
        config = work / "routes.yaml"
        config.write_text(f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  boot: {{protocol: tftp, listen: "udp:{port}:interface=127.0.0.1"}}
destinations:
  web: {{protocol: http, url: "{origin.url}/"}}
routes:
  - {{name: web, from: boot, to: web}}
""")
        gateway, log = spawn_logged(
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            cwd=work, env=gateway_env(), log_path=work / "gateway.log",
        )  # fmt: skip
        log.close()
        wait_until("the gateway to answer", lambda: _answers(port), 20)
        time.sleep(1)
        before = _rss(gateway.pid)
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss(gateway.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        out = work / "copy.bin"
        started = time.monotonic()
        done = subprocess.run(
            ["atftp", "--get", "-r", "huge.bin", "-l", str(out), "--option",
             f"blksize {args.blksize}", "127.0.0.1", str(port)],
            capture_output=True, text=True, timeout=3600, check=False,
        )  # fmt: skip
        seconds = time.monotonic() - started
        stop.set()
        sampler.join()
        if done.returncode != 0 or out.stat().st_size != size:
            raise BenchError(f"the transfer failed: {done.stderr.strip()[-300:]}")
        out.unlink()
        growth = peak[0] - before
        print(
            f"{size / 1024**3:.2f} GiB at blksize {args.blksize} in {seconds:.1f} s"
            f" ({size / seconds / 1e6:.0f} MB/s): gateway RSS {before / 2**20:.1f} MiB before,"
            f" {peak[0] / 2**20:.1f} MiB at most; growth {growth / 2**20:.1f} MiB"
            f" (limit {args.limit_mib:g} MiB)"
        )
        return 0 if growth < args.limit_mib * 2**20 else 1
    except BenchError as exc:
        print(f"error: {exc}")
        return 1
    finally:
        if gateway is not None:
            stop_process(gateway)
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
