"""Helpers the benchmark scripts share: programs, processes, CPU time, idle waits, tables.

The scripts import it as ``bench._common`` with the repository's root on
``sys.path`` (as they import tests/peers.py, which this module also uses).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, TypeVar

from tests.peers import _end_process, pid_listens_on

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
SBIN_DIRS = ("/usr/sbin", "/sbin")


class BenchError(Exception):
    """A problem that stops the benchmark; the text says what to do."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: stop like Ctrl-C does."""


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@dataclass
class Outcome:
    """How the body of a benchmark's main() ended: 0, 1 (a BenchError) or 130 (interrupted)."""

    status: int = 0


@contextlib.contextmanager
def interruptible() -> Iterator[Outcome]:
    """The body of a benchmark's main(): SIGTERM and SIGHUP stop it as Ctrl-C does; an
    interrupt or a BenchError is said on stderr and ends the body, with its status."""
    outcome = Outcome()
    try:
        with signals_interrupt():
            yield outcome
    except (KeyboardInterrupt, Interrupted) as exc:
        progress(f"interrupted ({exc}); stopping everything" if str(exc) else "interrupted")
        outcome.status = 130
    except BenchError as exc:
        progress(f"error: {exc}")
        outcome.status = 1


def keep_or_remove(workdir: Path, *, keep: bool) -> None:
    """At the end: say where the logs are kept, or remove the temporary folder."""
    if keep:
        progress(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def add_quiet_options(
    p: argparse.ArgumentParser, *, cpus: str = "both CPUs", retries: int = 3
) -> None:
    """--quiet-wait, --disturbed and --retries: wait for idle `cpus` before a run, and repeat
    a run that other programs disturbed."""
    p.add_argument(
        "--quiet-wait", type=float, default=120,
        help=f"before a run, wait up to this long for {cpus} to be idle (%(default)s s)",
    )  # fmt: skip
    p.add_argument(
        "--disturbed", type=float, default=0.10,
        help="a run during which other programs took more than this share of a CPU "
        "is repeated (%(default)s)",
    )  # fmt: skip
    p.add_argument("--retries", type=int, default=retries, help="repeats of a disturbed run")


# --------------------------------------------------------------------------- programs


def locate_program(
    name: str, packages: Mapping[str, str], extra_dirs: Sequence[str] = SBIN_DIRS
) -> str:
    """The path of `name` on PATH or in `extra_dirs`, or a BenchError naming its package."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *extra_dirs])
    found = shutil.which(name, path=search)
    if found is None:
        package = packages.get(name, name)
        raise BenchError(
            f"{name} is not installed: install the Debian package {package!r} "
            f"(apt-get install --no-install-recommends {package}) and run again."
        )
    return found


@contextlib.contextmanager
def fixture_errors(what: str) -> Iterator[None]:
    """The fixtures of tests/peers.py fail with pytest.fail or RuntimeError: a BenchError here."""
    import pytest

    try:
        yield
    except (RuntimeError, TimeoutError, pytest.fail.Exception) as exc:
        raise BenchError(f"{what} did not start: {exc}") from None


# --------------------------------------------------------------------------- processes


def wait_until(what: str, done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            raise BenchError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.02)


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def read_from(path: Path, offset: int) -> str:
    """The file from byte `offset` on (a log since a mark); empty if it cannot be read."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL to its process group; reap it (as the test fixtures do)."""
    _end_process(proc, timeout)


def gateway_env(**extra: str) -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH, plus `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def spawn_logged(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], log_path: Path
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start `argv` in its own session, stdout and stderr appended to `log_path`."""
    log = log_path.open("ab")
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    except BaseException:
        log.close()
        raise
    return proc, log


def await_listening(
    proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float,
    what: str = "the gateway",
) -> None:  # fmt: skip
    """Wait until `proc` listens on 127.0.0.1:`port`; a BenchError with its log if it does not."""
    try:
        wait_until(
            f"{what} listening on {LOOPBACK}:{port}",
            lambda: proc.poll() is not None or pid_listens_on(proc.pid, port),
            timeout,
        )
    except BenchError as exc:
        raise BenchError(f"{exc}; its log:\n{tail(log_path)}") from None
    if proc.poll() is not None:
        raise BenchError(f"{what} exited with status {proc.returncode}; its log:\n{tail(log_path)}")


T = TypeVar("T")


def stop_all(items: Sequence[T], name: Callable[[T], str], stop: Callable[[T], None]) -> None:
    """Stop `items`, last started first, with Ctrl-C ignored meanwhile so nothing is left
    running; a failure to stop one is a warning and the others are still stopped."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    for item in reversed(items):
        try:
            stop(item)
        except Exception as exc:
            progress(f"warning: stopping {name(item)} failed: {exc}")
    signal.signal(signal.SIGINT, old_int)


def pin(pid: int, cpu: int, *, with_children: bool = False) -> None:
    """Move every thread of `pid` to `cpu` (threads and processes it starts later inherit
    that); with `with_children`, also every process it has already started."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {cpu})
    if with_children:
        for child in children(pid):
            pin(child, cpu, with_children=True)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


# --------------------------------------------------------------------------- CPU time


def cpu_busy() -> dict[int, float]:
    """Busy seconds per CPU since boot, from /proc/stat (everything but idle and iowait)."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                ticks = [int(v) for v in values]
                busy[int(name[3:])] = (sum(ticks[:8]) - ticks[3] - ticks[4]) / tick
    return busy


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a process; zeros if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    rest = stat.rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(rest[11]) + int(rest[12])) / tick, (int(rest[13]) + int(rest[14])) / tick


def own_cpu() -> float:
    """CPU seconds of this script and its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def wait_for_quiet(cpus: Iterable[int], limit: float, busy: float = 0.10) -> float:
    """Wait (at most `limit` s) until every CPU in `cpus` is idle for a second.

    Other programs on a shared machine would take CPU from the relay or the
    load; returns the seconds waited.
    """
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = cpu_busy()
        time.sleep(1.0)
        after = cpu_busy()
        if all(after[c] - before[c] <= busy for c in cpus):
            break
    return time.monotonic() - start


def settle(count: Callable[[], int], quiet: float, limit: float) -> None:
    """Wait until `count()` has not changed for `quiet` s (at most `limit` s)."""
    start = time.monotonic()
    last, since = count(), start
    while time.monotonic() - start < limit:
        time.sleep(0.1)
        now_count = count()
        if now_count != last:
            last, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


class Measured(Protocol):
    """What repeat_while_disturbed() looks at in a run."""

    @property
    def failure(self) -> str: ...

    @property
    def disturbance(self) -> float: ...


M = TypeVar("M", bound=Measured)


def repeat_while_disturbed(
    measure: Callable[[int], M], *, retries: int, disturbed: float,
    again: str = "measuring this run again",
) -> M:  # fmt: skip
    """measure(attempt), repeated (up to `retries` times) while other programs took more than
    `disturbed` of a CPU during it; a failed run is not repeated. The last run is returned."""
    for attempt in range(retries + 1):
        run = measure(attempt)
        if run.failure or run.disturbance <= disturbed:
            break
        if attempt < retries:
            progress(f"  other programs took {100 * run.disturbance:.0f}% of a CPU; {again}")
    return run


# --------------------------------------------------------------------------- report


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def fmt_rate(value: float | None) -> str:
    return "failed" if value is None else f"{value:,.0f}"


def render(
    header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool, *,
    right: Collection[int] | None = None, strip: bool = True,
) -> list[str]:  # fmt: skip
    """A table's lines: Markdown with the columns in `right` right-aligned (default: all but
    the first), or plain text in padded columns (`strip`: no trailing spaces)."""
    columns = range(len(header))
    if markdown:
        aligned = set(columns[1:]) if right is None else set(right)
        out = ["| " + " | ".join(header) + " |"]
        out.append("|" + "|".join("---:" if i in aligned else "---" for i in columns) + "|")
        return out + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in columns]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, ["-" * w for w in widths], *rows]
    ]
    return [line.rstrip() for line in lines] if strip else lines


def render_report(
    header: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str], *,
    markdown: bool, right: Collection[int] | None = None,
) -> str:  # fmt: skip
    """The table (text lines keep their padding), a blank line, and the notes (bullets in
    Markdown)."""
    table = render(header, rows, markdown, right=right, strip=False)
    return "\n".join([*table, "", *(f"* {n}" if markdown else n for n in notes)]) + "\n"


# --------------------------------------------------------------------------- profile


def find_py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def under_py_spy(
    py_spy: str, pid: int, during: Callable[[], T], *, cpu: int, raw: Path, log_path: Path,
    threads: bool = False,
) -> T:  # fmt: skip
    """during() while py-spy records `pid` (only the thread holding the GIL) into `raw`."""
    argv = [
        "taskset", "-c", str(cpu), py_spy, "record", "--pid", str(pid),
        "--nonblocking", "--gil", *(["--threads"] if threads else []), "--rate", "250",
        "--format", "raw", "-o", str(raw),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        spy = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            time.sleep(1.0)  # py-spy attaching
            result = during()
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        finally:
            stop_process(spy)
    return result


def summarize_raw(raw: Path, top: int = 25) -> str:
    """Sample shares per function and per file from py-spy's collapsed stacks.

    Sampled with --gil: only the thread holding the GIL, so the shares are of
    the Python interpreter's time, not of waits (epoll, fsync, locks).
    """
    if not raw.exists():
        return "py-spy wrote no profile\n"
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[re.sub(r" \(\d+\)", "", frames[0])] += count
        # "name (path/file.py:line)" -> "name (path/file.py)": one row per function.
        funcs = [re.sub(r":\d+\)$", ")", f) for f in frames[1:]] or ["(no Python frame) (-)"]
        own[funcs[-1]] += count
        files[funcs[-1].rpartition(" (")[2].rstrip(")")] += count
        for func in set(funcs):
            inclusive[func] += count
    if not total:
        return "py-spy recorded no samples\n"

    def table(title: str, counter: collections.Counter[str]) -> list[str]:
        rows = [f"  {100 * n / total:5.1f}%  {name}" for name, n in counter.most_common(top)]
        return ["", title, *rows]

    lines = [f"{total} samples of the thread holding the GIL"]
    lines += table("by thread:", threads)
    lines += table(f"top {top} functions by own time:", own)
    lines += table(f"top {top} files by own time:", files)
    lines += table(f"top {top} functions by inclusive time:", inclusive)
    return "\n".join(lines) + "\n"
