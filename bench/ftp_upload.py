#!/usr/bin/env python3
"""FTP uploads: curl (parallel transfers) -> (vsftpd | gateway) -> files on disk.

Run from the repository as root (vsftpd logs a system user in and chroots it), with the
project's virtualenv:

    .venv/bin/python bench/ftp_upload.py [--files 200] [--size-mib 1] [--parallel 20]
                                         [--runs 3] [--markdown]

Debian packages it needs (it installs nothing):

    apt-get install -y --no-install-recommends vsftpd curl util-linux

One curl uploads ``--files`` files of ``--size-mib`` MiB each (random bytes)
with ``-Z --parallel-max N`` (``--parallel 1``: one after another), ``--runs``
times per target, interleaved; the median is reported.  Targets:

* ``vsftpd``: writes each file into its folder (it does not flush it: no FTP
  server does before its 226);
* ``gateway``: the ftp listener writes each upload into the spool, flushes it
  to disk and stores it (SQLite commit) before its 226; a folder destination
  then copies it (flushed, renamed) into place.  The run ends when curl has
  its 226s; the deliveries go on in the background and are waited for (and
  checked) between runs, outside the time.

Servers run on CPU 0 (``taskset``), curl on CPU 1.  Every delivered file is
compared with what was sent; a run with a failed transfer or a wrong file is an
error.  Every process started is stopped at the end.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    BenchError,
    cpu_busy,
    gateway_env,
    median,
    pin,
    spawn_logged,
    stop_process,
    wait_for_quiet,
    wait_until,
)
from gateway.users import hash_password
from tests.peers import free_port, port_accepts
from tests.peers_files import Vsftpd

SERVER_CPU, LOAD_CPU = 0, 1


def _upload(url: str, source: Path, files: int, parallel: int) -> float:
    """One curl uploads the files: ``parallel`` at once, or one after another (1) over one
    control connection."""
    at_once = ["-Z", "--parallel-max", str(parallel)] if parallel > 1 else []
    started = time.monotonic()
    done = subprocess.run(
        ["taskset", "-c", str(LOAD_CPU), "curl", "-sS", *at_once,
         "-w", "%{response_code}\n", "-T", f"{source}/f[1-{files}].bin", url],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    # curl reports the last reply of each transfer: 226, or QUIT's 221 for the transfer
    # that ended a connection; its exit status says whether every one went through.
    codes = done.stdout.split()
    if done.returncode != 0 or len(codes) != files or set(codes) - {"226", "221"}:
        others = sorted({c for c in codes if c != "226"})
        raise BenchError(
            f"{url.rpartition('@')[2]}: curl status {done.returncode},"
            f" {codes.count('226')} of {files} got 226 (others: {others}; {done.stderr[-300:]})"
        )
    return seconds


def _check(folder: Path, want: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        present = {p.name for p in folder.iterdir() if p.suffix == ".bin"}
        if present >= set(want):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"{len(set(want) - present)} file(s) never arrived in {folder}")
        time.sleep(0.2)
    for name, digest in want.items():
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
            raise BenchError(f"{folder / name} differs from what was sent")
        (folder / name).unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--size-mib", type=int, default=1)
    parser.add_argument(
        "--parallel", type=int, default=20, help="transfers at once (1: one after another)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    for program in ("vsftpd", "curl", "taskset"):
        if shutil.which(program) is None:
            print(f"error: {program} is missing (see the docstring for the packages)")
            return 1
    if os.geteuid() != 0:
        print("error: run as root (vsftpd logs a system user in)")
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-ftp-"))
    work.chmod(0o755)
    source = work / "source"
    source.mkdir()
    want = {}
    for n in range(1, args.files + 1):
        data = os.urandom(args.size_mib * 1024 * 1024)
        (source / f"f{n}.bin").write_bytes(data)
        want[f"f{n}.bin"] = hashlib.sha256(data).hexdigest()
    started = []
    vsftpd = Vsftpd(work / "vsftpd")
    try:
        vsftpd.start()
        port, admin = free_port(), free_port()
        inbox = work / "inbox"
        config = work / "routes.yaml"
        config.write_text(f"""
version: 1
admin: tcp:{admin}:interface=127.0.0.1
listeners:
  drop:
    protocol: ftp
    listen: tcp:{port}:interface=127.0.0.1
    users: {{bench: '{hash_password("bench")}'}}
    passive_ports: 33000-33199
destinations:
  inbox: {{protocol: folder, path: "{inbox}", uploads: true}}
routes:
  - {{name: uploads, from: drop, to: inbox}}
""")
        gateway, log = spawn_logged(
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            cwd=work, env=gateway_env(), log_path=work / "gateway.log",
        )  # fmt: skip
        log.close()
        started.append(gateway)
        wait_until("the gateway to listen", lambda: port_accepts("127.0.0.1", port), 20)
        pin(gateway.pid, SERVER_CPU)
        assert vsftpd.proc is not None
        pin(vsftpd.proc.pid, SERVER_CPU, with_children=True)
        os.sched_setaffinity(0, {LOAD_CPU})
        targets = {
            "vsftpd": (vsftpd.url("incoming/"), vsftpd.incoming),
            "gateway": (f"ftp://bench:bench@127.0.0.1:{port}/", inbox),
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for n in range(args.runs):
            for name, (url, folder) in targets.items():
                wait_for_quiet([SERVER_CPU, LOAD_CPU], 20)
                before = cpu_busy()[SERVER_CPU]
                seconds = _upload(url, source, args.files, args.parallel)
                cpu = cpu_busy()[SERVER_CPU] - before
                _check(folder, want, 120)
                runs[name].append((seconds, cpu))
                print(f"run {n + 1} {name}: {seconds:.2f} s, server CPU {cpu:.2f} s", flush=True)
        total = args.files * args.size_mib * 1024 * 1024
        base = median([s for s, _ in runs["vsftpd"]]) or 1.0
        head = ("target", "seconds", "MB/s", "server CPU s", "x vsftpd")
        rows = []
        for name, measured in runs.items():
            seconds = median([s for s, _ in measured]) or 1.0
            cpu = median([c for _, c in measured]) or 0.0
            rows.append((name, seconds, total / seconds / 1e6, cpu, base / seconds))
        print()
        print(
            f"{args.files} files x {args.size_mib} MiB,"
            + (
                f" curl -Z --parallel-max {args.parallel},"
                if args.parallel > 1
                else " one curl, one after another,"
            )
            + f" median of {args.runs}"
        )
        if args.markdown:
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
            for r in rows:
                print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.0f} | {r[3]:.2f} | {r[4]:.2f} |")
        else:
            print(f"{head[0]:10} {head[1]:>8} {head[2]:>8} {head[3]:>13} {head[4]:>9}")
            for r in rows:
                print(f"{r[0]:10} {r[1]:8.2f} {r[2]:8.0f} {r[3]:13.2f} {r[4]:9.2f}")
        return 0
    except BenchError as exc:
        print(f"error: {exc}")
        return 1
    finally:
        for proc in reversed(started):
            stop_process(proc)
        vsftpd.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
