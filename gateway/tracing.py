"""Live routing decisions for ``gateway trace``: who watches gets events, nobody pays otherwise.

The service and the delivery workers ask ``tracer.active`` before they build an
event; with no one watching it is False and nothing is built or kept.  Each
watcher has a filter (route, listener, a text to find) and a bounded backlog: a
watcher that cannot keep up loses events (and is told how many), the gateway
never waits for it.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Event = dict[str, Any]

BACKLOG = 1000  # events kept for one watcher that is slow to read


@dataclass
class Watcher:
    """One ``gateway trace``: its filter, and where its events go."""

    send: Callable[[Event], bool]  # False: it could not take the event now (slow reader)
    route: str = ""
    listener: str = ""
    match: str = ""
    dropped: int = 0
    backlog: deque[Event] = field(default_factory=deque)

    def wants(self, event: Mapping[str, Any]) -> bool:
        if self.route and self.route not in (event.get("routes") or [event.get("route")]):
            return False
        if self.listener and event.get("listener") != self.listener:
            return False
        return not self.match or self.match in json.dumps(event, ensure_ascii=False)


class Tracer:
    def __init__(self) -> None:
        self._watchers: list[Watcher] = []
        # A plain attribute, not a property: listeners read it for every DNS query.
        self.active = False

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Start sending events to ``watcher``; the returned function stops it."""
        self._watchers.append(watcher)
        self.active = True

        def stop() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)
            self.active = bool(self._watchers)

        return stop

    def emit(self, event_name: str, **fields: Any) -> None:
        if not self._watchers:
            return
        event: Event = {"at": round(time.time(), 3), "event": event_name, **fields}
        for watcher in list(self._watchers):
            if not watcher.wants(event):
                continue
            if watcher.backlog or not watcher.send(event):
                if len(watcher.backlog) >= BACKLOG:
                    watcher.dropped += 1
                else:
                    watcher.backlog.append(event)

    def flush(self, watcher: Watcher) -> None:
        """Send what waited for ``watcher`` once it can take more."""
        if watcher.dropped:
            notice = {"at": round(time.time(), 3), "event": "dropped", "count": watcher.dropped}
            if not watcher.send(notice):
                return
            watcher.dropped = 0
        while watcher.backlog:
            if not watcher.send(watcher.backlog[0]):
                return
            watcher.backlog.popleft()


def describe(event: Mapping[str, Any]) -> str:
    """One line for people: when, what, and the event's fields as key=value."""
    stamp = time.strftime("%H:%M:%S", time.localtime(float(event.get("at", 0))))
    skip = {"at", "event", "steps"}
    parts = []
    for key, value in event.items():
        if key in skip or value in ("", None, []):
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{key}={text}")
    line = f"{stamp} {event.get('event', '?')} " + " ".join(parts)
    steps = event.get("steps") or []
    return line + "".join(f"\n    {step}" for step in steps)


def cmd_trace(args: Any) -> int:
    """``gateway trace``: follow /trace of the running gateway's admin site."""
    import http.client
    import sys
    import urllib.parse

    from gateway.cli import print_problems
    from gateway.config import ConfigError, load, socket_address

    try:
        config = load(args.config)
    except ConfigError as exc:
        print_problems(exc)
        return 1
    address = socket_address(str(config.admin)) if config.admin else None
    if address is None or address[0] != "tcp":
        print(
            f"error: {args.config} has no admin site on a TCP port (admin: tcp:9100:interface="
            "127.0.0.1); gateway trace reads the routing decisions from it",
            file=sys.stderr,
        )
        return 1
    _, host, port = address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    query = urllib.parse.urlencode(
        {
            k: v
            for k, v in (("route", args.route), ("listener", args.listener), ("match", args.match))
            if v
        }
    )
    connection = http.client.HTTPConnection(host, int(port), timeout=None)
    try:
        connection.request("GET", "/trace" + (f"?{query}" if query else ""))
        answer = connection.getresponse()
        if answer.status != 200:
            print(
                f"error: the admin site answered {answer.status} {answer.reason}", file=sys.stderr
            )
            return 1
        print(f"tracing the gateway at {host}:{port} (Ctrl-C stops)", file=sys.stderr, flush=True)
        while True:
            line = answer.readline()
            if not line:
                print("the gateway closed the trace (it stopped?)", file=sys.stderr)
                return 1
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            print(json.dumps(event) if args.json else describe(event), flush=True)
    except OSError as exc:
        print(f"error: cannot reach the admin site at {host}:{port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        connection.close()
