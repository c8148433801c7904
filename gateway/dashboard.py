"""The admin dashboard at ``/`` of the admin site: what the gateway is and does, for people.

Server-rendered HTML that needs no script for anything but the live trace (an
EventSource on /trace), and fetches nothing from anywhere else: the picture of
the routes (Graphviz's SVG when ``dot`` is installed, else the DOT text), the
configuration in force and the last reload, the counters per route and per
destination since start with a chart of the last hour (inline SVG, a bar a
minute), the queue and the dead letters, and the live trace.  Signed in with
the admin token (see gateway.admin_auth), one may show, retry and drop deliveries.
"""

from __future__ import annotations

import hashlib
import html
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from gateway import __version__
from gateway.graph import GraphvizMissing, dot, svg
from gateway.history import MINUTES
from gateway.history import Key as HistoryKey
from gateway.queue_cli import human_duration, one_line, show_fields
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
svg.chart .ok { fill: #4a8; } svg.chart .dup { fill: #9ab; } svg.chart .warn { fill: #e90; }
svg.chart .bad { fill: #c33; } svg.chart .axis { stroke: #bbb; }
form.act { display: inline; margin-right: .3em; } table.fields th { text-align: right; }
#notice { background: #eef6ee; padding: .4em; } #refusal { font-weight: bold; }
#trace { font-family: monospace; font-size: 12px; max-height: 24em; overflow: auto;
         list-style: none; padding: 0; } .bad { color: #b00; }
"""

_SCRIPT = """
(function () {
  var list = document.getElementById("trace");
  var note = document.getElementById("trace-state");
  if (!window.EventSource) { note.textContent = "this browser cannot follow the trace"; return; }
  var source = null;
  // A page left (or kept in the back-forward cache) lets its stream go: a browser opens
  // only six connections to one server, and streams nobody reads would take them all.
  window.addEventListener("pagehide", function () { if (source) source.close(); source = null; });
  window.addEventListener("pageshow", function () { if (!source) follow(); });
  function follow() {
    source = new EventSource("/trace");
    source.onopen = function () { note.textContent = "following"; };
    source.onerror = function () { note.textContent = "reconnecting..."; };
    source.onmessage = show;
  }
  function show(message) {
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
  }
})();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


class Raw(str):
    """Markup made here, put in a table cell as it is."""


def _cell(value: object, numeric: bool) -> str:
    inner = value if isinstance(value, Raw) else _e(value)
    return f'<td class="n">{inner}</td>' if numeric else f"<td>{inner}</td>"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(_cell(c, i in numeric) for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    if not body:
        return "<p>none</p>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# A chart's parts: the per-minute counts, the CSS class that colours them, their name.
Part = tuple[list[int], str, str]
_BAR, _HEIGHT = 4, 28  # pixels


def chart(parts: Sequence[Part], what: str) -> Raw:
    """The last hour as 60 stacked bars, one per minute (the last is the minute now
    running), as inline SVG: no script, and nothing fetched."""
    minutes = len(parts[0][0]) if parts else 0
    sums = [sum(p[0][i] for p in parts) for i in range(minutes)]
    peak = max(sums, default=0)
    total = sum(sums)
    names = ", ".join(f"{sum(v)} {name}" for v, _, name in parts)
    label = f"{what}, last hour: {names}; at most {peak} a minute"
    bars = []
    for i in range(minutes):
        if not sums[i]:
            continue
        ago = minutes - 1 - i
        when = "this minute" if ago == 0 else f"{ago} min ago"
        tip = f"{when}: " + ", ".join(f"{v[i]} {name}" for v, _, name in parts if v[i])
        y = float(_HEIGHT)
        rects = []
        for values, css, _ in parts:
            if values[i]:
                h = max(1.0, values[i] / peak * _HEIGHT)
                y -= h
                x = i * (_BAR + 1)
                rects.append(
                    f'<rect class="{css}" x="{x}" y="{y:.1f}" width="{_BAR}" height="{h:.1f}"/>'
                )
        bars.append(f"<g><title>{_e(tip)}</title>{''.join(rects)}</g>")
    width = minutes * (_BAR + 1)
    return Raw(
        f'<svg class="chart" role="img" width="{width}" height="{_HEIGHT + 2}"'
        f' viewBox="0 0 {width} {_HEIGHT + 2}" data-total="{total}" aria-label="{_e(label)}">'
        f'<line class="axis" x1="0" y1="{_HEIGHT + 1}" x2="{width}" y2="{_HEIGHT + 1}"/>'
        f"{''.join(bars)}</svg>"
    )


@dataclass
class Viewer:
    """Who looks at the page: may they act on the queue, and with which CSRF value."""

    actions: bool = False  # the configuration has an admin token
    csrf: str = ""  # signed in: the value each form carries
    notice: str = ""  # what the last action did

    @property
    def signed_in(self) -> bool:
        return bool(self.csrf)


def _action(path: str, delivery_id: str, label: str, viewer: Viewer) -> str:
    return (
        f'<form method="post" action="{path}" class="act">'
        f'<input type="hidden" name="id" value="{_e(delivery_id)}">'
        f'<input type="hidden" name="csrf" value="{_e(viewer.csrf)}">'
        f'<button type="submit" name="do" value="{_e(delivery_id)}">{_e(label)}</button></form>'
    )


def actions(delivery_id: str, viewer: Viewer) -> Raw:
    return Raw(
        _action("/queue/retry", delivery_id, "retry", viewer)
        + _action("/queue/drop", delivery_id, "drop", viewer)
    )


def _sign_in_box(viewer: Viewer) -> str:
    if not viewer.actions:
        return (
            "<p>Showing, retrying and dropping deliveries here is off: set"
            " <code>admin_token_file</code> in routes.yaml (then <code>gateway reload</code>);"
            " <code>gateway queue show|retry|drop ID</code> does it from a shell.</p>"
        )
    if viewer.signed_in:
        return (
            '<form method="post" action="/sign-out" id="sign-out" class="act">Signed in:'
            " show, retry and drop below. "
            f'<input type="hidden" name="csrf" value="{_e(viewer.csrf)}">'
            '<button type="submit">sign out</button></form>'
        )
    return (
        '<form method="post" action="/sign-in" id="sign-in">'
        "Showing, retrying and dropping deliveries needs the admin token"
        " (the file <code>admin_token_file</code> names): "
        '<input type="password" name="token" autocomplete="current-password" required'
        ' aria-label="admin token"> <button type="submit">sign in</button></form>'
    )


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


def _deliveries(entries: list[Delivery], dead: bool, viewer: Viewer) -> str:
    now = time.time()
    rows = [
        (
            Raw(f'<a href="/queue/{quote(d.id)}">{_e(d.id)}</a>') if viewer.signed_in else d.id,
            human_duration(now - d.created),
            d.route,
            d.destination,
            ",".join(d.recipients) or "-",
            d.attempts,
            one_line(d.last_error)[:200],
            *([actions(d.id, viewer)] if viewer.signed_in else []),
        )
        for d in entries[:LISTED]
    ]
    header = ["ID", "AGE", "ROUTE", "DESTINATION", "TO", "ATTEMPTS", "LAST ERROR"]
    if viewer.signed_in:
        header.append("")
    more = f"<p>and {len(entries) - LISTED} more</p>" if len(entries) > LISTED else ""
    what = "dead letters" if dead else "waiting deliveries"
    return f"<p>{len(entries)} {what}</p>" + _table(header, rows, {5}) + more


# (counter's outcome, CSS class, what the chart calls it)
_ROUTE_PARTS = (
    ("queued", "ok", "queued"),
    ("rejected", "warn", "rejected"),
    ("failed", "bad", "failed"),
)
_DESTINATION_PARTS = (
    ("delivered", "ok", "delivered"),
    ("duplicate", "dup", "duplicate"),
    ("temporary", "warn", "temporary"),
    ("permanent", "bad", "refused"),
)


def _charts(name: str, side: str, parts: Sequence[tuple[str, str, str]],
            series: dict[HistoryKey, list[int]]) -> Raw:  # fmt: skip
    zero = [0] * MINUTES
    return chart([(series.get((side, name, key), zero), css, label) for key, css, label in parts],
                 f"{side} {name}")  # fmt: skip


async def render(gateway: GatewayService, picture: Picture, viewer: Viewer) -> bytes:
    runtime = gateway.current()
    config = runtime.config
    try:
        digest = hashlib.sha256(gateway.path.read_bytes()).hexdigest()[:16]
    except OSError:
        digest = "-"
    series = gateway.history.series() if gateway.history is not None else {}
    routes = sorted({route for route, _ in gateway.routed} | {r.name for r in config.routes})
    route_rows = [
        (
            name,
            *(gateway.routed.get((name, key), 0) for key, _, _ in _ROUTE_PARTS),
            _charts(name, "route", _ROUTE_PARTS, series),
        )
        for name in routes
    ]
    dest_rows = []
    delivery = gateway.delivery
    if delivery is not None:
        counts = delivery.counters.by_destination
        names = sorted({d for d, _ in counts} | set(config.destinations))
        dest_rows = [
            (
                name,
                *(counts.get((name, key), 0) for key, _, _ in _DESTINATION_PARTS),
                _charts(name, "destination", _DESTINATION_PARTS, series),
            )
            for name in names
        ]
    queued: list[Delivery] = []
    dead: list[Delivery] = []
    if gateway.spool is not None:
        queued = await gateway.spool.entries(QUEUED)
        dead = await gateway.spool.entries(DEAD)
    drawing = await picture.html(config, gateway.reactor)
    route_header = ["ROUTE", "QUEUED", "REJECTED", "FAILED", "LAST HOUR"]
    route_table = _table(route_header, route_rows, {1, 2, 3})
    dest_header = ["DESTINATION", "DELIVERED", "DUPLICATE", "TEMPORARY", "REFUSED", "LAST HOUR"]
    dest_table = _table(dest_header, dest_rows, {1, 2, 3, 4})
    problems = gateway.readiness_problems()
    state = "ready" if not problems else "not ready: " + "; ".join(problems)
    notice = f'<p id="notice" role="status">{_e(viewer.notice)}</p>' if viewer.notice else ""
    body = f"""{notice}
<p id="state" class="{"" if not problems else "bad"}">{_e(state)}</p>
<p id="configuration">{_e(gateway.path.resolve())} (sha256 {_e(digest)}):
{len(config.listeners)} listeners, {len(config.destinations)} destinations,
{len(config.routes)} routes<br>{_e(gateway.configuration_line())}</p>
<h2>Routes</h2><div class="picture" id="picture">{drawing}</div>
<h2>Messages per route (since start; the chart: per minute, last hour)</h2>
<div id="routes">{route_table}</div>
<h2>Deliveries per destination (since start; the chart: per minute, last hour)</h2>
<div id="destinations">{dest_table}</div>
<h2 id="queue-title">Queue</h2><div id="account">{_sign_in_box(viewer)}</div>
<div id="queue">{_deliveries(queued, False, viewer)}</div>
<h2>Dead letters</h2><div id="dead">{_deliveries(dead, True, viewer)}</div>
<h2>Live trace <small id="trace-state">(needs JavaScript)</small></h2>
<noscript><p>The live trace needs JavaScript; <code>gateway trace</code> shows the same in a
terminal.</p></noscript>
<ul id="trace"></ul>
<script>{_SCRIPT}</script>
"""
    return _page(f"gateway {__version__}", body)


def _page(title: str, body: str) -> bytes:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{_e(title)}</title><link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head><body>
<h1>{_e(title)}</h1>
{body}
</body></html>
""".encode()


def _fields(fields: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in fields)
    return f'<table class="fields">{rows}</table>'


def render_show(record: Mapping[str, Any], missing: str, viewer: Viewer) -> bytes:
    """One message and its deliveries, as ``gateway queue show`` prints them."""
    head, deliveries = show_fields(record, time.time())
    parts = [_fields(head)]
    for delivery_id, fields, history in deliveries:
        parts.append(f"<h2>delivery {_e(delivery_id)}</h2>{_fields(fields)}")
        parts.append(actions(delivery_id, viewer))
        parts.append("<h3>history</h3>" + _fields(history))
    described = record["message"]
    header = described["header"] if described else ""
    parts.append(f"<h2>header</h2><pre>{_e(header)}</pre>")
    if missing:
        parts.append(f'<p class="bad">{_e(missing)}</p>')
    parts.append('<p><a href="/#queue-title">back to the dashboard</a></p>')
    return _page(f"message {record['queue_id']}", "".join(parts))


def render_refusal(status: int, reason: str) -> bytes:
    """The page of a refused action: what went wrong and the way back."""
    body = (
        f'<p class="bad" id="refusal">{status}: {_e(reason)}</p>'
        '<p><a href="/#queue-title">back to the dashboard</a></p>'
    )
    return _page("not done", body)
