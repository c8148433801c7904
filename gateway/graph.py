"""``gateway graph``: listeners -> routes -> destinations, as Graphviz DOT, SVG or Mermaid.

Listeners no route takes from and destinations no route sends to are drawn
dashed; a route that can never match, because an earlier route from the same
listeners takes everything (no match conditions, no ``continue``), is drawn in
red.  ``gateway check`` warns about the same things.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config import Config, Route, used_names


@dataclass(frozen=True)
class Shadowed:
    route: Route
    by: Route


def _conditions(route: Route) -> frozenset[tuple[str, str]]:
    """A route's match conditions as (key, value in routes.yaml's words)."""
    m = route.match
    found = set()
    if m.client:
        found.add(("client", _value_text(m.client)))
    if m.authenticated is not None:
        found.add(("authenticated", str(m.authenticated)))
    if m.user:
        found.add(("user", _value_text(m.user)))
    for key, value in m.values.items():
        if key == "file_names":
            continue  # read from qname_file, which is a condition itself
        if isinstance(value, Mapping):  # header: each field's pattern must match
            found.update((f"{key}.{k.lower()}", _value_text(v)) for k, v in value.items())
        else:
            found.add((key, _value_text(value)))
    return frozenset(found)


def shadowed_routes(routes: tuple[Route, ...]) -> list[Shadowed]:
    """Routes no message can reach: for every listener they take from, an earlier route
    without ``continue`` takes everything they would, because its conditions are some of
    theirs, written the same (no conditions at all: it takes everything)."""
    found = []
    earlier: dict[str, list[tuple[Route, frozenset[tuple[str, str]]]]] = {}
    for route in routes:
        conditions = _conditions(route)
        blockers = [
            next((r for r, c in earlier.get(name, ()) if c <= conditions), None)
            for name in route.from_
        ]
        first = blockers[0] if blockers else None
        if first is not None and all(b is not None for b in blockers):
            found.append(Shadowed(route, first))
        if not route.continue_:
            for name in route.from_:
                earlier.setdefault(name, []).append((route, conditions))
    return found


def _value_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    net = getattr(value, "net", None)  # a Network
    if net is not None:
        return str(net)
    return str(getattr(value, "text", None) or value)


def match_text(route: Route) -> str:
    """A route's conditions in routes.yaml's words, one line."""
    m = route.match
    parts = []
    if m.client:
        parts.append(f"client: {_value_text(m.client)}")
    if m.authenticated is not None:
        parts.append(f"authenticated: {str(m.authenticated).lower()}")
    if m.user:
        parts.append(f"user: {_value_text(m.user)}")
    for key, value in m.values.items():
        if key == "file_names":
            continue  # the names read from qname_file, which is shown itself
        parts.append(f"{key}: {_value_text(value)}")
    return ", ".join(parts) or "everything"


def _label(route: Route) -> list[str]:
    lines = [route.name, f"match {match_text(route)}"]
    if route.transforms:
        lines.append("transforms: " + ", ".join(route.transforms))
    for key in ("answer", "action"):
        if route.values.get(key):
            lines.append(f"{key}: {_value_text(route.values[key])}")
    if route.continue_:
        lines.append("continue")
    return lines


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def dot(config: Config) -> str:
    """The routes as a Graphviz digraph, left to right."""
    used_from, used_to = used_names(config)
    shadowed = {id(s.route): s for s in shadowed_routes(config.routes)}
    out = [
        "digraph gateway {",
        "  rankdir=LR;",
        '  node [fontname="sans-serif", fontsize=10];',
        '  edge [color="#555555"];',
    ]
    out.append('  subgraph cluster_listeners { label="listeners"; style=invis;')
    for name, lc in config.listeners.items():
        style = "" if name in used_from else ', style=dashed, color="#999999"'
        note = "" if name in used_from else "\n(no route takes from it)"
        out.append(
            f"    {_dot_quote('l:' + name)} [shape=box, label="
            f"{_dot_quote(f'{name} ({lc.protocol})' + note)}{style}];"
        )
    out.append("  }")
    for index, route in enumerate(config.routes):
        rid = _dot_quote(f"r:{index}")
        label = "\n".join(_label(route))
        extra = ""
        blocked = shadowed.get(id(route))
        if blocked is not None:
            label += f"\n(never matches: route '{blocked.by.name}' takes everything first)"
            extra = ', color="#cc0000", fontcolor="#cc0000"'
        out.append(f"  {rid} [shape=ellipse, label={_dot_quote(label)}{extra}];")
        for name in route.from_:
            out.append(f"  {_dot_quote('l:' + name)} -> {rid};")
        for name in route.to:
            out.append(f"  {rid} -> {_dot_quote('d:' + name)};")
    out.append('  subgraph cluster_destinations { label="destinations"; style=invis;')
    for name, dc in config.destinations.items():
        style = "" if name in used_to else ', style=dashed, color="#999999"'
        note = "" if name in used_to else "\n(no route sends to it)"
        out.append(
            f"    {_dot_quote('d:' + name)} [shape=box, label="
            f"{_dot_quote(f'{name} ({dc.protocol})' + note)}{style}];"
        )
    out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def _mermaid_text(text: str) -> str:
    # Mermaid labels in double quotes: entity codes for quotes and angle brackets (a
    # regex's (?P<name>) is not an HTML tag), "<br>" for new lines.
    for char, code in (('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, code)
    return text.replace("\n", "<br>")


def mermaid(config: Config) -> str:
    """The routes as a Mermaid flowchart, for README files."""
    used_from, used_to = used_names(config)
    shadowed = {id(s.route): s for s in shadowed_routes(config.routes)}

    def node_id(prefix: str, name: str) -> str:
        return prefix + re.sub(r"[^A-Za-z0-9_]", "_", name)

    out = ["flowchart LR"]
    for name, lc in config.listeners.items():
        note = "" if name in used_from else "\n(no route takes from it)"
        out.append(f'  {node_id("l_", name)}["{_mermaid_text(f"{name} ({lc.protocol})" + note)}"]')
    for index, route in enumerate(config.routes):
        label = "\n".join(_label(route))
        blocked = shadowed.get(id(route))
        if blocked is not None:
            label += f"\n(never matches: route '{blocked.by.name}' takes everything first)"
        out.append(f'  r{index}(["{_mermaid_text(label)}"])')
        for name in route.from_:
            out.append(f"  {node_id('l_', name)} --> r{index}")
        for name in route.to:
            out.append(f"  r{index} --> {node_id('d_', name)}")
        if blocked is not None:
            out.append(f"  class r{index} never")
    for name, dc in config.destinations.items():
        note = "" if name in used_to else "\n(no route sends to it)"
        out.append(f'  {node_id("d_", name)}["{_mermaid_text(f"{name} ({dc.protocol})" + note)}"]')
    for name in config.listeners:
        if name not in used_from:
            out.append(f"  class {node_id('l_', name)} unused")
    for name in config.destinations:
        if name not in used_to:
            out.append(f"  class {node_id('d_', name)} unused")
    out.append("  classDef unused stroke-dasharray: 5 5, color:#999999")
    out.append("  classDef never stroke:#cc0000, color:#cc0000")
    return "\n".join(out) + "\n"


class GraphvizMissing(Exception):
    """SVG was asked for and Graphviz's dot is not there (or failed); says what to do."""


def svg(config: Config) -> str:
    """SVG drawn by Graphviz's ``dot``; GraphvizMissing when it is not installed."""
    program = shutil.which("dot")
    if program is None:
        raise GraphvizMissing(
            "drawing SVG needs Graphviz's 'dot' program: install it (apt-get install"
            " graphviz), or print DOT (--format dot) or Mermaid (--format mermaid)"
        )
    done = subprocess.run(
        [program, "-Tsvg"],
        input=dot(config),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise GraphvizMissing(f"dot failed: {done.stderr.strip()}")
    return done.stdout
