#!/usr/bin/env python3
"""HTTP reverse proxy throughput: wrk -> (nginx | gateway | twisted.web) proxy -> nginx origin.

Run from the repository, with the project's virtualenv (it imports tests/peers_web.py):

    .venv/bin/python bench/http_proxy.py [--seconds 15] [--runs 2] [--markdown]

Debian packages it needs (it installs nothing):

    apt-get install -y --no-install-recommends nginx-light wrk util-linux

One nginx origin serves a 1 KiB file; every proxy forwards to that same
origin.  Each target gets ``wrk -t1 -c64 -dSECONDS`` on the file, ``--runs``
times, interleaved, and the median is reported.  The servers run on CPU 0
(``taskset -c 0``: the origin, and the proxy under test beside it), wrk and this
script on CPU 1.  Before each run the script waits (up to ``--quiet-wait``
seconds) for both CPUs to be idle, since other programs on a shared machine
would take CPU from the proxy.  Targets:

* ``nginx``: straight to the origin (the ceiling);
* ``nginx-proxy``: nginx as a reverse proxy (keepalive 128 to the origin);
* ``gateway``: the gateway's http listener and http destination, one route;
* ``twisted``: ``twisted.web.proxy.ReverseProxyResource`` (bench/_twisted_proxy.py);
* ``gateway-routes``: the gateway with 500 routes (prefix and host routes no
  request matches) in front of the catch-all.

Every server binds 127.0.0.1 on a free port, all state lives in one temporary
folder, and every process started here is stopped at the end, also on Ctrl-C,
SIGTERM or an error.  See bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Python put this file's folder first on the path, where this file's name would hide the
# standard library's "http" package: import from the repository's root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
sys.path.insert(0, str(REPO_ROOT))

from bench._common import (  # noqa: E402
    BenchError,
    Interrupted,
    children,
    cpu_busy,
    fixture_errors,
    fmt,
    locate_program,
    median,
    pin,
    proc_cpu,
    progress,
    render,
    signals_interrupt,
    wait_for_quiet,
)
from tests.peers import GatewayProcess, free_port, port_accepts  # noqa: E402
from tests.peers_web import Nginx  # noqa: E402

LOOPBACK = "127.0.0.1"
ROUTES = 500
PACKAGES = {"wrk": "wrk", "nginx": "nginx-light", "taskset": "util-linux"}
LABELS = {
    "nginx": "nginx origin directly",
    "nginx-proxy": "nginx reverse proxy -> origin",
    "gateway": "gateway -> origin, 1 route",
    "twisted": "twisted.web ReverseProxyResource -> origin",
    "gateway-routes": f"gateway -> origin, {ROUTES} routes",
}
DEFAULT_ONLY = "nginx,nginx-proxy,gateway,twisted,gateway-routes"


def find_program(name: str) -> str:
    return locate_program(name, PACKAGES)


# --------------------------------------------------------------------------- servers


class Target:
    key = ""
    port = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        return sum(sum(proc_cpu(p)) for p in self.pids())


class NginxTarget(Target):
    def __init__(self, key: str, workdir: Path, cpu: int, upstream: int | None = None) -> None:
        self.key = key
        self.server = Nginx(
            workdir / key, upstreams=[upstream] if upstream else None, access_log=False
        )
        self.cpu = cpu

    def start(self) -> None:
        with fixture_errors(LABELS[self.key]):
            self.server.start()
        self.port = self.server.port
        pin(self.server.pid, self.cpu, with_children=True)  # nginx's workers too

    def stop(self) -> None:
        self.server.stop()

    def pids(self) -> list[int]:
        if self.server.proc is None:
            return []
        return [self.server.pid, *children(self.server.pid)]


GATEWAY_CONFIG = """# bench/http_proxy.py: the gateway as a reverse proxy{note}
version: 1
spool: {dir}/spool
listeners:
  web:
    protocol: http
    listen: tcp:{port}:interface={host}
    max_connections: 10000
destinations:
  origin:
    protocol: http
    url: http://{host}:{upstream}
    keepalive: 128
routes:
{routes}  - name: everything
    from: web
    to: origin
"""


def gateway_config(directory: Path, port: int, upstream: int, routes: int) -> str:
    # Routes no request matches, before the catch-all: the cost of a big routing table.
    extra = []
    for i in range(routes):
        host = i % 5 == 4
        match = f"{{host: [site{i}.bench.test]}}" if host else f"{{prefix: /service{i}/}}"
        extra.append(f"  - {{name: r{i}, from: web, match: {match}, to: origin}}\n")
    return GATEWAY_CONFIG.format(
        note=f", {routes} routes first" if routes else "",
        dir=directory,
        port=port,
        host=LOOPBACK,
        upstream=upstream,
        routes="".join(extra),
    )


class ProcessTarget(Target):
    """A Python program on the server CPU: the gateway or the twisted.web proxy."""

    def __init__(
        self, key: str, directory: Path, argv: list[str], config: str, cpu: int, upstream: int
    ) -> None:
        self.key = key
        self.dir = directory
        self.argv = argv
        self.config = config
        self.cpu = cpu
        self.upstream = upstream
        self.proc: GatewayProcess | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        path = self.dir / "routes.yaml"
        if self.config:
            path.write_text(
                gateway_config(self.dir, self.port, self.upstream, int(self.config))
                if self.config.isdigit()
                else self.config
            )
        argv = [
            "taskset", "-c", str(self.cpu),
            *(a.format(port=self.port, config=path, upstream=self.upstream) for a in self.argv),
        ]  # fmt: skip
        self.proc = GatewayProcess(path, argv=argv, cwd=self.dir)
        with fixture_errors(LABELS[self.key]):
            self.proc.start(self.port, timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=15)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.is_running() else []

    def log_tail(self, lines: int = 15) -> str:
        if self.proc is None:
            return ""
        return "\n".join(self.proc.log_text().splitlines()[-lines:])


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    key: str
    rps: float | None = None
    requests: int = 0
    errors: int = 0
    non_2xx: int = 0
    latency_ms: float | None = None
    target_cpu: float = 0.0
    other_cpu: float = 0.0
    wall: float = 0.0
    waited: float = 0.0
    failure: str = ""

    @property
    def cpu_us_per_request(self) -> float | None:
        return 1e6 * self.target_cpu / self.requests if self.requests else None


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def measure(target: Target, origin: Target, args: argparse.Namespace, path: str = "/file") -> Run:
    run = Run(target.key)
    run.waited = wait_for_quiet((args.server_cpu, args.load_cpu), args.quiet_wait)
    argv = [
        "taskset", "-c", str(args.load_cpu), find_program("wrk"),
        "-t1", f"-c{args.connections}", f"-d{args.seconds:g}s",
        f"http://{LOOPBACK}:{target.port}{path}",
    ]  # fmt: skip
    ours = {id(target): target, id(origin): origin}.values()
    busy = cpu_busy()
    before_target = target.cpu_seconds()
    before_ours = sum(t.cpu_seconds() for t in ours)
    started = time.monotonic()
    try:
        result = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=args.seconds + 60
        )
    except subprocess.TimeoutExpired:
        run.failure = "wrk did not finish in time"
        return run
    run.wall = time.monotonic() - started
    run.target_cpu = target.cpu_seconds() - before_target
    ours_cpu = sum(t.cpu_seconds() for t in ours) - before_ours
    after = cpu_busy()
    run.other_cpu = max(0.0, after[args.server_cpu] - busy[args.server_cpu] - ours_cpu)
    text = result.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if result.returncode != 0 or found is None or total is None:
        run.failure = f"wrk failed (status {result.returncode}): {(text + result.stderr)[-300:]}"
        return run
    run.rps = float(found.group(1))
    run.requests = int(total.group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    run.non_2xx = int(non_2xx.group(1)) if non_2xx else 0
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    run.errors = sum(int(g) for g in errors.groups()) if errors else 0
    latency = re.search(r"Latency\s+([\d.]+)(us|ms|s)", text)
    if latency:
        run.latency_ms = float(latency.group(1)) * _UNITS[latency.group(2)]
    if run.non_2xx or run.errors > run.requests // 100:
        run.failure = f"{run.non_2xx} non-2xx answers, {run.errors} socket errors"
    return run


def describe(i: int, runs: int, run: Run) -> str:
    text = f"run {i}/{runs} {run.key}: "
    if run.rps is not None:
        text += f"{run.rps:,.0f} requests/s"
    cpu = run.cpu_us_per_request
    if cpu is not None:
        text += f"; {cpu:.1f} us CPU/request (target)"
    if run.latency_ms is not None:
        text += f"; mean latency {run.latency_ms:.2f} ms"
    if run.waited > 2:
        text += f"; waited {run.waited:.0f} s for idle CPUs"
    if run.wall:
        text += f"; others took {100 * run.other_cpu / run.wall:.0f}% of CPU {0}"
    if run.failure:
        text += f"; FAILED: {run.failure}"
    return text


HEADER = ["target (on CPU 0)", "requests/s (median)", "each run", "target CPU us/request",
          "mean latency ms"]  # fmt: skip


def rows(results: dict[str, list[Run]]) -> list[list[str]]:
    out = []
    for key, runs in results.items():
        good = [r for r in runs if not r.failure]
        out.append(
            [
                LABELS[key],
                fmt(median([r.rps for r in good])),
                ", ".join(fmt(r.rps) if not r.failure else "failed" for r in runs),
                fmt(median([r.cpu_us_per_request for r in good]), ".1f"),
                fmt(median([r.latency_ms for r in good]), ".2f"),
            ]
        )
    return out


def target_lines(results: dict[str, list[Run]]) -> list[str]:
    def rps(key: str) -> float | None:
        return median([r.rps for r in results.get(key, []) if not r.failure])

    lines = []
    for top, bottom, what, goal in [
        ("gateway", "twisted", "gateway / minimal twisted.web proxy", 1.5),
        ("gateway", "nginx-proxy", "gateway / nginx reverse proxy", 0.2),
        ("gateway-routes", "gateway", f"{ROUTES} routes / 1 route", 0.9),
    ]:
        a, b = rps(top), rps(bottom)
        if a is None or not b:
            continue
        verdict = "met" if a / b >= goal else "MISSED"
        lines.append(f"{what}: {a / b:.3f} (target >= {goal:g}): {verdict}")
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=15, help="wrk -d per run (%(default)s)")
    p.add_argument("--runs", type=int, default=2, help="runs per target; the median is reported")
    p.add_argument("--connections", type=int, default=64, help="wrk -c (%(default)s)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--only", default=DEFAULT_ONLY, help="targets, comma-separated (%(default)s)")
    p.add_argument("--server-cpu", type=int, default=0, help="CPU of the servers (%(default)s)")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU of wrk (%(default)s)")
    p.add_argument(
        "--quiet-wait", type=float, default=30,
        help="seconds to wait for idle CPUs before each run (%(default)s)",
    )  # fmt: skip
    p.add_argument("--python", default=sys.executable, help="interpreter of the gateway")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in LABELS]
    if unknown:
        progress(f"error: unknown target(s) {', '.join(unknown)}; known: {', '.join(LABELS)}")
        return 2
    if {args.server_cpu, args.load_cpu} - os.sched_getaffinity(0):
        progress("error: --server-cpu and --load-cpu must be CPUs this process may use")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-"))
    started: list[Target] = []
    try:
        with signals_interrupt():
            find_program("wrk")
            find_program("taskset")
            origin = NginxTarget("nginx", workdir, args.server_cpu)
            origin.start()
            started.append(origin)
            targets: dict[str, Target] = {"nginx": origin}
            gateway_argv = [args.python, "-m", "gateway", "run", "-c", "{config}"]
            twisted_argv = [
                args.python, str(REPO_ROOT / "bench" / "_twisted_proxy.py"), "{port}", "{upstream}"
            ]  # fmt: skip
            cpu, up = args.server_cpu, origin.port
            makers = {
                "nginx-proxy": lambda: NginxTarget("nginx-proxy", workdir, cpu, up),
                "gateway": lambda: ProcessTarget(
                    "gateway", workdir / "gateway", gateway_argv, "0", cpu, up
                ),
                "twisted": lambda: ProcessTarget(
                    "twisted", workdir / "twisted", twisted_argv, "", cpu, up
                ),
                "gateway-routes": lambda: ProcessTarget(
                    "gateway-routes", workdir / "gateway-routes", gateway_argv, str(ROUTES), cpu, up
                ),
            }
            for key in keys:
                if key not in targets:
                    target = makers[key]()
                    progress(f"starting {LABELS[key]}")
                    target.start()
                    started.append(target)
                    targets[key] = target
            for key in keys:
                if not port_accepts(LOOPBACK, targets[key].port):
                    raise BenchError(f"{LABELS[key]} does not accept connections")
            results: dict[str, list[Run]] = {key: [] for key in keys}
            for i in range(1, args.runs + 1):
                for key in keys:
                    run = measure(targets[key], origin, args)
                    results[key].append(run)
                    progress(describe(i, args.runs, run))
    except (BenchError, KeyboardInterrupt, Interrupted) as exc:
        progress(f"error: {exc}" if isinstance(exc, BenchError) else "interrupted")
        return 1
    finally:
        for target in reversed(started):
            with contextlib.suppress(Exception):
                target.stop()
        if args.keep:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(
        f"wrk -t1 -c{args.connections} -d{args.seconds:g}s on a 1 KiB file, {args.runs} run(s)"
        f" each, servers on CPU {args.server_cpu}, wrk on CPU {args.load_cpu}:"
    )
    print()
    for line in render(HEADER, rows(results), args.markdown):
        print(line)
    print()
    for line in target_lines(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
