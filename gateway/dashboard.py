"""The admin dashboard at ``/`` of the admin site: what the gateway is and does, for people.

Server-rendered HTML that needs no script for anything but the live trace (an
EventSource on /trace), and fetches nothing from anywhere else: the picture of
the routes (Graphviz's SVG when ``dot`` is installed, else the DOT text), the
configuration in force and the last reload, the counters per route and per
destination since start, the queue and the dead letters, and the live trace.
"""

from __future__ import annotations

import hashlib
import html
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.graph import GraphvizMissing, dot, svg
from gateway.queue_cli import human_duration, one_line
from gateway.spool import DEAD, QUEUED, Delivery

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.service import GatewayService

LISTED = 50  # deliveries shown per table; the rest are counted

_STYLE = """
body { font: 14px/1.4 sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
th { border-bottom: 1px solid #999; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.picture svg { max-width: 100%; height: auto; } pre { background: #f4f4f4; padding: .5em; }
#trace { font-family: monospace; font-size: 12px; max-height: 24em; overflow: auto;
         list-style: none; padding: 0; } .bad { color: #b00; }
"""

_SCRIPT = """
(function () {
  var list = document.getElementById("trace");
  var note = document.getElementById("trace-state");
  if (!window.EventSource) { note.textContent = "this browser cannot follow the trace"; return; }
  var source = new EventSource("/trace");
  source.onopen = function () { note.textContent = "following"; };
  source.onerror = function () { note.textContent = "reconnecting..."; };
  source.onmessage = function (message) {
    var event = JSON.parse(message.data);
    var item = document.createElement("li");
    var when = new Date(event.at * 1000).toLocaleTimeString();
    var fields = [];
    for (var key in event) {
      if (key === "at" || key === "event" || key === "steps") continue;
      var value = event[key];
      if (value === "" || value === null || (Array.isArray(value) && !value.length)) continue;
      fields.push(key + "=" + (Array.isArray(value) ? value.join(",") : value));
    }
    item.textContent = when + " " + event.event + " " + fields.join(" ");
    item.className = "event-" + event.event;
    if (/refused|dead|tempfail/.test(String(event.outcome || event.action || ""))) {
      item.className += " bad";
    }
    list.insertBefore(item, list.firstChild);
    while (list.children.length > 200) list.removeChild(list.lastChild);
  };
})();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        return "<p>none</p>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Picture:
    """The routes drawn once per configuration (dot takes tens of milliseconds)."""

    def __init__(self) -> None:
        self._for: Config | None = None
        self._html = ""

    async def html(self, config: Config, reactor: Any) -> str:
        if config is not self._for:
            from twisted.internet import threads

            # dot runs in a thread: the event loop does not wait for the drawing.
            self._html = await threads.deferToThreadPool(
                reactor, reactor.getThreadPool(), _draw, config
            )
            self._for = config
        return self._html


def _draw(config: Config) -> str:
    try:
        drawn = svg(config)
        return drawn[drawn.find("<svg") :]
    except GraphvizMissing as exc:
        return f"<p>{_e(exc)}</p><pre>{_e(dot(config))}</pre>"


def _deliveries(entries: list[Delivery], dead: bool) -> str:
    now = time.time()
    rows = [
        (
            d.id,
            human_duration(now - d.created),
            d.route,
            d.destination,
            ",".join(d.recipients) or "-",
            d.attempts,
            one_line(d.last_error)[:200],
        )
        for d in entries[:LISTED]
    ]
    header = ["ID", "AGE", "ROUTE", "DESTINATION", "TO", "ATTEMPTS", "LAST ERROR"]
    more = f"<p>and {len(entries) - LISTED} more</p>" if len(entries) > LISTED else ""
    what = "dead letters" if dead else "waiting deliveries"
    return f"<p>{len(entries)} {what}</p>" + _table(header, rows, {5}) + more


async def render(gateway: GatewayService, picture: Picture) -> bytes:
    runtime = gateway.current()
    config = runtime.config
    try:
        digest = hashlib.sha256(gateway.path.read_bytes()).hexdigest()[:16]
    except OSError:
        digest = "-"
    routes = sorted({route for route, _ in gateway.routed} | {r.name for r in config.routes})
    outcomes = ("queued", "rejected", "failed")
    route_rows = [(name, *(gateway.routed.get((name, o), 0) for o in outcomes)) for name in routes]
    dest_rows = []
    delivery = gateway.delivery
    if delivery is not None:
        counts = delivery.counters.by_destination
        names = sorted({d for d, _ in counts} | set(config.destinations))
        kinds = ("delivered", "temporary", "permanent", "duplicate")
        dest_rows = [(name, *(counts.get((name, k), 0) for k in kinds)) for name in names]
    queued: list[Delivery] = []
    dead: list[Delivery] = []
    if gateway.spool is not None:
        queued = await gateway.spool.entries(QUEUED)
        dead = await gateway.spool.entries(DEAD)
    drawing = await picture.html(config, gateway.reactor)
    dest_header = ["DESTINATION", "DELIVERED", "TEMPORARY", "REFUSED", "DUPLICATE"]
    dest_table = _table(dest_header, dest_rows, {1, 2, 3, 4})
    problems = gateway.readiness_problems()
    state = "ready" if not problems else "not ready: " + "; ".join(problems)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>gateway {_e(__version__)}</title><link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head><body>
<h1>gateway {_e(__version__)}</h1>
<p id="state" class="{"" if not problems else "bad"}">{_e(state)}</p>
<p id="configuration">{_e(gateway.path.resolve())} (sha256 {_e(digest)}):
{len(config.listeners)} listeners, {len(config.destinations)} destinations,
{len(config.routes)} routes<br>{_e(gateway.configuration_line())}</p>
<h2>Routes</h2><div class="picture" id="picture">{drawing}</div>
<h2>Messages per route since start</h2>
<div id="routes">{_table(["ROUTE", "QUEUED", "REJECTED", "FAILED"], route_rows, {1, 2, 3})}</div>
<h2>Deliveries per destination since start</h2>
<div id="destinations">{dest_table}</div>
<h2>Queue</h2><div id="queue">{_deliveries(queued, False)}</div>
<h2>Dead letters</h2><div id="dead">{_deliveries(dead, True)}</div>
<p>Retry or drop them with <code>gateway queue retry|drop ID</code>.</p>
<h2>Live trace <small id="trace-state">(needs JavaScript)</small></h2>
<noscript><p>The live trace needs JavaScript; <code>gateway trace</code> shows the same in a
terminal.</p></noscript>
<ul id="trace"></ul>
<script>{_SCRIPT}</script>
</body></html>
"""
    return page.encode("utf-8")
