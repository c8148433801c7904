#!/usr/bin/env python3
"""DNS forwarding throughput and latency: dnsperf -> unbound, dnsdist, the gateway, twisted.names.

Run from the repository, with the project's virtualenv (it imports tests/peers.py):

    .venv/bin/python bench/dns_forwarding.py [--seconds 10] [--runs 2] [--markdown] [--pypy PYTHON]

Debian packages it needs (it installs nothing):

    apt-get install -y --no-install-recommends unbound dnsdist dnsperf util-linux

One unbound answers a static zone of a few hundred names; every forwarder asks
that same unbound. Each target is measured with the same dnsperf command and
the same query file, ``--runs`` times, interleaved, and the median is
reported. The target runs on CPU 0, dnsperf and this script on CPU 1; unbound,
the forwarders' upstream, on CPU 0 beside the forwarder (``--layout shared``,
the default) or on CPU 1 beside dnsperf (``--layout split``: the target has
CPU 0 to itself; unbound moves to CPU 0 while it is the target). ``--compare
DIR`` adds the gateway of another copy of the repository, for A/B runs. Then dnsperf ``-Q``
runs at half the gateway's peak rate, against the gateway and against unbound
directly, and compares their latency percentiles. Every server binds
127.0.0.1 on a free port, all state lives in one temporary folder, and every
process started here is stopped at the end, also on Ctrl-C, SIGTERM or an
error. See bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Python put this file's folder first on the path, where this file's own name would hide
# dnspython's "dns" package from tests/peers.py: import from the repository's root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
sys.path.insert(0, str(REPO_ROOT))

from bench._common import (  # noqa: E402
    BenchError,
    add_quiet_options,
    cpu_busy,
    find_py_spy,
    fixture_errors,
    fmt,
    interruptible,
    keep_or_remove,
    locate_program,
    median,
    own_cpu,
    pin,
    proc_cpu,
    progress,
    render,
    repeat_while_disturbed,
    stop_all,
    stop_process,
    summarize_raw,
    under_py_spy,
    wait_for_quiet,
)
from tests.peers import Dnsdist, GatewayProcess, Unbound, dns_probe, free_udp_tcp_port  # noqa: E402

LOOPBACK = "127.0.0.1"
ZONE = "bench.test."
NAMES = 500  # distinct names in the query file; dnsperf loops over them, so a cache hits
ROUTES = 1000  # suffix routes in front of the catch-all in the "gateway-routes" target
PACKAGES = {"dnsperf": "dnsperf", "taskset": "util-linux", "unbound": "unbound"}

LABELS = {
    "unbound": "unbound directly",
    "dnsdist": "dnsdist -> unbound, no cache",
    "dnsdist-cache": "dnsdist -> unbound, packet cache",
    "gateway": "gateway -> unbound, cache off",
    "gateway-cache": "gateway -> unbound, cache on",
    "twisted": "twisted.names forwarder -> unbound",
    "relay": "bare Twisted UDP relay -> unbound (floor)",
    "gateway-routes": f"gateway, {ROUTES:,} suffix routes + catch-all, cache off",
    "gateway-pypy": "gateway on PyPy -> unbound, cache off",
    "twisted-pypy": "twisted.names forwarder on PyPy -> unbound",
    "gateway-compare": "gateway of --compare DIR -> unbound, cache off",
}
DEFAULT_ONLY = (
    "unbound,dnsdist,dnsdist-cache,gateway,gateway-cache,twisted,relay,gateway-routes,latency"
)


# --------------------------------------------------------------------------- helpers


def find_program(name: str) -> str:
    return locate_program(name, PACKAGES)


def records() -> list[str]:
    """Unbound's zone: www0..wwwN and hostN A records, from 192.0.2.0/24 (data only)."""
    out = []
    for i in range(NAMES):
        kind = "www" if i % 2 == 0 else "host"
        out.append(f"{kind}{i}.{ZONE} 300 IN A 192.0.2.{i % 250 + 1}")
    return out


def write_queries(path: Path) -> None:
    """dnsperf's input: each name of the zone once, A; dnsperf loops over the file."""
    lines = [f"{r.split()[0].rstrip('.')} A\n" for r in records()]
    path.write_text("".join(lines))


# --------------------------------------------------------------------------- servers


class Server:
    """A DNS server under test: its port and the processes whose CPU is its own."""

    key = ""
    port = 0
    cpu = 0  # the CPU its processes are pinned to now

    def start(self) -> None:
        """Start, pin to its CPU and wait until it answers over UDP."""

    def stop(self) -> None:
        """Stop every process started; safe to call more than once."""

    def pids(self) -> list[int]:
        return []

    def cpu_seconds(self) -> float:
        return sum(sum(proc_cpu(pid)) for pid in self.pids())

    def move(self, cpu: int) -> None:
        """Pin every thread of every process of this server to `cpu`."""
        for pid in self.pids():
            pin(pid, cpu)
        self.cpu = cpu


class UnboundServer(Server):
    key = "unbound"

    def __init__(self, workdir: Path, cpu: int) -> None:
        # No query log and no verbosity: unbound's speed, not its logging's.
        self.unbound = Unbound(
            workdir / "unbound",
            records=records(),
            zones=(ZONE,),
            extra_config="log-queries: no\nverbosity: 0\n",
        )
        self.cpu = cpu

    def start(self) -> None:
        with fixture_errors("unbound"):
            self.unbound.start()
        assert self.unbound.proc is not None
        pin(self.unbound.proc.pid, self.cpu)
        self.port = self.unbound.port

    def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            self.unbound.stop()

    def pids(self) -> list[int]:
        proc = self.unbound.proc
        return [proc.pid] if proc is not None and proc.poll() is None else []


class DnsdistServer(Server):
    def __init__(self, workdir: Path, upstream: int, cpu: int, *, cache: bool) -> None:
        self.key = "dnsdist-cache" if cache else "dnsdist"
        self.dnsdist = Dnsdist(workdir / self.key, upstreams=[upstream], cache=cache)
        self.cpu = cpu

    def start(self) -> None:
        with fixture_errors("dnsdist"):
            self.dnsdist.start()
        assert self.dnsdist.proc is not None
        pin(self.dnsdist.proc.pid, self.cpu)
        self.port = self.dnsdist.dns_port

    def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            self.dnsdist.stop()

    def pids(self) -> list[int]:
        proc = self.dnsdist.proc
        return [proc.pid] if proc is not None and proc.poll() is None else []


GATEWAY_CONFIG = """\
# bench/dns_forwarding.py: forward everything to unbound{note}.
version: 1
listeners:
  dns-in:
    protocol: dns
    listen: ["udp:{port}:interface={host}", "tcp:{port}:interface={host}"]
destinations:
  unbound:
    protocol: dns
    servers: ["{host}:{upstream}"]
    timeout: 2s
routes:
{routes}  - name: everything
    from: dns-in
    to: unbound
    cache: {cache}
"""


def gateway_config(port: int, upstream: int, *, cache: bool, routes: int) -> str:
    # Suffix routes no query matches, before the catch-all: the cost of a big routing table.
    extra = "".join(
        f"  - {{name: zone{i}, from: dns-in, match: {{qname: '*.zone{i}.test'}}, "
        f"to: unbound, cache: false}}\n"
        for i in range(routes)
    )
    return GATEWAY_CONFIG.format(
        note=f", {routes} suffix routes first" if routes else "",
        port=port,
        host=LOOPBACK,
        upstream=upstream,
        routes=extra,
        cache="true" if cache else "false",
    )


class ProcessServer(Server):
    """A Python program on the server CPU: the gateway or the twisted.names forwarder."""

    def __init__(
        self,
        key: str,
        directory: Path,
        argv: list[str],
        config: Callable[[int], str] = lambda port: "",
        *,
        cpu: int,
    ) -> None:
        self.key = key
        self.cpu = cpu
        self.dir = directory
        self.argv = argv
        self.config = config
        self.proc: GatewayProcess | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        config_path = self.dir / "routes.yaml"
        self.port = free_udp_tcp_port()
        argv = [part.format(port=self.port, config=config_path) for part in self.argv]
        config_path.write_text(self.config(self.port))
        self.proc = GatewayProcess(config_path, argv=argv, cwd=self.dir)
        with fixture_errors(LABELS.get(self.key, self.key)):
            self.proc.start(self.port, timeout=30)
        deadline = time.monotonic() + 10
        while not dns_probe(self.port):
            if time.monotonic() > deadline or not self.proc.is_running():
                self.stop()
                raise BenchError(f"{self.key} does not answer over UDP:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        if self.proc is None:
            return ""
        return "\n".join(self.proc.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=15)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.is_running() else []


def gateway_server(
    key: str,
    workdir: Path,
    python: str,
    upstream: int,
    cpu: int,
    *,
    cache: bool,
    routes: int = 0,
    source: Path | None = None,
) -> ProcessServer:
    """The gateway of this checkout, or (``source``) of another copy of the repository."""

    def config(port: int) -> str:
        return gateway_config(port, upstream, cache=cache, routes=routes)

    if source is None:
        command = ["-m", "gateway"]
    else:
        # GatewayProcess puts this checkout first on PYTHONPATH; the other copy goes before it.
        command = [
            "-c",
            f"import runpy, sys; sys.path.insert(0, {str(source)!r}); "
            "runpy.run_module('gateway', run_name='__main__', alter_sys=True)",
        ]
    argv = ["taskset", "-c", str(cpu), python, *command, "run", "-c", "{config}"]
    return ProcessServer(key, workdir / key, argv, config, cpu=cpu)


def script_server(
    key: str, script: str, workdir: Path, python: str, upstream: int, cpu: int
) -> ProcessServer:
    """A forwarder in one of bench/'s scripts, run as ``SCRIPT PORT UPSTREAM_PORT``."""
    path = str(REPO_ROOT / "bench" / script)
    argv = ["taskset", "-c", str(cpu), python, path, "{port}", str(upstream)]
    return ProcessServer(key, workdir / key, argv, cpu=cpu)


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    key: str
    qps: float | None = None
    sent: int = 0
    completed: int = 0
    lost: int = 0
    noerror: int = 0
    server_cpu: float = 0.0  # the target's own processes (not unbound behind a forwarder)
    other_cpu: float = 0.0  # anything on the server CPU not started here
    server_cpu_busy: float = 0.0  # everything on the server CPU, seconds
    load_cpu: float = 0.0  # everything on the load CPU
    load_own_cpu: float = 0.0  # dnsperf and this script
    wall: float = 1e-9
    waited: float = 0.0
    failure: str = ""
    latencies: list[float] = field(default_factory=list)  # seconds, -v runs only

    @property
    def disturbance(self) -> float:
        """The larger share of a CPU that other programs took during the run."""
        load_other = max(0.0, self.load_cpu - self.load_own_cpu)
        return max(self.other_cpu, load_other) / self.wall

    @property
    def cpu_us_per_query(self) -> float | None:
        return 1e6 * self.server_cpu / self.completed if self.completed else None

    def percentile(self, p: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        # Nearest rank: the smallest value with at least p% of the values at or below it.
        rank = max(1, -(-len(ordered) * p // 100))
        return ordered[int(rank) - 1]


@dataclass(frozen=True)
class Load:
    seconds: float
    outstanding: int
    server_cpu: int
    load_cpu: int
    quiet_wait: float


_STAT = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "noerror": re.compile(r"NOERROR (\d+)"),
}
_VERBOSE = re.compile(rb"^> (\S+) \S+ \S+ ([\d.]+)$", re.MULTILINE)


def measure(
    target: Server,
    everyone: Sequence[Server],
    load: Load,
    queries: Path,
    workdir: Path,
    *,
    rate: int | None = None,
) -> Run:
    """One dnsperf run against `target`; with `rate`, at that fixed rate and with latencies."""
    run = Run(target.key)
    argv = [
        "taskset", "-c", str(load.load_cpu), find_program("dnsperf"),
        "-s", LOOPBACK, "-p", str(target.port), "-d", str(queries),
        "-l", f"{load.seconds:g}", "-c", "1", "-T", "1", "-q", str(load.outstanding),
    ]  # fmt: skip
    if rate is not None:
        argv += ["-Q", str(rate), "-v"]
    run.waited = wait_for_quiet((load.server_cpu, load.load_cpu), load.quiet_wait)
    # The target runs on the server CPU; with --layout split, unbound lives on the load CPU
    # as everyone's upstream and moves over only while it is the target itself.
    home = target.cpu
    if home != load.server_cpu:
        target.move(load.server_cpu)
    try:
        measure_on_cpu(run, target, everyone, load, argv, queries, workdir, rate)
    finally:
        if target.cpu != home:
            target.move(home)
    return run


def measure_on_cpu(
    run: Run,
    target: Server,
    everyone: Sequence[Server],
    load: Load,
    argv: list[str],
    queries: Path,
    workdir: Path,
    rate: int | None,
) -> None:
    def ours(cpu: int) -> float:
        return sum(s.cpu_seconds() for s in everyone if s.cpu == cpu)

    out_path = workdir / f"dnsperf-{target.key}.out"
    busy_before = cpu_busy()
    ours_before = ours(load.server_cpu)
    ours_load_before = ours(load.load_cpu)
    target_before = target.cpu_seconds()
    load_before = own_cpu()
    t0 = time.monotonic()
    with out_path.open("w+b") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(load.seconds + 30)
        except subprocess.TimeoutExpired:
            run.failure = "dnsperf did not finish in time"
        finally:
            stop_process(proc, timeout=5)
        run.wall = time.monotonic() - t0
        busy_after = cpu_busy()
        run.server_cpu = target.cpu_seconds() - target_before
        ours_server = ours(load.server_cpu) - ours_before
        # dnsperf, this script, and unbound when it sits on the load CPU (--layout split).
        run.load_own_cpu = own_cpu() - load_before + ours(load.load_cpu) - ours_load_before
        out.seek(0)
        text = out.read()
    run.server_cpu_busy = busy_after[load.server_cpu] - busy_before[load.server_cpu]
    run.other_cpu = max(0.0, run.server_cpu_busy - ours_server)
    run.load_cpu = busy_after[load.load_cpu] - busy_before[load.load_cpu]
    summary = text[text.rfind(b"Statistics:") :].decode("utf-8", "replace")
    for name, pattern in _STAT.items():
        found = pattern.search(summary)
        if found is not None:
            setattr(run, name, float(found.group(1)) if name == "qps" else int(found.group(1)))
    if rate is not None:
        run.latencies = [float(m.group(2)) for m in _VERBOSE.finditer(text) if m.group(1) != b"T"]
    if not run.failure and proc.returncode != 0:
        run.failure = f"dnsperf exited with status {proc.returncode}: {text[-300:]!r}"
    elif not run.failure and run.qps is None:
        run.failure = f"no statistics from dnsperf: {text[-300:]!r}"
    elif not run.failure and run.completed and run.noerror < 0.99 * run.completed:
        run.failure = f"only {run.noerror} of {run.completed} answers were NOERROR"


def describe(i: int, runs: int, run: Run) -> str:
    text = f"run {i}/{runs} {run.key}: "
    if run.qps is not None:
        text += f"{run.qps:,.0f} qps, {run.lost} lost of {run.sent}"
    cpu = run.cpu_us_per_query
    if cpu is not None:
        text += f"; {cpu:.1f} us CPU/query"
    p99 = run.percentile(99)
    if p99 is not None:
        text += f"; p50 {1e3 * (run.percentile(50) or 0):.3f} ms, p99 {1e3 * p99:.3f} ms"
    if run.waited > 2:
        text += f"; waited {run.waited:.0f} s for idle CPUs"
    text += f"; others took {100 * run.disturbance:.0f}% of a CPU"
    if run.failure:
        text += f"; FAILED: {run.failure}"
    return text


def measure_stable(
    target: Server,
    everyone: Sequence[Server],
    load: Load,
    queries: Path,
    workdir: Path,
    args: argparse.Namespace,
    i: int,
    *,
    rate: int | None = None,
) -> Run:
    """measure(), repeated (up to --retries times) while other programs disturb it."""

    def once(attempt: int) -> Run:
        run = measure(target, everyone, load, queries, workdir, rate=rate)
        progress(describe(i + 1, args.runs, run))
        return run

    return repeat_while_disturbed(
        once, retries=args.retries, disturbed=args.disturbed, again="measuring again"
    )


# --------------------------------------------------------------------------- report


def throughput_rows(results: dict[str, list[Run]], disturbed: float) -> list[list[str]]:
    rows = []
    for key, runs in results.items():
        good = [r for r in runs if not r.failure]
        lost = sum(r.lost for r in good)
        sent = sum(r.sent for r in good)
        rows.append(
            [
                LABELS[key],
                fmt(median([r.qps for r in good])),
                ", ".join(
                    ("failed" if r.failure else fmt(r.qps))
                    + ("*" if r.disturbance > disturbed else "")
                    for r in runs
                ),
                fmt(100 * lost / sent if sent else None, ".2f") + "%",
                fmt(median([r.cpu_us_per_query for r in good]), ".1f"),
                fmt(median([100 * r.disturbance for r in good]), ".0f") + "%",
            ]
        )
    return rows


THROUGHPUT_HEADER = [
    "target (on CPU 0)",
    "qps (median)",
    "qps, each run",
    "lost",
    "target CPU us/query",
    "CPU taken by others",
]
LATENCY_HEADER = [
    "target",
    "rate (qps)",
    "target CPU us/query",
    "server CPU busy",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "lost",
]


def latency_rows(latency: dict[int, dict[str, list[Run]]]) -> list[list[str]]:
    rows = []
    for rate, results in latency.items():
        for key, runs in results.items():
            good = [r for r in runs if not r.failure and r.latencies]

            def ms(p: float, good: list[Run] = good) -> str:
                return fmt(median([1e3 * (r.percentile(p) or 0) for r in good]), ".3f")

            lost = sum(r.lost for r in good)
            sent = sum(r.sent for r in good)
            busy = median([100 * r.server_cpu_busy / r.wall for r in good])
            rows.append(
                [
                    LABELS[key],
                    f"{rate:,}",
                    fmt(median([r.cpu_us_per_query for r in good]), ".1f"),
                    fmt(busy, ".0f") + "%",
                    ms(50),
                    ms(90),
                    ms(99),
                    ms(99.9),
                    ms(100),
                    fmt(100 * lost / sent if sent else None, ".2f") + "%",
                ]
            )
    return rows


def target_lines(
    results: dict[str, list[Run]], latency: dict[str, list[Run]], rate: int
) -> list[str]:
    def qps(key: str) -> float | None:
        runs = [r for r in results.get(key, []) if not r.failure]
        return median([r.qps for r in runs])

    def p99(key: str) -> float | None:
        runs = [r for r in latency.get(key, []) if not r.failure and r.latencies]
        return median([r.percentile(99) for r in runs])

    lines = []
    checks: list[tuple[str, str, str, float]] = [
        ("gateway", "dnsdist", "gateway forwarding / dnsdist no cache", 0.3),
        ("gateway", "twisted", "gateway forwarding / minimal twisted.names (CPython)", 6.0),
        ("gateway-cache", "dnsdist-cache", "gateway cache hits / dnsdist packet cache", 0.25),
        ("gateway-routes", "gateway", f"{ROUTES:,} routes / 1 route", 0.9),
        ("gateway-pypy", "twisted-pypy", "gateway / minimal twisted.names (PyPy)", 6.0),
    ]
    for top, bottom, what, goal in checks:
        a, b = qps(top), qps(bottom)
        if a is None or b is None or not b:
            continue
        ratio = a / b
        verdict = "met" if ratio >= goal else "MISSED"
        lines.append(f"{what}: {ratio:.3f} (target >= {goal:g}): {verdict}")
    gw, direct, relay = p99("gateway"), p99("unbound"), p99("relay")
    if gw is not None and direct is not None:
        added = 1e3 * (gw - direct)
        verdict = "met" if added <= 1.0 else "MISSED"
        lines.append(
            f"added p99 latency at {rate:,} qps, gateway vs unbound directly: {added:.3f} ms "
            f"(target <= 1 ms at half the gateway's peak): {verdict}"
        )
    # Not targets: an A/B against another copy, and how much is any Twisted forwarder's.
    compare = qps("gateway-compare")
    if compare and qps("gateway") is not None:
        lines.append(f"gateway / gateway of --compare DIR: {(qps('gateway') or 0) / compare:.3f}")
    other = p99("gateway-compare")
    if other is not None and gw is not None:
        lines.append(
            f"p99 at {rate:,} qps, gateway / gateway of --compare DIR: "
            f"{1e3 * gw:.3f} / {1e3 * other:.3f} ms"
        )
    floor, gateway = qps("relay"), qps("gateway")
    if floor and gateway is not None:
        lines.append(f"gateway forwarding / bare Twisted UDP relay: {gateway / floor:.2f}")
    if relay is not None and direct is not None:
        lines.append(
            f"added p99 latency at the same rate, bare Twisted UDP relay vs unbound directly: "
            f"{1e3 * (relay - direct):.3f} ms"
        )
    return lines


# --------------------------------------------------------------------------- profile


def profile(
    target: ProcessServer,
    everyone: Sequence[Server],
    load: Load,
    queries: Path,
    workdir: Path,
    out: Path,
) -> str:
    """One more run of `target` under py-spy (not counted); a summary of the top costs."""
    py_spy = find_py_spy()
    pids = target.pids()
    if py_spy is None or not pids:
        return "profile: py-spy is not installed (pip install py-spy); no profile taken"
    raw = out.with_suffix(".raw.txt")
    run = under_py_spy(
        py_spy, pids[0], lambda: measure(target, everyone, load, queries, workdir),
        cpu=load.load_cpu, raw=raw, log_path=workdir / "py-spy.log",
    )  # fmt: skip
    out.write_text(summarize_raw(raw))
    return f"profile of {target.key} ({fmt(run.qps)} qps under py-spy, not counted): {out}, {raw}"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10, help="dnsperf -l per run (%(default)s)")
    p.add_argument("--runs", type=int, default=2, help="runs per target; the median is reported")
    p.add_argument("--outstanding", type=int, default=100, help="dnsperf -q (%(default)s)")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument(
        "--only", default=DEFAULT_ONLY,
        help="targets to measure, and 'latency' for the -Q runs (%(default)s; "
        "also gateway-pypy,twisted-pypy, which need --pypy)",
    )  # fmt: skip
    p.add_argument(
        "--pypy", metavar="PYTHON",
        help="a PyPy virtualenv's python with Twisted, PyYAML and dnspython: "
        "adds the gateway and the twisted.names forwarder on PyPy",
    )  # fmt: skip
    p.add_argument("--python", default=sys.executable, help="interpreter running the gateway")
    p.add_argument(
        "--latency-share", default="0.5",
        help="dnsperf -Q rates of the latency runs, as shares of the gateway's median qps "
        "(%(default)s; several: 0.5,0.25); the first is the one the target is about",
    )  # fmt: skip
    p.add_argument(
        "--latency-rate", metavar="QPS[,QPS...]",
        help="fixed dnsperf -Q rates instead of shares of the gateway's qps",
    )  # fmt: skip
    add_quiet_options(p)
    p.add_argument("--server-cpu", type=int, default=0, help="CPU of the target (%(default)s)")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU of dnsperf (%(default)s)")
    p.add_argument(
        "--layout",
        choices=("shared", "split"),
        default="shared",
        help="where the upstream unbound runs: 'shared', on the server CPU beside the target; "
        "'split', on the load CPU beside dnsperf, so the target has the server CPU to "
        "itself (unbound moves there while it is the target) (%(default)s)",
    )
    p.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="also measure the gateway of another copy of the repository (target "
        "gateway-compare, in the runs and the latency runs): an A/B of two versions",
    )
    p.add_argument(
        "--profile", type=Path, metavar="FILE",
        help="after the runs, one more run of --profile-target under py-spy; summary to FILE",
    )  # fmt: skip
    p.add_argument(
        "--profile-target", default="gateway",
        help="the target --profile records (%(default)s; it must be one measured)",
    )  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = p.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.pypy:
        args.only += [k for k in ("gateway-pypy", "twisted-pypy") if k not in args.only]
    if args.compare is not None:
        if not (args.compare / "gateway" / "__main__.py").is_file():
            p.error(f"--compare {args.compare}: no gateway/__main__.py there")
        args.compare = args.compare.resolve()
        if "gateway-compare" not in args.only:
            # Right after the gateway, so the two alternate.
            at = args.only.index("gateway") + 1 if "gateway" in args.only else len(args.only)
            args.only.insert(at, "gateway-compare")
    elif "gateway-compare" in args.only:
        p.error("the gateway-compare target needs --compare DIR")
    unknown = set(args.only) - set(LABELS) - {"latency"}
    if unknown:
        p.error(f"--only: unknown target(s) {', '.join(sorted(unknown))}; use some of "
                f"{', '.join([*LABELS, 'latency'])}")  # fmt: skip
    if not args.pypy and {"gateway-pypy", "twisted-pypy"} & set(args.only):
        p.error("the PyPy targets need --pypy PYTHON")
    if args.runs < 1 or args.seconds <= 0:
        p.error("--runs must be at least 1 and --seconds positive")
    return args


def latency_rates(
    args: argparse.Namespace,
    gateway_runs: list[Run],
    servers: dict[str, Server],
    everyone: Sequence[Server],
    load: Load,
    queries: Path,
    workdir: Path,
) -> list[int]:
    """The -Q rates: --latency-rate, or --latency-share of the gateway's median qps."""
    if args.latency_rate:
        return [int(rate) for rate in args.latency_rate.split(",")]
    peak = median([r.qps for r in gateway_runs if not r.failure])
    if peak is None:
        # The gateway's throughput was not measured in this run: measure it now.
        runs = [measure(servers["gateway"], everyone, load, queries, workdir) for _ in range(2)]
        peak = median([r.qps for r in runs if not r.failure])
    if peak is None:
        raise BenchError("no gateway throughput to take a share of for dnsperf -Q")
    return [int(peak * float(share)) for share in args.latency_share.split(",")]


def make_servers(
    args: argparse.Namespace, workdir: Path, upstream: int
) -> dict[str, Callable[[], Server]]:
    cpu = args.server_cpu
    return {
        "dnsdist": lambda: DnsdistServer(workdir, upstream, cpu, cache=False),
        "dnsdist-cache": lambda: DnsdistServer(workdir, upstream, cpu, cache=True),
        "gateway": lambda: gateway_server(
            "gateway", workdir, args.python, upstream, cpu, cache=False
        ),
        "gateway-cache": lambda: gateway_server(
            "gateway-cache", workdir, args.python, upstream, cpu, cache=True
        ),
        "twisted": lambda: script_server(
            "twisted", "_twisted_forwarder.py", workdir, args.python, upstream, cpu
        ),
        "relay": lambda: script_server(
            "relay", "_udp_relay.py", workdir, args.python, upstream, cpu
        ),
        "gateway-routes": lambda: gateway_server(
            "gateway-routes", workdir, args.python, upstream, cpu, cache=False, routes=ROUTES
        ),
        "gateway-pypy": lambda: gateway_server(
            "gateway-pypy", workdir, args.pypy, upstream, cpu, cache=False
        ),
        "gateway-compare": lambda: gateway_server(
            "gateway-compare", workdir, args.python, upstream, cpu, cache=False, source=args.compare
        ),
        "twisted-pypy": lambda: script_server(
            "twisted-pypy", "_twisted_forwarder.py", workdir, args.pypy, upstream, cpu
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = os.sched_getaffinity(0)
    if {args.server_cpu, args.load_cpu} - cpus or args.server_cpu == args.load_cpu:
        progress(f"error: needs two distinct CPUs; this process may use {sorted(cpus)}")
        return 2
    try:
        for program in ("taskset", "dnsperf", "unbound"):
            find_program(program)
        if {"dnsdist", "dnsdist-cache"} & set(args.only):
            find_program("dnsdist")
    except BenchError as exc:
        progress(f"error: {exc}")
        return 2
    # This script waits on dnsperf; keep it (and what it starts) off the servers' CPU.
    os.sched_setaffinity(0, {args.load_cpu})
    load = Load(args.seconds, args.outstanding, args.server_cpu, args.load_cpu, args.quiet_wait)
    workdir = Path(tempfile.mkdtemp(prefix="bench-dns-"))
    queries = workdir / "queries.txt"
    write_queries(queries)
    started: list[Server] = []
    keys = [k for k in args.only if k != "latency"]
    results: dict[str, list[Run]] = {}
    latency: dict[int, dict[str, list[Run]]] = {}
    notes: list[str] = []
    try:
        with interruptible() as outcome:
            upstream_cpu = args.server_cpu if args.layout == "shared" else args.load_cpu
            unbound = UnboundServer(workdir, upstream_cpu)
            started.append(unbound)
            unbound.start()
            progress(f"unbound: {LOOPBACK}:{unbound.port}, {NAMES} names in {ZONE}")
            factories = make_servers(args, workdir, unbound.port)
            servers: dict[str, Server] = {"unbound": unbound}
            needed = set(keys) | ({"gateway"} if "latency" in args.only else set())
            for key in [k for k in LABELS if k in needed and k != "unbound"]:
                server = factories[key]()
                started.append(server)
                try:
                    server.start()
                except BenchError as exc:
                    if key != "gateway-pypy":
                        raise
                    # Expected while the gateway needs a newer Python than PyPy offers.
                    reason = exc.args[0].strip().splitlines()[-1]
                    notes.append(f"{LABELS[key]}: did not start: {reason}")
                    progress(f"{key}: did not start: {reason}")
                    continue
                servers[key] = server
                progress(f"{key}: {LOOPBACK}:{server.port}")
            keys = [k for k in keys if k in servers]
            results = {k: [] for k in keys}
            everyone = list(servers.values())
            for i in range(args.runs):
                for key in keys:
                    run = measure_stable(servers[key], everyone, load, queries, workdir, args, i)
                    results[key].append(run)
            if "latency" in args.only:
                rates = latency_rates(args, results.get("gateway", []), servers, everyone, load,
                                      queries, workdir)  # fmt: skip
                # The relay, when measured, shows what any Twisted forwarder adds at a rate.
                latency_keys = [
                    k for k in ("unbound", "relay", "gateway", "gateway-compare") if k in servers
                ]
                latency = {rate: {k: [] for k in latency_keys} for rate in rates}
                for i in range(args.runs):
                    for rate in rates:
                        for key in latency_keys:
                            run = measure_stable(
                                servers[key], everyone, load, queries, workdir, args, i, rate=rate
                            )
                            latency[rate][key].append(run)
            if args.profile is not None:
                target = servers.get(args.profile_target)
                if not isinstance(target, ProcessServer):
                    raise BenchError(f"--profile-target {args.profile_target}: not a Python target")
                notes.append(profile(target, everyone, load, queries, workdir, args.profile))
    finally:
        stop_all(started, lambda server: server.key, lambda server: server.stop())
        keep_or_remove(workdir, keep=args.keep or bool(outcome.status))
    status = outcome.status
    if not any(results.values()):
        return status or 1
    out = render(THROUGHPUT_HEADER, throughput_rows(results, args.disturbed), args.markdown)
    if any(runs for by_key in latency.values() for runs in by_key.values()):
        out += ["", *render(LATENCY_HEADER, latency_rows(latency), args.markdown)]
    first_rate = next(iter(latency), 0)
    if args.layout == "shared":
        where = f"targets and unbound on CPU {args.server_cpu} (a forwarder shares it with unbound)"
    else:
        where = (
            f"the target alone on CPU {args.server_cpu}; unbound, as the forwarders' "
            f"upstream, on CPU {args.load_cpu} with dnsperf (layout split)"
        )
    bullets = [
        f"dnsperf -c 1 -T 1 -q {args.outstanding} -l {args.seconds:g} on CPU {args.load_cpu}, "
        f"{NAMES} names in a loop; {where}; median of {args.runs} run(s)",
        *target_lines(results, latency.get(first_rate, {}), first_rate),
        *notes,
    ]
    latency_runs = [runs for by_key in latency.values() for runs in by_key.values()]
    all_runs = [r for runs in (*results.values(), *latency_runs) for r in runs]
    if any(r.disturbance > args.disturbed for r in all_runs if not r.failure):
        bullets.append(
            f"*: other programs took more than {100 * args.disturbed:.0f}% of a CPU during "
            f"that run, even after {args.retries} repeats"
        )
    for r in all_runs:
        if r.failure:
            bullets.append(f"{r.key}: a run failed: {r.failure}")
    if status == 130:
        bullets.append("interrupted: partial results")
    out += [""] + [f"* {b}" if args.markdown else b for b in bullets]
    sys.stdout.write("\n".join(out) + "\n")
    if any(r.failure for r in all_runs):
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
