"""Run the gateway as ``gateway run`` does, and print its spool counters on SIGUSR1.

The benchmark starts the gateway through this file instead of ``python -m
gateway`` only to read the spool's group-commit counters (which the gateway
keeps but does not log) without changing gateway code. Everything else is the
ordinary ``gateway.cli.main``.
"""

from __future__ import annotations

import gc
import signal
import sys
from types import FrameType

MARK = "bench-counters:"


def _dump(signum: int, frame: FrameType | None) -> None:
    # Looked up at signal time, so the gateway's own start-up is untouched.
    fields: dict[str, int] = {}
    try:
        from gateway.delivery import DeliveryManager
        from gateway.spool import SqliteSpool
    except ImportError as exc:
        print(f"{MARK} unavailable ({exc})", file=sys.stderr, flush=True)
        return
    # `gateway run` freezes what start-up built (gc.freeze), and get_objects() does not
    # see frozen objects: thaw them to look, then freeze again. (That also freezes what
    # was allocated since start-up, which later collections then skip; a cycle among
    # those is never freed. Harmless for the length of a benchmark.)
    frozen = gc.get_freeze_count()
    if frozen:
        gc.unfreeze()
    try:
        objects = gc.get_objects()
    finally:
        if frozen:
            gc.freeze()
    for obj in objects:
        if isinstance(obj, SqliteSpool):
            fields["commits"] = fields.get("commits", 0) + int(getattr(obj, "commits", 0))
            fields["writes"] = fields.get("writes", 0) + int(getattr(obj, "writes", 0))
        elif isinstance(obj, DeliveryManager):
            counters = obj.counters
            for name in ("delivered", "deferred", "dead", "duplicates"):
                fields[name] = fields.get(name, 0) + int(getattr(counters, name, 0))
    text = " ".join(f"{k}={v}" for k, v in sorted(fields.items())) or "unavailable (no spool)"
    print(f"{MARK} {text}", file=sys.stderr, flush=True)


def main() -> int:
    signal.signal(signal.SIGUSR1, _dump)
    from gateway.cli import main as gateway_main

    return gateway_main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
