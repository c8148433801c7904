#!/usr/bin/env python3
"""Mail to news throughput: smtp-source -> gateway (SMTP, mail_to_news, nntp) -> INN2, next to
the same articles posted straight to INN2 over the same number of connections.

Run as root from the repository (INN2 is the system's one instance):

    .venv/bin/python bench/nntp.py [--articles 5000] [--connections 10] [--size 4096]
                                   [--modes post,stream] [--runs 3] [--markdown]

Debian packages it needs (it installs nothing; PEERS.md has the INN2 recipe):

    apt-get install -y --no-install-recommends inn2 postfix util-linux

Each mode (``post``: MODE READER + POST; ``stream``: CHECK + TAKETHIS;
``ihave``) has two paths, measured ``--runs`` times, interleaved, and the
median is reported: ``direct`` (bench/_nntp_direct.py posting to INN over
``--connections`` connections) and ``gateway`` (smtp-source with
``--connections`` sessions -> the gateway's SMTP listener -> a route with
``mail_to_news`` -> an ``nntp`` destination with ``--connections``
connections -> INN). Arrivals are counted in INN's active file (the group's
high-water mark); a run's rate is articles / (first send to last article
stored). INN (innd and its nnrpd children) runs alone on ``--inn-cpu``, the
gateway on ``--gateway-cpu``, smtp-source, the direct client and this script on
``--load-cpu`` (by default a third CPU if there is one, else the gateway's).
INN is started with the test fixture (tests/peers_news.py, which waits for its
lock while other test runs use INN) on a free port of 127.0.0.1; the
gateway's spool and all logs live in one temporary folder; every process
started here is stopped at the end, also on Ctrl-C, SIGTERM or an error, and
the benchmark's group with its articles is removed from INN. See
bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parent.parent
# Import the bench helpers as the package bench.*, from the repository's root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402  (tests/peers.py reports a missing program with pytest.fail)

from bench._common import (  # noqa: E402
    SBIN_DIRS,
    BenchError,
    add_quiet_options,
    await_listening,
    cpu_busy,
    fmt_rate,
    gateway_env,
    interruptible,
    keep_or_remove,
    locate_program,
    median,
    own_cpu,
    pin,
    proc_cpu,
    progress,
    read_from,
    render_report,
    repeat_while_disturbed,
    settle,
    spawn_logged,
    stop_process,
    wait_for_quiet,
    wait_until,
)
from tests.peers import free_port  # noqa: E402
from tests.peers_news import (  # noqa: E402
    LOCK_PATH,
    NEWS_ETC,
    Inn,
    NntpConnection,
    NntpError,
    _set_keys,
    _write_atomic,
    article_bytes,
    fresh_message_id,
)

LOOPBACK = "127.0.0.1"
PACKAGES = {
    "smtp-source": "postfix",
    "taskset": "util-linux",
    "innd": "inn2",
    "ctlinnd": "inn2",
    "innconfval": "inn2",
}
NEWS_BIN = Path("/usr/lib/news/bin")
GATEWAY_NAME = "gateway.bench.localdomain"
SENDER = "load@client.bench.test"
MODES = ("post", "stream", "ihave")
POLL = 0.005  # seconds between looks at INN's active file: the arrival-time resolution
OUTCOME = re.compile(r" outcome=(\w+)")
LOG_LEVEL = re.compile(r"^\S+ (warn|error|critical)\s")


# --------------------------------------------------------------------------- helpers


def find_program(name: str) -> str:
    return locate_program(name, PACKAGES, (*SBIN_DIRS, str(NEWS_BIN)))


def _ppid_and_cpu(pid: int) -> tuple[int, float]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1, 0.0
    rest = stat.rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(rest[1]), sum(int(v) for v in rest[11:15]) / tick


# --------------------------------------------------------------------------- INN


class BenchInn(Inn):
    """The tests' INN2 with the limits that would distort a throughput figure lifted.

    * ``nnrpdloadlimit: 0``: nnrpd (the reader process behind MODE READER)
      refuses clients when the load average passes 16; a loaded shared
      machine must not turn that into refused POSTs.
    * ``maxconnections``: at least twice the connections of a run, plus room,
      so the gateway's pool, the direct client and the counter never meet
      innd's limit (50 by default).
    * ``hiscachesize: 16384`` (KiB): innd's history cache; the default 256 KiB
      is small once the bench has added tens of thousands of Message-IDs.

    Everything else is the fixture's configuration (tests/peers_news.py).
    """

    def __init__(self, workdir: Path, connections: int) -> None:
        super().__init__(workdir)
        self.connections = connections

    def configure(self) -> None:
        super().configure()
        path = NEWS_ETC / "inn.conf"
        keys = {
            "nnrpdloadlimit": "0",
            "maxconnections": str(max(50, 2 * self.connections + 20)),
            "hiscachesize": "16384",
        }
        _write_atomic(path, _set_keys(path.read_text(), keys))

    def innd_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((Path("/run/news") / "innd.pid").read_text().strip())
        return None

    def cpu_seconds(self) -> float:
        """innd, its children alive now (nnrpd, channel programs) and those it reaped."""
        pid = self.innd_pid()
        if pid is None:
            return 0.0
        total = _ppid_and_cpu(pid)[1]
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != pid:
                ppid, _ = _ppid_and_cpu(int(entry))
                if ppid == pid:
                    total += proc_cpu(int(entry))[0]  # own only: its reaped ones are counted
        return total

    def active_path(self) -> Path:
        result = subprocess.run(
            [find_program("innconfval"), "pathdb"], capture_output=True, text=True, timeout=30,
            check=False,
        )  # fmt: skip
        folder = result.stdout.strip() or "/var/lib/news"
        return Path(folder) / "active"

    def articles_path(self) -> Path:
        result = subprocess.run(
            [find_program("innconfval"), "patharticles"], capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        return Path(result.stdout.strip() or "/var/spool/news/articles")


class ActiveCounter:
    """Articles stored in one group: its high-water mark in INN's active file.

    innd keeps the active file mapped and updates a group's line in place as it
    stores each article, so reading the file shows arrivals at once, without a
    connection to INN and without using INN's CPU.
    """

    def __init__(self, path: Path, group: str) -> None:
        self.path = path
        self.prefix = group.encode() + b" "

    def count(self) -> int:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise BenchError(f"cannot read INN's active file {self.path}: {exc}") from None
        start = data.find(b"\n" + self.prefix)
        if start < 0:
            if not data.startswith(self.prefix):
                raise BenchError(f"the group is missing from INN's active file {self.path}")
            start = -1
        line = data[start + 1 : data.find(b"\n", start + 1)]
        return int(line.split()[1])


# --------------------------------------------------------------------------- gateway

GATEWAY_ROUTES = """\
# The benchmark's gateway: mail to <mode>.news.test becomes an article in {group}.
version: 1
spool: {spool}
listeners:
  bench-in:
    protocol: smtp
    listen: tcp:{port}:interface={host}
    hostname: {name}
    allow: [127.0.0.0/8]
destinations:
{destinations}
routes:
{routes}
"""

DESTINATION = """\
  news-{mode}:
    protocol: nntp
    connect: tcp:{host}:{inn_port}
    mode: {mode}
    concurrency: {connections}
    max_connections: {connections}
    retry_min: 1s
    retry_max: 5s
"""

ROUTE = """\
  - name: bench-{mode}
    from: bench-in
    match: {{rcpt: '@{mode}\\.news\\.test$'}}
    transforms: [mail_to_news]
    options: {{newsgroups: {group}, gateway: {name}}}
    to: news-{mode}
"""


class Gateway:
    """The gateway, `gateway run -c routes.yaml`, on one CPU."""

    def __init__(
        self, workdir: Path, *, inn_port: int, group: str, modes: Sequence[str],
        connections: int, cpu: int, python: str,
    ) -> None:  # fmt: skip
        self.dir = workdir / "gateway"
        self.config_path = self.dir / "routes.yaml"
        self.log_path = self.dir / "gateway.log"
        self.inn_port = inn_port
        self.group = group
        self.modes = modes
        self.connections = connections
        self.cpu = cpu
        self.python = python
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        self.port = free_port()
        common = {"host": LOOPBACK, "group": self.group, "name": GATEWAY_NAME}
        self.config_path.write_text(
            GATEWAY_ROUTES.format(
                spool=self.dir / "spool", port=self.port, **common,
                destinations="".join(
                    DESTINATION.format(
                        mode=m, inn_port=self.inn_port, connections=self.connections, **common
                    )
                    for m in self.modes
                ),
                routes="".join(ROUTE.format(mode=m, **common) for m in self.modes),
            )
        )  # fmt: skip
        argv = [
            "taskset", "-c", str(self.cpu), self.python, "-m", "gateway", "run",
            "-c", str(self.config_path),
        ]  # fmt: skip
        self.proc, self._log = spawn_logged(
            argv, cwd=self.dir, env=gateway_env(PYTHONUNBUFFERED="1"), log_path=self.log_path
        )
        await_listening(self.proc, self.port, self.log_path, 60)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=40)  # SIGTERM: its clean stop
        if self._log is not None:
            self._log.close()

    def cpu_seconds(self) -> float:
        return sum(proc_cpu(self.proc.pid)) if self.proc is not None else 0.0

    def mark(self) -> int:
        return self.log_path.stat().st_size

    def inspect(self, mark: int) -> tuple[dict[str, float], list[str]]:
        """Outcomes the gateway logged since `mark` (one line per delivery attempt), and
        the lines that show a problem: warnings, errors, and any delivery that was not
        delivered at once as a new article."""
        figures: dict[str, float] = {}
        problems = []
        for line in read_from(self.log_path, mark).splitlines():
            found = OUTCOME.search(line)
            outcome = found.group(1) if found else ""
            if outcome == "delivered" and "already has this Message-ID" in line:
                outcome = "duplicate at INN"
            if outcome:
                figures[outcome] = figures.get(outcome, 0.0) + 1
            if (
                LOG_LEVEL.search(line)
                or "Traceback" in line
                or outcome not in ("", "queued", "delivered")
            ):
                problems.append(line)
        return figures, problems


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    path: str  # "direct-post", "gateway-stream", ...
    articles: int
    stored: int = 0
    extra: int = 0  # arrivals beyond `articles`: left over from an earlier failed run
    sent_seconds: float | None = None  # until smtp-source / the direct client exited
    stored_seconds: float | None = None  # until the last article was in INN
    failure: str = ""
    load_said: str = ""
    gateway_cpu_seconds: float = 0.0
    inn_cpu_seconds: float = 0.0
    load_cpu_seconds: float = 0.0  # smtp-source or the direct client, and this script
    client_cpu_seconds: float | None = None  # the direct client's own, from its report
    other_cpu_seconds: float = 0.0  # other programs on the CPUs used
    waited_for_quiet: float = 0.0
    elapsed: float = 0.0
    attempts: int = 1
    figures: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failure

    @property
    def is_gateway(self) -> bool:
        return self.path.startswith("gateway")

    @property
    def wall(self) -> float:
        return self.elapsed or 1e-9

    @property
    def disturbance(self) -> float:
        """The share of a CPU other programs took during the run."""
        return self.other_cpu_seconds / self.wall

    @property
    def stored_rate(self) -> float | None:
        if not self.ok or not self.stored_seconds:
            return None
        return self.articles / self.stored_seconds

    @property
    def sent_rate(self) -> float | None:
        return self.articles / self.sent_seconds if self.sent_seconds else None


@dataclass(frozen=True)
class Load:
    articles: int
    connections: int
    size: int
    group: str
    inn_cpu: int
    gateway_cpu: int
    load_cpu: int
    timeout: float
    stall: float
    quiet_wait: float
    python: str

    @property
    def cpus(self) -> list[int]:
        return sorted({self.inn_cpu, self.gateway_cpu, self.load_cpu})


def run_tag() -> str:
    """Unique for every run: INN keeps the Message-IDs it has seen across restarts."""
    return f"r{time.time_ns():x}{os.urandom(3).hex()}"


def start_load(path: str, load: Load, inn: BenchInn, gateway: Gateway | None, workdir: Path
               ) -> tuple[subprocess.Popen[bytes], IO[bytes], float]:  # fmt: skip
    """Start smtp-source or the direct client; return it, its output file and the start time."""
    kind, mode = path.split("-", 1)
    tag = run_tag()
    out = (workdir / f"{path}.out").open("w+b")
    if kind == "gateway":
        assert gateway is not None
        argv = [
            "taskset", "-c", str(load.load_cpu), find_program("smtp-source"),
            "-s", str(load.connections), "-m", str(load.articles), "-l", str(load.size),
            # -M names the host in smtp-source's Message-Ids <pid.fd.count@HOST>: fresh per run.
            "-M", f"{tag}.bench.test", "-S", "bench article",
            "-f", SENDER, "-t", f"{load.group}@{mode}.news.test", f"{LOOPBACK}:{gateway.port}",
        ]  # fmt: skip
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        return proc, out, t0
    argv = [
        "taskset", "-c", str(load.load_cpu), load.python,
        str(REPO_ROOT / "bench" / "_nntp_direct.py"), "--port", str(inn.port), "--mode", mode,
        "--connections", str(load.connections), "--articles", str(load.articles),
        "--size", str(load.size), "--group", load.group, "--tag", tag,
        "--gateway", GATEWAY_NAME, "--sender", SENDER, "--timeout", str(load.timeout),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=out,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        stop_process(proc, timeout=5)
        out.seek(0)
        said = out.read().decode("utf-8", "replace").strip()[-2000:]
        raise BenchError(f"the direct client did not start: {line!r} {said}")
    t0 = time.monotonic()
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    return proc, out, t0


def measure(
    path: str, load: Load, inn: BenchInn, counter: ActiveCounter, gateway: Gateway | None,
    workdir: Path,
) -> Run:  # fmt: skip
    run = Run(path, load.articles)
    through_gateway = path.startswith("gateway")
    mark = gateway.mark() if through_gateway and gateway is not None else None
    run.waited_for_quiet = wait_for_quiet(load.cpus, load.quiet_wait)
    base = counter.count()
    cpu_before = cpu_busy()
    inn_before = inn.cpu_seconds()
    gw_before = gateway.cpu_seconds() if gateway is not None else 0.0
    load_before = own_cpu()
    proc, out, t0 = start_load(path, load, inn, gateway, workdir)
    who = "smtp-source" if through_gateway else "the direct client"
    report_line = b""
    try:
        last_count, last_change = base, t0
        while True:
            now = time.monotonic()
            count = counter.count()
            if count != last_count:
                last_count, last_change = count, now
            if run.stored_seconds is None and count - base >= load.articles:
                run.stored_seconds = now - t0
            if run.sent_seconds is None and proc.poll() is not None:
                if proc.returncode != 0:
                    run.failure = f"{who} exited with status {proc.returncode}"
                    break
                run.sent_seconds = now - t0
            if run.sent_seconds is not None and run.stored_seconds is not None:
                break
            if now - t0 > load.timeout:
                run.failure = f"not finished within the {load.timeout:.0f} s timeout"
                break
            if proc.poll() is not None and now - last_change > load.stall:
                run.failure = f"nothing stored for {load.stall:.0f} s"
                break
            time.sleep(POLL)
        if proc.stdout is not None and proc.poll() is not None:
            report_line = proc.stdout.read()
    finally:
        stop_process(proc, timeout=5)
        run.elapsed = time.monotonic() - t0
        in_time = counter.count() - base
        cpu_after = cpu_busy()
        # innd gone during the run (a failure): its reaped CPU is gone with it.
        run.inn_cpu_seconds = max(0.0, inn.cpu_seconds() - inn_before)
        gw_after = gateway.cpu_seconds() if gateway is not None else 0.0
        run.gateway_cpu_seconds = gw_after - gw_before
        run.load_cpu_seconds = own_cpu() - load_before
        out.seek(0)
        run.load_said = out.read().decode("utf-8", "replace").strip()
        out.close()
    if not through_gateway and report_line:
        refused = check_client_report(report_line, run)
        if refused:
            run.failure = f"{run.failure}: {refused}" if run.failure else refused
    if run.failure:
        # What the gateway still holds arrives now, not during the next run.
        settle(counter.count, quiet=6.0, limit=load.timeout)
    else:
        time.sleep(0.3)  # a short grace to see arrivals beyond the count
    run.stored = min(in_time, load.articles)
    run.extra = max(0, counter.count() - base - load.articles)
    busy = sum(cpu_after[c] - cpu_before[c] for c in load.cpus)
    ours = run.inn_cpu_seconds + run.gateway_cpu_seconds + run.load_cpu_seconds
    run.other_cpu_seconds = max(0.0, busy - ours)
    if through_gateway and gateway is not None and mark is not None:
        run.figures, run.problems = gateway.inspect(mark)
        odd = {k: v for k, v in run.figures.items() if k not in ("queued", "delivered")}
        if odd:
            said = ", ".join(f"{v:.0f} {k}" for k, v in sorted(odd.items()))
            first = run.problems[0][:300] if run.problems else ""
            text = f"the gateway logged {said} (first: {first})"
            run.failure = f"{run.failure}; {text}" if run.failure else text
        elif run.failure:
            # Everything went well as the gateway saw it: say so, INN lost or refused them.
            said = ", ".join(f"{v:.0f} {k}" for k, v in sorted(run.figures.items()))
            run.failure += f"; the gateway logged {said or 'no outcomes'}"
    if run.failure:
        run.failure += f" ({run.stored}/{load.articles} stored)"
    return run


def measure_stable(
    path: str, load: Load, inn: BenchInn, counter: ActiveCounter, gateway: Gateway | None,
    workdir: Path, args: argparse.Namespace, i: int,
) -> Run:  # fmt: skip
    """measure(), repeated (up to --retries times) while other programs disturb it."""

    def once(attempt: int) -> Run:
        run = measure(path, load, inn, counter, gateway, workdir)
        run.attempts = attempt + 1
        progress(describe(i + 1, args.runs, run))
        return run

    return repeat_while_disturbed(once, retries=args.retries, disturbed=args.disturbed)


def check_client_report(line: bytes, run: Run) -> str:
    """The direct client's JSON report: its CPU, and a failure text if INN refused articles."""
    try:
        report = json.loads(line.decode("utf-8", "replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return "the direct client printed no report" + (
            f": {run.load_said[-300:]}" if run.load_said else ""
        )
    run.client_cpu_seconds = float(report.get("cpu_seconds", 0.0))
    problems = []
    if report.get("refused"):
        refused = ", ".join(f"{n} x {code}" for code, n in sorted(report["refused"].items()))
        problems.append(f"INN refused articles ({refused}; e.g. {report['examples'][:2]})")
    if report.get("errors"):
        problems.append(f"connection errors: {report['errors'][:3]}")
    return "; ".join(problems)


# --------------------------------------------------------------------------- report

PATH_LABELS = {
    "direct-post": "client -> INN, MODE READER + POST",
    "gateway-post": "smtp-source -> gateway -> INN, POST",
    "direct-stream": "client -> INN, CHECK + TAKETHIS",
    "gateway-stream": "smtp-source -> gateway -> INN, CHECK + TAKETHIS",
    "direct-ihave": "client -> INN, IHAVE",
    "gateway-ihave": "smtp-source -> gateway -> INN, IHAVE",
}

HEADER = [
    "path",
    "stored art/s",
    "sent art/s",
    "stored, each run",
    "gateway CPU ms/art",
    "INN CPU ms/art",
    "INN CPU busy",
    "load CPU ms/art",
    "CPU taken by others",
    "failed runs",
]


def summary_rows(results: dict[str, list[Run]], disturbed: float) -> list[list[str]]:
    def ms(values: list[float | None]) -> str:
        value = median(values)
        return "-" if value is None else f"{value:.2f}"

    rows = []
    for path, runs in results.items():
        good = [r for r in runs if r.ok]
        failed = len(runs) - len(good)
        busy = median([100 * r.inn_cpu_seconds / r.wall for r in good])
        others = median([100 * r.disturbance for r in good])
        load_ms: list[float | None] = [1000 * r.load_cpu_seconds / r.articles for r in good]
        rows.append(
            [
                PATH_LABELS.get(path, path),
                fmt_rate(median([r.stored_rate for r in runs])),
                fmt_rate(median([r.sent_rate for r in runs])),
                ", ".join(
                    fmt_rate(r.stored_rate) + ("*" if r.disturbance > disturbed else "")
                    for r in runs
                ),
                ms([1000 * r.gateway_cpu_seconds / r.articles for r in good])
                if path.startswith("gateway") else "-",
                ms([1000 * r.inn_cpu_seconds / r.articles for r in good]),
                "-" if busy is None else f"{busy:.0f}%",
                ms(load_ms),
                "-" if others is None else f"{others:.0f}%",
                f"{failed} of {len(runs)}" if failed else "0",
            ]
        )  # fmt: skip
    return rows


def ratio_lines(results: dict[str, list[Run]], target: float) -> list[str]:
    lines = []
    for mode in MODES:
        direct = median([r.stored_rate for r in results.get(f"direct-{mode}", [])])
        gw = median([r.stored_rate for r in results.get(f"gateway-{mode}", [])])
        if direct and gw:
            ratio = gw / direct
            verdict = "meets" if ratio >= target else "below"
            lines.append(
                f"{mode}: gateway/direct = {ratio:.2f} ({verdict} the target {target:.2f})"
            )
        elif results.get(f"gateway-{mode}") and results.get(f"direct-{mode}"):
            lines.append(f"{mode}: gateway/direct = n/a (a path has no successful run)")
    return lines


def limit_lines(results: dict[str, list[Run]]) -> list[str]:
    """Which program was busy: INN at ~100% of its CPU means INN was the limit."""
    lines = []
    for path, runs in results.items():
        good = [r for r in runs if r.ok]
        if not good:
            continue
        inn = median([r.inn_cpu_seconds / r.wall for r in good]) or 0.0
        parts = [f"INN {100 * inn:.0f}%"]
        if path.startswith("gateway"):
            gw = median([r.gateway_cpu_seconds / r.wall for r in good]) or 0.0
            parts.append(f"gateway {100 * gw:.0f}%")
        else:
            client = median([(r.client_cpu_seconds or 0.0) / r.wall for r in good]) or 0.0
            parts.append(f"direct client {100 * client:.0f}%")
            if client > 0.8:
                parts.append("the client may be the limit")
        lines.append(f"{path}: busy share of a CPU: " + ", ".join(parts))
    return lines


def failure_lines(results: dict[str, list[Run]]) -> list[str]:
    lines = []
    for runs in results.values():
        for i, run in enumerate(runs, 1):
            if run.failure:
                said = run.load_said.splitlines()[-1][:200] if run.load_said else ""
                lines.append(
                    f"{run.path} run {i}: FAILED: {run.failure}"
                    + (f"; the load said: {said}" if said else "")
                )
            if run.extra:
                lines.append(f"{run.path} run {i}: {run.extra} arrivals beyond the count")
            if run.problems:
                lines.append(f"{run.path} run {i}: {len(run.problems)} gateway problem log lines")
    return lines


def describe(i: int, runs: int, run: Run) -> str:
    text = (
        f"run {i}/{runs} {run.path}: stored/s {fmt_rate(run.stored_rate)}, "
        f"sent/s {fmt_rate(run.sent_rate)}; CPU s: INN {run.inn_cpu_seconds:.2f}"
    )
    if run.is_gateway:
        text += f", gateway {run.gateway_cpu_seconds:.2f}"
    if run.client_cpu_seconds is not None:
        text += f", direct client {run.client_cpu_seconds:.2f}"
    text += f", load side {run.load_cpu_seconds:.2f}, others {run.other_cpu_seconds:.2f}"
    if run.waited_for_quiet > 2:
        text += f"; waited {run.waited_for_quiet:.0f} s for idle CPUs"
    if run.failure:
        text += f"; FAILED: {run.failure}"
    if run.problems:
        text += f"; {len(run.problems)} gateway problem log lines"
    return text


# --------------------------------------------------------------------------- INN set-up


def check_inn(inn: BenchInn, counter: ActiveCounter, group: str) -> None:
    """Post one article and see it stored and counted: fails clearly before any run."""
    before = counter.count()
    mid = fresh_message_id("bench-probe")
    code, text = inn.post(article_bytes(mid, group, subject="bench probe"))
    if code != 240:
        raise BenchError(f"INN refused a probe POST to {group}: {code} {text}")
    try:
        wait_until(f"the probe article counted in {counter.path}",
                   lambda: counter.count() > before, 10)  # fmt: skip
    except BenchError:
        stat = inn.stat(mid)
        raise BenchError(
            f"INN took the probe article (STAT {stat}) but the high-water mark of {group} in "
            f"{counter.path} did not move: the arrivals cannot be counted that way"
        ) from None


def stored_size(inn: BenchInn, group: str, number: int) -> int | None:
    """Octets of article `number` of `group` as INN serves it, or None."""
    try:
        with NntpConnection(inn.port) as conn:
            code, _ = conn.command(f"GROUP {group}")
            if code != 211:
                return None
            code, _ = conn.command(f"ARTICLE {number}")
            if code != 220:
                return None
            return sum(len(line) + 2 for line in conn.block())
    except (OSError, NntpError):
        return None


def remove_group(inn: BenchInn, group: str) -> None:
    """Drop the bench's group and its article files (tradspool: one folder for the group)."""
    with contextlib.suppress(Exception):
        folder = inn.articles_path() / Path(*group.split("."))
        inn.ctlinnd("rmgroup", group)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cpus = sorted(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--articles", type=int, default=5000, help="articles per run (%(default)s)")
    p.add_argument(
        "--connections", type=int, default=10,
        help="smtp-source sessions, gateway to INN connections, and direct client connections "
        "(%(default)s)",
    )  # fmt: skip
    p.add_argument("--size", type=int, default=4096, help="body size in bytes (%(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs per path; the median is reported")
    p.add_argument(
        "--modes", default="post,stream",
        help=f"nntp destination modes to measure, of {', '.join(MODES)} (%(default)s)",
    )  # fmt: skip
    p.add_argument("--only", default="direct,gateway", help="paths (%(default)s)")
    p.add_argument("--group", default="test.bench", help="newsgroup (%(default)s)")
    p.add_argument("--target", type=float, default=0.8, help="gateway/direct goal (%(default)s)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--timeout", type=float, default=300, help="seconds a run may take")
    p.add_argument("--stall", type=float, default=30, help="fail a run idle this many seconds")
    add_quiet_options(p, cpus="the CPUs used", retries=2)
    p.add_argument("--inn-cpu", type=int, default=cpus[0], help="CPU of INN (%(default)s)")
    p.add_argument(
        "--gateway-cpu", type=int, default=cpus[1 % len(cpus)], help="CPU of the gateway"
    )
    p.add_argument(
        "--load-cpu", type=int, default=cpus[2] if len(cpus) > 2 else cpus[1 % len(cpus)],
        help="CPU of smtp-source, the direct client and this script (a third CPU if there is "
        "one, else the gateway's)",
    )  # fmt: skip
    p.add_argument("--inn-wait", type=float, default=900, help="wait this long for INN's lock")
    p.add_argument("--python", default=sys.executable, help="interpreter of gateway and client")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    p.add_argument(
        "--keep-group", action="store_true",
        help="leave the group and its articles in INN (default: removed at the end)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    if set(args.modes) - set(MODES) or not args.modes:
        p.error(f"--modes: use some of {', '.join(MODES)}")
    if set(args.only) - {"direct", "gateway"} or not args.only:
        p.error("--only: use direct, gateway or both")
    if min(args.articles, args.connections, args.size, args.runs) < 1:
        p.error("--articles, --connections, --size and --runs must be at least 1")
    if args.articles > 1_000_000 or args.connections > 500:
        p.error("--articles is at most 1000000 and --connections at most 500")
    if not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9+-]+)+", args.group):
        p.error("--group: a dotted lower-case newsgroup name such as test.bench")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    allowed = os.sched_getaffinity(0)
    wanted = {args.inn_cpu, args.gateway_cpu, args.load_cpu}
    if wanted - allowed or args.inn_cpu in (args.gateway_cpu, args.load_cpu):
        progress(
            "error: --inn-cpu must differ from --gateway-cpu and --load-cpu, and all must be "
            f"CPUs this process may use ({sorted(allowed)})"
        )
        return 2
    if os.geteuid() != 0:
        progress("error: run as root: INN2 is the system's instance, configured under /etc/news")
        return 2
    try:
        for program in ("taskset", "smtp-source", "innd", "ctlinnd", "innconfval"):
            find_program(program)
    except BenchError as exc:
        progress(f"error: {exc}")
        return 2
    paths = [f"{kind}-{mode}" for mode in args.modes for kind in args.only]
    load = Load(
        articles=args.articles, connections=args.connections, size=args.size,
        group=args.group, inn_cpu=args.inn_cpu, gateway_cpu=args.gateway_cpu,
        load_cpu=args.load_cpu, timeout=args.timeout, stall=args.stall,
        quiet_wait=args.quiet_wait, python=args.python,
    )  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="bench-nntp-"))
    results: dict[str, list[Run]] = {p: [] for p in paths}
    inn = BenchInn(workdir / "inn", args.connections)
    gateway: Gateway | None = None
    sizes: dict[str, int] = {}
    inn_started = False
    try:
        with interruptible() as outcome:
            progress(f"waiting for INN (lock {LOCK_PATH}, held by other test runs meanwhile)")
            try:
                inn.acquire(timeout=args.inn_wait)
            except TimeoutError as exc:
                raise BenchError(str(exc)) from None
            # rc.news and innd inherit this CPU set; nnrpd children inherit innd's.
            os.sched_setaffinity(0, {args.inn_cpu})
            try:
                inn_started = True
                inn.start(timeout=60)
            except (RuntimeError, TimeoutError, OSError, pytest.fail.Exception) as exc:
                raise BenchError(f"INN did not start: {exc}") from None
            finally:
                os.sched_setaffinity(0, {args.load_cpu})
            innd = inn.innd_pid()
            if innd is None:
                raise BenchError("INN started but /run/news/innd.pid is missing")
            pin(innd, args.inn_cpu)
            if os.sched_getaffinity(innd) != {args.inn_cpu}:
                raise BenchError(f"innd (pid {innd}) could not be pinned to CPU {args.inn_cpu}")
            inn.newgroup(args.group)
            counter = ActiveCounter(inn.active_path(), args.group)
            check_inn(inn, counter, args.group)
            progress(f"INN on {LOOPBACK}:{inn.port} (innd {innd}, CPU {args.inn_cpu})")
            if "gateway" in args.only:
                gateway = Gateway(
                    workdir, inn_port=inn.port, group=args.group, modes=args.modes,
                    connections=args.connections, cpu=args.gateway_cpu, python=args.python,
                )  # fmt: skip
                gateway.start()
                progress(f"gateway on {LOOPBACK}:{gateway.port} (CPU {args.gateway_cpu})")
            for i in range(args.runs):
                for path in paths:
                    run = measure_stable(path, load, inn, counter, gateway, workdir, args, i)
                    results[path].append(run)
                    if run.ok and path not in sizes:
                        size = stored_size(inn, args.group, counter.count())
                        if size is not None:
                            sizes[path] = size
    finally:
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        if gateway is not None:
            try:
                gateway.stop()
            except Exception as exc:
                progress(f"warning: stopping the gateway failed: {exc}")
        if inn_started:
            if args.keep_group:
                pass
            elif inn.is_running():
                remove_group(inn, args.group)
            else:
                progress(
                    f"warning: INN was not running at the end, so {args.group} and its "
                    f"articles stay in it (the next run of this benchmark removes them)"
                )
            try:
                inn.stop()
            except Exception as exc:
                progress(f"warning: stopping INN failed: {exc}")
        inn.release()
        signal.signal(signal.SIGINT, old_int)
        failed = any(not r.ok for runs in results.values() for r in runs)
        keep_or_remove(workdir, keep=args.keep or bool(outcome.status) or failed)
    status = outcome.status
    if not any(results.values()):
        return status or 1
    notes = [
        f"{args.articles} articles of {args.size} body bytes per run over {args.connections} "
        f"connections; median of {args.runs} run(s); INN on CPU {args.inn_cpu}, gateway on "
        f"CPU {args.gateway_cpu}, smtp-source, direct client and this script on CPU "
        f"{args.load_cpu}",
        *ratio_lines(results, args.target),
        *limit_lines(results),
    ]
    if sizes:
        notes.append(
            "article size as INN stores it: "
            + ", ".join(f"{p} {n:,} bytes" for p, n in sizes.items())
        )
    if any(r.disturbance > args.disturbed for runs in results.values() for r in runs):
        notes.append(
            f"*: other programs took more than {100 * args.disturbed:.0f}% of a CPU during "
            f"that run, even after {args.retries} repeat(s); treat it with care"
        )
    notes += failure_lines(results)
    if status == 130:
        notes.append("interrupted: partial results")
    rows = summary_rows({k: v for k, v in results.items() if v}, args.disturbed)
    sys.stdout.write(render_report(HEADER, rows, notes, markdown=args.markdown))
    problems = [line for runs in results.values() for r in runs for line in r.problems]
    if problems:
        progress(f"{len(problems)} problem log line(s) from the gateway; the first ones:")
        for line in problems[:10]:
            progress("  " + line[:300])
    if any(not r.ok for runs in results.values() for r in runs):
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
