#!/usr/bin/env python3
"""TFTP reads: concurrent atftp clients -> (tftpd-hpa | gateway) -> a file on disk or on nginx.

Run from the repository as root (tftpd-hpa chroots), with the project's virtualenv:

    .venv/bin/python bench/tftp_read.py [--clients 20] [--size-mib 10] [--blksize 1468]
                                        [--runs 3] [--markdown]

Debian packages it needs (it installs nothing):

    apt-get install -y --no-install-recommends tftpd-hpa atftp nginx-light util-linux

Each target serves the same file of ``--size-mib`` MiB (random bytes, 777 bytes
past a whole MiB so that no block size divides it).  ``--clients`` atftp
processes fetch it at once with ``--option "blksize N"``, ``--runs`` times,
interleaved; the median is reported.  Targets:

* ``tftpd-hpa``: ``in.tftpd -L -s`` serving the file from disk (a child
  process per transfer);
* ``gateway-folder``: the gateway's tftp listener and a folder destination;
* ``gateway-http``: the gateway's tftp listener and an http destination: each
  transfer is a GET to an nginx origin, streamed (nginx's own CPU is shown
  apart).

Servers run on CPU 0 (``taskset``), the clients and this script on CPU 1; a
server's CPU time is CPU 0's busy time during the run, less nginx's own.
Every client's copy is compared with the file; a run whose copies differ or
whose clients fail is an error.  Every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    BenchError,
    cpu_busy,
    gateway_env,
    median,
    pin,
    proc_cpu,
    spawn_logged,
    stop_process,
    wait_for_quiet,
    wait_until,
)
from tests.peers import free_port
from tests.peers_web import Nginx

SERVER_CPU, LOAD_CPU = 0, 1


@dataclass
class Run:
    seconds: float
    server_cpu: float  # CPU 0's busy seconds less nginx's: the TFTP server's
    origin_cpu: float  # nginx's, for gateway-http


def _answers(port: int) -> bool:
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "--max-time", "1", f"tftp://127.0.0.1:{port}/.none"],
        check=False,
    )
    return done.returncode in (68, 69)  # an error packet: it answers


def _fetch_all(port: int, name: str, clients: int, blksize: int, out: Path, want: str) -> float:
    out.mkdir(exist_ok=True)
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                "taskset",
                "-c",
                str(LOAD_CPU),
                "atftp",
                "--get",
                "-r",
                name,
                "-l",
                str(out / f"{i}.bin"),
                "--option",
                f"blksize {blksize}",
                "127.0.0.1",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(clients)
    ]
    failed = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failed.append(err.decode(errors="replace").strip())
    seconds = time.monotonic() - started
    if failed:
        raise BenchError(f"{len(failed)} client(s) failed: {failed[0]}")
    for copy in out.iterdir():
        if hashlib.sha256(copy.read_bytes()).hexdigest() != want:
            raise BenchError(f"{copy} differs from the file served")
        copy.unlink()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size-mib", type=int, default=10)
    parser.add_argument("--blksize", type=int, default=1468)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    for program in ("in.tftpd", "atftp", "nginx", "taskset", "curl"):
        if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
            print(f"error: {program} is missing (see the docstring for the packages)")
            return 1
    work = Path(tempfile.mkdtemp(prefix="bench-tftp-"))
    work.chmod(0o755)
    root = work / "srv"
    root.mkdir(mode=0o755)
    data = os.urandom(args.size_mib * 1024 * 1024 + 777)
    want = hashlib.sha256(data).hexdigest()
    (root / "file.bin").write_bytes(data)
    (root / "file.bin").chmod(0o644)
    started: list[subprocess.Popen[bytes]] = []
    origin = Nginx(work / "nginx")
    try:
        origin.start()
        (origin.root / "web").mkdir()
        (origin.root / "web" / "file.bin").write_bytes(data)
        tftpd_port, gw_port, admin = free_port("udp"), free_port("udp"), free_port()
        tftpd = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CPU), "/usr/sbin/in.tftpd", "-L", "-a",
             f"127.0.0.1:{tftpd_port}", "-s", "-u", "tftp", "-B", "65464", str(root)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        started.append(tftpd)
        config = work / "routes.yaml"
        config.write_text(f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  boot: {{protocol: tftp, listen: "udp:{gw_port}:interface=127.0.0.1", max_transfers: 1000}}
destinations:
  disk: {{protocol: folder, path: "{root}"}}
  web: {{protocol: http, url: "{origin.url}/"}}
routes:
  - {{name: web, from: boot, match: {{name: '^web/'}}, to: web}}
  - {{name: disk, from: boot, to: disk}}
""")
        gateway, log = spawn_logged(
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            cwd=work, env=gateway_env(), log_path=work / "gateway.log",
        )  # fmt: skip
        log.close()
        started.append(gateway)
        wait_until("tftpd-hpa to answer", lambda: _answers(tftpd_port), 10)
        wait_until("the gateway to answer", lambda: _answers(gw_port), 20)
        pin(gateway.pid, SERVER_CPU)
        nginx_pid = int((origin.workdir / "nginx.pid").read_text())
        pin(nginx_pid, SERVER_CPU, with_children=True)
        os.sched_setaffinity(0, {LOAD_CPU})
        targets = {
            "tftpd-hpa": (tftpd_port, "file.bin"),
            "gateway-folder": (gw_port, "file.bin"),
            "gateway-http": (gw_port, "web/file.bin"),
        }
        runs: dict[str, list[Run]] = {name: [] for name in targets}
        for n in range(args.runs):
            for name, (port, path) in targets.items():
                wait_for_quiet([SERVER_CPU, LOAD_CPU], 20)
                busy_before = cpu_busy()[SERVER_CPU]
                origin_before = sum(proc_cpu(p)[0] for p in [nginx_pid, *_kids(nginx_pid)])
                seconds = _fetch_all(port, path, args.clients, args.blksize, work / "out", want)
                busy_after = cpu_busy()[SERVER_CPU]
                origin_after = sum(proc_cpu(p)[0] for p in [nginx_pid, *_kids(nginx_pid)])
                # CPU 0 runs the servers only: its busy time is theirs (tftpd's children
                # included); nginx's part is shown apart.
                origin_cpu = origin_after - origin_before
                cpu = busy_after - busy_before - origin_cpu
                runs[name].append(Run(seconds, cpu, origin_cpu))
                print(f"run {n + 1} {name}: {seconds:.2f} s, server CPU {cpu:.2f} s", flush=True)
        total = args.clients * len(data)
        rows = []
        base = median([r.seconds for r in runs["tftpd-hpa"]]) or 1.0
        for name, measured in runs.items():
            seconds = median([r.seconds for r in measured]) or 0.0
            cpu = median([r.server_cpu for r in measured]) or 0.0
            origin_cpu = median([r.origin_cpu for r in measured]) or 0.0
            rows.append((name, seconds, total / seconds / 1e6, cpu, origin_cpu, base / seconds))
        head = ("target", "seconds", "MB/s", "server CPU s", "nginx CPU s", "x tftpd-hpa")
        title = (
            f"{args.clients} clients x {args.size_mib} MiB at blksize {args.blksize},"
            f" median of {args.runs}"
        )
        print()
        print(title)
        if args.markdown:
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
            for r in rows:
                print(
                    f"| {r[0]} | {r[1]:.2f} | {r[2]:.0f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} |"
                )
        else:
            print(
                f"{head[0]:16} {head[1]:>8} {head[2]:>8} {head[3]:>13} {head[4]:>12} {head[5]:>12}"
            )
            for r in rows:
                print(f"{r[0]:16} {r[1]:13.2f} {r[2]:13.0f} {r[3]:13.2f} {r[4]:13.2f} {r[5]:13.2f}")
        return 0
    except BenchError as exc:
        print(f"error: {exc}")
        return 1
    finally:
        for proc in reversed(started):
            stop_process(proc)
        origin.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _kids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


if __name__ == "__main__":
    sys.exit(main())
