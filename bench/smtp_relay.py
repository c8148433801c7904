#!/usr/bin/env python3
"""SMTP relay throughput: smtp-source -> (nothing | Postfix | the gateway) -> smtp-sink.

Run as root from the repository (Postfix needs root):

    .venv/bin/python bench/smtp_relay.py [--messages 5000] [--sessions 20] [--size 4096] [--runs 3]

Debian packages it needs (it installs nothing):

    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get install -y --no-install-recommends postfix util-linux

(postfix brings /usr/sbin/postfix, smtp-source and smtp-sink without configuring
or starting a mail server; util-linux brings taskset.) The gateway runs with
this interpreter (``--python`` picks another, e.g. a PyPy virtualenv).

Each path is measured ``--runs`` times, interleaved (direct, Postfix, gateway,
direct, ...), and the median is reported. The relay under test runs alone on
CPU 0 (``taskset -c 0``); smtp-source, the smtp-sinks and this script share
CPU 1. Every server binds 127.0.0.1 on a free port, all state lives in one
temporary folder, and every process started here is stopped at the end, also
on Ctrl-C, SIGTERM or an error. See bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from typing import IO

from bench._common import (
    LOOPBACK,
    REPO_ROOT,
    BenchError,
    add_quiet_options,
    await_listening,
    cpu_busy,
    find_py_spy,
    fmt_rate,
    gateway_env,
    interruptible,
    keep_or_remove,
    locate_program,
    median,
    own_cpu,
    pid_listens_on,
    proc_cpu,
    progress,
    read_from,
    render_report,
    repeat_while_disturbed,
    settle,
    spawn_logged,
    stop_all,
    stop_process,
    summarize_raw,
    tail,
    under_py_spy,
    wait_for_quiet,
    wait_until,
)
from tests.peers import _POSTFIX_MASTER_CF

# The Debian package of each program run here, for the "not installed" message.
PACKAGES = {
    "smtp-source": "postfix",
    "smtp-sink": "postfix",
    "postfix": "postfix",
    "taskset": "util-linux",
}
POLL = 0.005  # seconds between looks at the sink's counter: the arrival-time resolution
SENDER = "load@client.bench.test"
RECIPIENT = "user@bench.test"


# --------------------------------------------------------------------------- helpers
# Helpers of this script alone; the ones the scripts share are in bench/_common.py.


def find_program(name: str) -> str:
    return locate_program(name, PACKAGES)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 here reaps slowly, so kill -0 is not enough)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# --------------------------------------------------------------------------- peers


class SmtpSink:
    """smtp-sink on 127.0.0.1 counting messages (-c), keeping none (no -d).

    With -c it rewrites "sess=N quit=N mesg=N\\r" on stdout after every event;
    mesg counts transactions answered 250 after the final dot. Not writing a
    file per message keeps the sink cheap on the load CPU.
    """

    RECORD = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)\r")

    def __init__(self, workdir: Path, name: str, cpu: int) -> None:
        self.log_path = workdir / f"smtp-sink-{name}.log"
        self.name = name
        self.cpu = cpu
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        for _attempt in range(5):
            self.port = free_port()
            argv = ["taskset", "-c", str(self.cpu), find_program("smtp-sink")]
            if os.geteuid() == 0:
                argv += ["-u", "nobody"]
            argv += ["-c", "-h", f"sink-{self.name}.localdomain", f"{LOOPBACK}:{self.port}", "256"]
            self._log = self.log_path.open("wb")
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd="/",
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while not pid_listens_on(self.proc.pid, self.port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            else:
                return
            stop_process(self.proc)
            self._log.close()
            if "Address already in use" not in tail(self.log_path):
                raise BenchError(f"smtp-sink did not start; its log:\n{tail(self.log_path)}")
        raise BenchError("smtp-sink found no free port in 5 tries")

    def count(self) -> int:
        """Messages accepted so far: the last complete counter record."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 160))
                data = log.read()
        except OSError:
            return 0
        records = self.RECORD.findall(data)
        return int(records[-1][2]) if records else 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._log is not None:
            self._log.close()


class Relay:
    """What smtp-source talks to: its port, and how to stop and inspect it."""

    name = "relay"
    port = 0

    def start(self) -> None:
        """Start and wait until the port accepts connections."""

    def stop(self) -> None:
        """Stop every process started; safe to call more than once."""

    def cpu_seconds(self) -> float:
        """CPU time the relay's processes used so far (for the relay's own cost)."""
        return 0.0

    def mark(self) -> object:
        """State before a run, for inspect()."""
        return None

    def inspect(self, mark: object) -> tuple[dict[str, float], list[str]]:
        """Figures and problems (log lines) since `mark`."""
        return {}, []


class Direct(Relay):
    """No relay: smtp-source talks straight to the sink (the ceiling)."""

    name = "direct"

    def __init__(self, sink: SmtpSink) -> None:
        self.port = sink.port


POSTFIX_MASTER_CF = _POSTFIX_MASTER_CF  # the same private-instance layout the tests use


class Postfix(Relay):
    """A private Postfix instance (postfix -c DIR) relaying bench.test to the sink.

    The recipe of /work/shared/PEERS.md: its own queue and data folders,
    relayhost = the sink, concurrency 20, logging to a file (no syslog here).
    """

    name = "postfix"

    def __init__(self, workdir: Path, sink: SmtpSink, cpu: int, concurrency: int) -> None:
        self.dir = workdir / "postfix"
        self.conf = self.dir / "conf"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.logdir = self.dir / "log"
        self.log_path = self.logdir / "postfix.log"
        self.sink = sink
        self.cpu = cpu
        self.concurrency = concurrency
        self.started = False
        self.tls_lines = "smtpd_tls_security_level = none"

    def offer_starttls(self, cert: Path, key: Path) -> None:
        """smtpd_tls_security_level = may with this certificate (--starttls)."""
        self.tls_lines = (
            f"smtpd_tls_security_level = may\n            smtpd_tls_cert_file = {cert}\n"
            f"            smtpd_tls_key_file = {key}"
        )

    def _postfix(self, *args: str, pin: bool = False) -> subprocess.CompletedProcess[str]:
        argv = [find_program("postfix"), "-c", str(self.conf), *args]
        if pin:
            argv = ["taskset", "-c", str(self.cpu), *argv]
        return subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
            timeout=60, check=False,
        )  # fmt: skip

    def _write_config(self) -> None:
        for path in (self.conf, self.queue, self.data, self.logdir):
            path.mkdir(parents=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data, postfix_user.pw_uid, postfix_user.pw_gid)
        self.data.chmod(0o700)
        limit = self.concurrency
        (self.conf / "main.cf").write_text(
            textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {self.queue}
            data_directory = {self.data}
            maillog_file = {self.log_path}
            maillog_file_prefixes = /var, /dev/stdout, {self.logdir}
            myhostname = relay.bench.localdomain
            inet_interfaces = {LOOPBACK}
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            relay_domains = bench.test
            relayhost = [{LOOPBACK}]:{self.sink.port}
            mydestination =
            alias_maps =
            alias_database =
            local_recipient_maps =
            smtp_dns_support_level = disabled
            smtp_host_lookup = native
            smtp_tls_security_level = none
            {self.tls_lines}
            default_destination_concurrency_limit = {limit}
            smtp_destination_concurrency_limit = {limit}
            relay_destination_concurrency_limit = {limit}
            biff = no
            smtputf8_enable = no
            """)
        )
        listen = f"{LOOPBACK}:{self.port}"
        (self.conf / "master.cf").write_text(POSTFIX_MASTER_CF.format(listen=listen))

    @property
    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        if os.geteuid() != 0:
            raise BenchError("Postfix needs root: run as root, or leave it out with --only.")
        self.port = free_port()
        self._write_config()
        check = self._postfix("check")
        if check.returncode != 0:
            raise BenchError(f"postfix check failed:\n{check.stdout}{check.stderr}")
        self.started = True
        # taskset's CPU set is inherited by master and every process it forks.
        started = self._postfix("start", pin=True)
        if started.returncode != 0:
            raise BenchError(
                f"postfix start failed:\n{started.stdout}{started.stderr}\n{tail(self.log_path)}"
            )
        wait_until(
            f"Postfix listening on {LOOPBACK}:{self.port}",
            lambda: (pid := self.master_pid) is not None and pid_listens_on(pid, self.port),
            30,
        )

    def _our_pids(self) -> list[int]:
        """Every Postfix process of this instance: master passes MAIL_CONFIG to all of them."""
        wanted = f"MAIL_CONFIG={self.conf}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                    if wanted in env and alive(int(entry)):
                        pids.append(int(entry))
        return pids

    def cpu_seconds(self) -> float:
        # Live processes, plus what the master reaped: exited smtpd and smtp processes.
        master = self.master_pid
        total = proc_cpu(master)[1] if master is not None else 0.0
        return total + sum(proc_cpu(pid)[0] for pid in self._our_pids())

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        master = self.master_pid
        self._postfix("stop")
        with contextlib.suppress(BenchError):
            wait_until("Postfix stopping", lambda: master is None or not alive(master), 15)
            wait_until("Postfix's children exiting", lambda: not self._our_pids(), 10)
            return
        self._postfix("abort")
        for pid in self._our_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def mark(self) -> object:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def inspect(self, mark: object) -> tuple[dict[str, float], list[str]]:
        assert isinstance(mark, int)
        text = read_from(self.log_path, mark)
        figures = {
            "sent": float(text.count(" status=sent ")),
            "deferred": float(text.count(" status=deferred ")),
        }
        problems = [
            line
            for line in text.splitlines()
            if re.search(r"postfix/[\w/-]+\[\d+\]: (warning|error|fatal|panic):", line)
            or " status=deferred " in line
            or " status=bounced " in line
        ]
        return figures, problems


GATEWAY_ROUTES = """\
# The benchmark's routes: everything for bench.test goes to the sink.
version: 1
spool: {spool}
listeners:
  bench-in:
    protocol: smtp
    listen: tcp:{port}:interface={host}
    hostname: gateway.bench.localdomain
    allow: [127.0.0.0/8]
{extra}destinations:
  sink:
    protocol: smtp
    connect: tcp:{host}:{sink_port}
    tls: none
    concurrency: {concurrency}
    max_connections: {concurrency}
routes:
  - name: bench
    from: bench-in
    match: {{rcpt: '@bench\\.test$'}}
    to: sink
"""

COUNTERS_MARK = "bench-counters:"
LOG_LEVEL = re.compile(r"^\S+ (warn|error|critical)\s")


class Gateway(Relay):
    """The gateway, `gateway run -c routes.yaml` through bench/_gateway_counters.py."""

    name = "gateway"

    def __init__(
        self, workdir: Path, sink: SmtpSink, cpu: int, concurrency: int, python: str
    ) -> None:
        self.dir = workdir / "gateway"
        self.config_path = self.dir / "routes.yaml"
        self.log_path = self.dir / "gateway.log"
        self.sink = sink
        self.cpu = cpu
        self.concurrency = concurrency
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.extra = ""  # more listener settings (--starttls, --limits)

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.config_path.write_text(
            GATEWAY_ROUTES.format(
                spool=self.dir / "spool", port=self.port, host=LOOPBACK,
                sink_port=self.sink.port, concurrency=self.concurrency, extra=self.extra,
            )
        )  # fmt: skip
        argv = [
            "taskset", "-c", str(self.cpu), self.python,
            str(REPO_ROOT / "bench" / "_gateway_counters.py"), "-c", str(self.config_path),
        ]  # fmt: skip
        self.proc, self._log = spawn_logged(
            argv, cwd=self.dir, env=gateway_env(), log_path=self.log_path
        )
        await_listening(self.proc, self.port, self.log_path, 30)

    def stop(self) -> None:
        if self.proc is not None:
            # SIGTERM is the gateway's clean stop; allow its shutdown_timeout and a bit.
            stop_process(self.proc, timeout=40)
        if self._log is not None:
            self._log.close()

    def cpu_seconds(self) -> float:
        return sum(proc_cpu(self.proc.pid)) if self.proc is not None else 0.0

    def counters(self, timeout: float = 5.0) -> dict[str, int]:
        """The spool and delivery counters, asked for with SIGUSR1 (see _gateway_counters)."""
        if self.proc is None or self.proc.poll() is not None:
            return {}
        start = self.log_path.stat().st_size
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in read_from(self.log_path, start).splitlines():
                if line.startswith(COUNTERS_MARK):
                    pairs = re.findall(r"(\w+)=(\d+)", line)
                    return {k: int(v) for k, v in pairs}
            time.sleep(0.02)
        return {}

    def mark(self) -> object:
        return (self.log_path.stat().st_size, self.counters())

    def inspect(self, mark: object) -> tuple[dict[str, float], list[str]]:
        assert isinstance(mark, tuple)
        offset, before = mark
        after = self.counters()
        figures: dict[str, float] = {}
        for key in after.keys() & before.keys():
            figures[key] = float(after[key] - before[key])
        if figures.get("commits"):
            figures["writes_per_commit"] = figures["writes"] / figures["commits"]
        text = read_from(self.log_path, offset)
        problems = []
        for line in text.splitlines():
            if line.startswith(COUNTERS_MARK):
                continue
            if (
                LOG_LEVEL.search(line)
                or "Traceback" in line
                or re.search(r"outcome=(deferred|dead|temporary|permanent)", line)
            ):
                problems.append(line)
        figures["log_lines"] = float(len(text.splitlines()))
        return figures, problems


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    path: str
    messages: int
    delivered: int = 0
    extra: int = 0  # arrivals beyond `messages`: duplicates
    accept_seconds: float | None = None
    deliver_seconds: float | None = None
    failure: str = ""
    source_errors: str = ""
    relay_cpu_seconds: float = 0.0  # the relay's own processes
    other_cpu_seconds: float = 0.0  # anything else on the relay's CPU: interference
    load_cpu_seconds: float = 0.0  # everything on the load CPU
    load_own_cpu_seconds: float = 0.0  # smtp-source, the sink, this script
    waited_for_quiet: float = 0.0
    elapsed: float = 0.0  # from the first send until both figures were in, or the failure
    attempts: int = 1
    figures: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failure

    @property
    def other_load_cpu_seconds(self) -> float:
        return max(0.0, self.load_cpu_seconds - self.load_own_cpu_seconds)

    @property
    def disturbance(self) -> float:
        """The larger share of a CPU that other programs took during the run."""
        wall = self.wall_seconds
        load_share = self.other_load_cpu_seconds / wall
        if self.path == "direct":  # nothing of this path runs on the relay's CPU
            return load_share
        return max(self.other_cpu_seconds / wall, load_share)

    @property
    def wall_seconds(self) -> float:
        return self.elapsed or 1e-9

    @property
    def accepted_rate(self) -> float | None:
        return self.messages / self.accept_seconds if self.accept_seconds else None

    @property
    def delivered_rate(self) -> float | None:
        return self.messages / self.deliver_seconds if self.ok and self.deliver_seconds else None


@dataclass(frozen=True)
class Load:
    messages: int
    sessions: int
    size: int
    keep_connections: bool
    cpu: int
    relay_cpu: int
    timeout: float
    stall: float
    quiet_wait: float
    starttls: bool = False


def load_cpu(sink: SmtpSink) -> float:
    """CPU seconds of the load side so far: this script, its reaped children
    (smtp-source), and the sink."""
    return own_cpu() + (proc_cpu(sink.proc.pid)[0] if sink.proc is not None else 0.0)


def measure(relay: Relay, sink: SmtpSink, load: Load, workdir: Path) -> Run:
    """One smtp-source run through `relay`; times from the first send."""
    run = Run(relay.name, load.messages)
    mark = relay.mark()
    base = sink.count()
    program = (
        [sys.executable, str(REPO_ROOT / "bench" / "_starttls_source.py")]
        if load.starttls
        else [find_program("smtp-source")]
    )
    argv = [
        "taskset", "-c", str(load.cpu), *program,
        "-s", str(load.sessions), "-m", str(load.messages), "-l", str(load.size),
        "-f", SENDER, "-t", RECIPIENT,
    ]  # fmt: skip
    if load.keep_connections:
        argv.append("-d")
    argv.append(f"{LOOPBACK}:{relay.port}")
    errors_path = workdir / f"smtp-source-{relay.name}.err"
    run.waited_for_quiet = wait_for_quiet((load.relay_cpu, load.cpu), load.quiet_wait)
    cpu_before = cpu_busy()
    own_before = relay.cpu_seconds()
    load_before = load_cpu(sink)
    with errors_path.open("w+b") as errors:
        t0 = time.monotonic()
        source = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=errors, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            last_count, last_change = base, t0
            while True:
                now = time.monotonic()
                count = sink.count()
                if count != last_count:
                    last_count, last_change = count, now
                if run.deliver_seconds is None and count - base >= load.messages:
                    run.deliver_seconds = now - t0
                if run.accept_seconds is None and source.poll() is not None:
                    run.accept_seconds = now - t0
                    if source.returncode != 0:
                        run.failure = f"smtp-source exited with status {source.returncode}"
                if run.accept_seconds is not None and run.deliver_seconds is not None:
                    break
                if now - t0 > load.timeout:
                    run.failure = f"not finished within the {load.timeout:.0f} s timeout"
                    break
                if source.poll() is not None and now - last_change > load.stall:
                    run.failure = run.failure or f"deliveries stalled for {load.stall:.0f} s"
                    break
                time.sleep(POLL)
        finally:
            stop_process(source, timeout=5)
        run.elapsed = time.monotonic() - t0
        in_time = sink.count() - base
        cpu_after = cpu_busy()
        own_after = relay.cpu_seconds()
        run.load_own_cpu_seconds = load_cpu(sink) - load_before
        errors.seek(0)
        run.source_errors = errors.read().decode("utf-8", "replace").strip()
    if run.failure:
        # Let what the relay still holds arrive now, not during the next run.
        settle(sink.count, quiet=3.0, limit=load.timeout)
    else:
        time.sleep(0.3)  # a short grace to see arrivals beyond the count: duplicates
    final = sink.count() - base
    run.delivered = min(in_time, load.messages)
    run.extra = max(0, final - load.messages)
    run.relay_cpu_seconds = own_after - own_before
    relay_cpu_busy = cpu_after[load.relay_cpu] - cpu_before[load.relay_cpu]
    run.other_cpu_seconds = max(0.0, relay_cpu_busy - run.relay_cpu_seconds)
    run.load_cpu_seconds = cpu_after[load.cpu] - cpu_before[load.cpu]
    if run.failure:
        run.failure += f" ({run.delivered}/{load.messages} delivered)"
    run.figures, run.problems = relay.inspect(mark)
    return run


# --------------------------------------------------------------------------- report


PATH_LABELS = {
    "direct": "smtp-source -> smtp-sink (ceiling)",
    "postfix": "smtp-source -> Postfix -> smtp-sink",
    "gateway": "smtp-source -> gateway -> smtp-sink",
}


def summary_rows(results: dict[str, list[Run]], disturbed: float) -> list[list[str]]:
    rows = []
    for path, runs in results.items():
        good = [r for r in runs if r.ok]
        deliv = [r.delivered_rate for r in runs]
        cpu_ms = median([1000 * r.relay_cpu_seconds / r.messages for r in good])
        others = median([100 * r.disturbance for r in good])
        failed = len(runs) - len(good)
        rows.append(
            [
                PATH_LABELS.get(path, path),
                fmt_rate(median(deliv)),
                fmt_rate(median([r.accepted_rate for r in runs])),
                ", ".join(
                    fmt_rate(r.delivered_rate) + ("*" if r.disturbance > disturbed else "")
                    for r in runs
                ),
                "-" if path == "direct" or cpu_ms is None else f"{cpu_ms:.2f}",
                "-" if others is None else f"{others:.0f}%",
                f"{failed} of {len(runs)}" if failed else "0",
            ]
        )
    return rows


HEADER = [
    "path",
    "delivered msg/s",
    "accepted msg/s",
    "delivered, each run",
    "relay CPU ms/msg",
    "CPU taken by others",
    "failed runs",
]


def ratio_lines(results: dict[str, list[Run]]) -> list[str]:
    def med(path: str, rate: Callable[[Run], float | None]) -> float | None:
        runs = results.get(path)
        return median([rate(r) for r in runs]) if runs else None

    lines = []
    for kind, rate in (
        ("delivered", lambda r: r.delivered_rate),
        ("accepted", lambda r: r.accepted_rate),
    ):
        gw = med("gateway", rate)
        for other in ("postfix", "direct"):
            base = med(other, rate)
            if gw is not None and base:
                lines.append(f"gateway/{other} ({kind}): {gw / base:.2f}")
    return lines


def disturbed_lines(results: dict[str, list[Run]], args: argparse.Namespace) -> list[str]:
    if not any(r.disturbance > args.disturbed for runs in results.values() for r in runs):
        return []
    return [
        f"*: other programs on this machine took more than {100 * args.disturbed:.0f}% of a "
        f"CPU during that run, even after {args.retries} repeat(s); treat it with care"
    ]


def failure_lines(results: dict[str, list[Run]]) -> list[str]:
    lines = []
    for runs in results.values():
        for i, run in enumerate(runs, 1):
            if run.failure:
                said = run.source_errors.splitlines()[0][:200] if run.source_errors else ""
                lines.append(
                    f"{run.path} run {i}: FAILED: {run.failure}"
                    + (f"; smtp-source said: {said}" if said else "")
                )
    return lines


def gateway_lines(results: dict[str, list[Run]]) -> list[str]:
    runs = [r for r in results.get("gateway", []) if r.figures]
    lines = []
    ratios = [r.figures.get("writes_per_commit") for r in runs]
    if any(v is not None for v in ratios):
        commits = median([r.figures.get("commits") for r in runs])
        writes = median([r.figures.get("writes") for r in runs])
        lines.append(
            f"gateway spool group commit: {median(ratios):.1f} writes per commit "
            f"(median: {writes:.0f} writes in {commits:.0f} commits per run; "
            "a message costs 2 writes, stored and delivered)"
        )
    elif runs:
        lines.append("gateway spool group commit: counters unavailable")
    return lines


def problem_lines(results: dict[str, list[Run]]) -> list[str]:
    """Per run: warnings and errors the relay logged, duplicates, and (for the
    gateway) deliveries its own counters say were not delivered at once."""
    lines = []
    for runs in results.values():
        for i, r in enumerate(runs, 1):
            found = []
            if r.problems:
                found.append(f"{len(r.problems)} warning/error/deferral log lines")
            if r.extra:
                found.append(f"{r.extra} arrivals beyond the {r.messages} sent (duplicates)")
            for key in ("deferred", "dead", "duplicates"):
                if r.figures.get(key):
                    found.append(f"{key}={r.figures[key]:.0f} in the gateway's counters")
            if found:
                lines.append(f"{r.path} run {i}: " + "; ".join(found))
    return lines


RIGHT_ALIGNED = {1, 2, 4, 5}  # the Markdown table's right-aligned columns


# --------------------------------------------------------------------------- profile


def profile_gateway(
    gateway: Gateway, sink: SmtpSink, load: Load, workdir: Path, *, out: Path, cpu: int
) -> str:
    """One more gateway run under py-spy (not counted); return a summary of the top costs."""
    py_spy = find_py_spy()
    if py_spy is None or gateway.proc is None:
        return "profile: py-spy is not installed (pip install py-spy); no profile taken"
    raw = out.with_suffix(".raw.txt")
    run = under_py_spy(
        py_spy, gateway.proc.pid, lambda: measure(gateway, sink, load, workdir),
        cpu=cpu, raw=raw, log_path=workdir / "py-spy.log", threads=True,
    )  # fmt: skip
    summary = summarize_raw(raw)
    out.write_text(summary)
    rate = fmt_rate(run.delivered_rate)
    return f"profile run (not counted; {rate} msg/s delivered under py-spy): {out}, {raw}"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=5000, help="messages per run (%(default)s)")
    p.add_argument("--sessions", type=int, default=20, help="parallel smtp-source sessions")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (%(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs per path; the median is reported")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument(
        "--only", default="direct,postfix,gateway", help="paths to measure (%(default)s)"
    )
    p.add_argument(
        "--keep-connections",
        action="store_true",
        help="smtp-source -d: many messages per connection (default: one connection each)",
    )
    p.add_argument(
        "--starttls",
        action="store_true",
        help="every session does STARTTLS (load: bench/_starttls_source.py; Postfix with"
        " smtpd_tls_security_level = may); no direct path",
    )
    p.add_argument(
        "--limits",
        action="store_true",
        help="the gateway listener counts per-client limits set too high to bite (their cost)",
    )
    p.add_argument("--concurrency", type=int, default=20, help="relay to sink connections")
    p.add_argument("--timeout", type=float, default=300, help="seconds a run may take")
    p.add_argument("--stall", type=float, default=30, help="fail a run idle this many seconds")
    add_quiet_options(p)
    p.add_argument("--relay-cpu", type=int, default=0, help="CPU of the relay (%(default)s)")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU of source and sinks")
    p.add_argument("--python", default=sys.executable, help="interpreter running the gateway")
    p.add_argument(
        "--profile",
        type=Path,
        help="after the runs, one more gateway run under py-spy; summary to this file",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = p.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.starttls:
        args.only = [name for name in args.only if name != "direct"]  # smtp-sink has no TLS
    unknown = set(args.only) - set(PATH_LABELS)
    if unknown:
        known = ", ".join(PATH_LABELS)
        p.error(f"--only: unknown path(s) {', '.join(sorted(unknown))}; use some of {known}")
    if args.messages < 1 or args.sessions < 1 or args.runs < 1:
        p.error("--messages, --sessions and --runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = os.sched_getaffinity(0)
    if {args.relay_cpu, args.load_cpu} - cpus or args.relay_cpu == args.load_cpu:
        progress(
            f"error: needs two distinct CPUs for --relay-cpu and --load-cpu; "
            f"this process may use {sorted(cpus)}"
        )
        return 2
    try:
        for program in ("taskset", "smtp-source", "smtp-sink"):
            find_program(program)
        if "postfix" in args.only:
            find_program("postfix")
            if os.geteuid() != 0:
                raise BenchError("Postfix needs root: run as root, or leave it out with --only.")
    except BenchError as exc:
        progress(f"error: {exc}")
        return 2
    # This script polls the sinks; keep it off the relay's CPU.
    os.sched_setaffinity(0, {args.load_cpu})
    load = Load(
        messages=args.messages, sessions=args.sessions, size=args.size,
        keep_connections=args.keep_connections, cpu=args.load_cpu, relay_cpu=args.relay_cpu,
        timeout=args.timeout, stall=args.stall, quiet_wait=args.quiet_wait,
        starttls=args.starttls,
    )  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="bench-smtp-"))
    # Postfix's daemons (user postfix) must reach their queue below it.
    workdir.chmod(0o755)
    started: list[Relay | SmtpSink] = []
    results: dict[str, list[Run]] = {name: [] for name in args.only}
    notes: list[str] = []
    try:
        with interruptible() as outcome:
            relays: dict[str, tuple[Relay, SmtpSink]] = {}
            for name in args.only:
                # One sink per path, so each count is that path's own.
                sink = SmtpSink(workdir, name, args.load_cpu)
                started.append(sink)
                sink.start()
                relay: Relay
                if name == "direct":
                    relay = Direct(sink)
                elif name == "postfix":
                    relay = Postfix(workdir, sink, args.relay_cpu, args.concurrency)
                    if args.starttls:
                        relay.offer_starttls(*make_certificate(workdir))
                else:
                    relay = Gateway(workdir, sink, args.relay_cpu, args.concurrency, args.python)
                    relay.extra = gateway_extra(workdir, args)
                started.append(relay)
                relay.start()
                relays[name] = (relay, sink)
                progress(f"{name}: listening on {LOOPBACK}:{relay.port}, sink on {sink.port}")
            for i in range(args.runs):
                for name, (relay, sink) in relays.items():
                    results[name].append(measure_stable(relay, sink, load, workdir, args, i))
            if args.profile is not None and "gateway" in relays:
                gateway, sink = relays["gateway"]
                assert isinstance(gateway, Gateway)
                notes.append(
                    profile_gateway(
                        gateway, sink, load, workdir, out=args.profile, cpu=args.load_cpu
                    )
                )
    finally:
        stop_all(started, lambda item: type(item).__name__, lambda item: item.stop())
        keep_or_remove(workdir, keep=args.keep or bool(outcome.status))
    status = outcome.status
    if not any(results.values()):
        return status or 1
    per = "many messages per connection" if args.keep_connections else "one per connection"
    notes = [
        f"{args.messages} messages of {args.size} bytes per run from {args.sessions} sessions "
        f"({per}); "
        f"median of {args.runs} run(s); relay on CPU {args.relay_cpu}, "
        f"smtp-source and sinks on CPU {args.load_cpu}",
        *ratio_lines(results),
        *disturbed_lines(results, args),
        *failure_lines(results),
        *gateway_lines(results),
        *problem_lines(results),
        *notes,
    ]
    if status == 130:
        notes.append("interrupted: partial results")
    rows = summary_rows({k: v for k, v in results.items() if v}, args.disturbed)
    sys.stdout.write(
        render_report(HEADER, rows, notes, markdown=args.markdown, right=RIGHT_ALIGNED)
    )
    problems = [line for runs in results.values() for r in runs for line in r.problems]
    if problems:
        progress(f"{len(problems)} problem log line(s) from the relays; the first ones:")
        for line in problems[:10]:
            progress("  " + line[:300])
    if any(not r.ok for runs in results.values() for r in runs):
        status = status or 1
    return status


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for both relays (made once)."""
    cert, key = workdir / "tls-cert.pem", workdir / "tls-key.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key),
             "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    return cert, key


def gateway_extra(workdir: Path, args: argparse.Namespace) -> str:
    lines = ""
    if args.starttls:
        cert, key = make_certificate(workdir)
        lines += f"    tls: {{certificate: '{cert}', key: '{key}'}}\n"
    if args.limits:
        lines += (
            "    limits: {connections: 100000, connection_rate: 1000000/s,"
            " message_rate: 1000000/s, recipient_rate: 1000000/s}\n"
        )
    return lines


def measure_stable(
    relay: Relay, sink: SmtpSink, load: Load, workdir: Path, args: argparse.Namespace, i: int
) -> Run:
    """measure(), repeated (up to --retries times) while other programs disturb it."""

    def once(attempt: int) -> Run:
        run = measure(relay, sink, load, workdir)
        run.attempts = attempt + 1
        progress(describe(i + 1, args.runs, run))
        return run

    return repeat_while_disturbed(once, retries=args.retries, disturbed=args.disturbed)


def describe(i: int, runs: int, run: Run) -> str:
    text = (
        f"run {i}/{runs} {run.path}: delivered/s {fmt_rate(run.delivered_rate)}, "
        f"accepted/s {fmt_rate(run.accepted_rate)}; CPU s: relay {run.relay_cpu_seconds:.1f}, "
        f"others on its CPU {run.other_cpu_seconds:.1f}, load CPU {run.load_cpu_seconds:.1f} "
        f"of which load programs {run.load_own_cpu_seconds:.1f}"
    )
    if run.waited_for_quiet > 2:
        text += f"; waited {run.waited_for_quiet:.0f} s for idle CPUs"
    text += f"; others took {100 * run.disturbance:.0f}% of a CPU"
    if run.failure:
        text += f"; FAILED: {run.failure}"
    if run.extra:
        text += f"; {run.extra} extra (duplicate) arrivals"
    if run.source_errors:
        text += f"; smtp-source said: {run.source_errors.splitlines()[0][:200]}"
    if "writes_per_commit" in run.figures:
        text += f"; {run.figures['writes_per_commit']:.1f} spool writes/commit"
    if run.problems:
        text += f"; {len(run.problems)} problem log lines"
    return text


if __name__ == "__main__":
    sys.exit(main())
