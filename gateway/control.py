"""``gateway reload``: re-read routes.yaml in the running gateway and say how it went.

A SIGHUP alone cannot answer: the signal is sent whether or not the new file can
be put in force.  The running gateway therefore keeps a small status file in its
spool folder (its pid and the outcome of its last reload, rewritten after each
one); ``gateway reload`` sends the signal, waits for a reload that began after
it, prints its problems and exits 1 if it was refused.  Under systemd it is the
unit's ExecReload, so ``systemctl reload gateway`` fails when the reload does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "gateway.status"


def status_path(spool: str | Path) -> Path:
    return Path(spool) / STATUS_FILE


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Replace the status file in one step (a reader never sees half of it)."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(json.dumps(status) + "\n")
    os.replace(scratch, path)


def remove_status(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the file, signal the running gateway, wait for its verdict."""
    from gateway.cli import print_problems
    from gateway.config import ConfigError
    from gateway.service import load_checked

    try:
        config, _ = load_checked(args.config)
    except ConfigError as exc:
        # The gateway would refuse it too: say why, and leave it alone.
        print_problems(exc)
        print("the running gateway was not asked to reload; its routes stay", file=sys.stderr)
        return 1
    path = status_path(str(config.spool))
    status = read_status(path)
    pid = args.pid or (status or {}).get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _alive(pid):
        print(
            f"error: no running gateway found: {path} names none"
            + (f" (process {pid} is gone)" if isinstance(pid, int) and pid > 0 else "")
            + "; start it with 'gateway run'",
            file=sys.stderr,
        )
        return 1
    asked = time.time()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        status = read_status(path)
        last = (status or {}).get("last_reload")
        # A reload that began before the signal read the file before it: not ours.
        if isinstance(last, dict) and float(last.get("started", 0)) >= asked - 0.001:
            if last.get("ok"):
                print(f"reloaded: the gateway (process {pid}) runs the new {args.config}")
                return 0
            print(
                f"error: the gateway (process {pid}) refused the reload;"
                " the listeners and routes before it stay in force:",
                file=sys.stderr,
            )
            for problem in last.get("problems") or ["see its log"]:
                print(f"  {problem}", file=sys.stderr)
            return 1
        if not _alive(pid):
            print(f"error: the gateway (process {pid}) exited during the reload", file=sys.stderr)
            return 1
    print(
        f"error: the gateway (process {pid}) did not finish the reload within"
        f" {args.timeout:g}s; see its log",
        file=sys.stderr,
    )
    return 1
