"""The router: which routes a message takes, and the transforms applied on the way.

Routes are tried in file order and the first that matches wins, unless it says
``continue: true``, in which case later routes may match as well (fan-out).
Mail is routed per recipient, like an MTA does: recipients that take the same
route with the same named groups travel together as one copy.  A route with a
transform registered ``one_copy=True`` (``mail_to_news``) takes all its
recipients in one copy, their option values joined (a crosspost).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from twisted.logger import Logger

from gateway.config import (
    BaseDestinationConfig,
    Config,
    Problem,
    Route,
    client_allowed,
    interpolate,
    suggest,
)
from gateway.message import HttpRequest, Kind, MailMessage, Message
from gateway.plugins import Reject, Transforms, call_transform

log = Logger(namespace="gateway.routing")


class NoRoute(Exception):
    """No route takes this message (or these recipients)."""

    def __init__(self, message: str, recipients: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.recipients = recipients


class TransformFailed(Exception):
    """A transform raised or returned nonsense; only this message fails."""

    def __init__(self, route: str, transform: str, error: BaseException) -> None:
        super().__init__(
            f"transform '{transform}' of route '{route}' failed: {type(error).__name__}: {error}"
        )
        self.route = route
        self.transform = transform
        self.error = error

    @property
    def rejected(self) -> Reject | None:
        """The Reject the transform raised: the message is refused for good, not retried."""
        return self.error if isinstance(self.error, Reject) else None


@dataclass(frozen=True)
class Routed:
    """One message ready for its destinations, as a route left it."""

    route: Route
    message: Message
    destinations: tuple[str, ...]


@dataclass
class Trace:
    """What happened while routing, for ``gateway route --dry-run``."""

    steps: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.steps.append(text)


def _search_groups(pattern: Any, value: str, groups: dict[str, str]) -> bool:
    found = pattern.compiled.search(value)
    if found is None:
        return False
    groups.update({k: v for k, v in found.groupdict().items() if v is not None})
    return True


def join_option_values(values: Sequence[Any]) -> Any:
    """One option value for recipients that travel as one copy, from each one's value.

    Equal values stay as they are; differing strings become their distinct
    values joined with "," in recipient order ("g1,g2"); lists become their
    distinct items in order; mappings are joined key by key.
    """
    first = values[0]
    if all(v == first for v in values[1:]):
        return first
    if all(isinstance(v, Mapping) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return MappingProxyType(
            {k: join_option_values([v[k] for v in values if k in v]) for k in keys}
        )
    if all(isinstance(v, (tuple, list)) for v in values):
        items: list[Any] = []
        for value in values:
            items.extend(item for item in value if item not in items)
        return tuple(items)
    if all(isinstance(v, str) for v in values):
        return ",".join(dict.fromkeys(values))
    # Placeholders only ever change strings, so the shapes agree; keep the first if not.
    return first


@dataclass(frozen=True)
class _Copy:
    """Recipients of one route that travel as one copy, and their distinct named groups."""

    route: Route
    groups: tuple[dict[str, str], ...]
    recipients: tuple[str, ...]
    one_copy: str | None  # the transform that asked for one copy, if one did


# A route and its named groups, or the route alone when all its recipients go as one copy.
_CopyKey = tuple[int, tuple[tuple[str, str], ...] | None]


class Router:
    """Routes of one configuration, indexed by listener; immutable once built."""

    def __init__(self, config: Config, transforms: Transforms) -> None:
        self.config = config
        self.transforms = transforms
        by_listener: dict[str, list[Route]] = {name: [] for name in config.listeners}
        for route in config.routes:
            for name in route.from_:
                by_listener.setdefault(name, []).append(route)
        self._routes = {name: tuple(routes) for name, routes in by_listener.items()}

    def routes_for(self, listener: str) -> tuple[Route, ...]:
        return self._routes.get(listener, ())

    # --- matching -------------------------------------------------------------

    def _match(
        self, route: Route, msg: Message, rcpt: str | None, *, headers: bool = True
    ) -> dict[str, str] | None:
        m = route.match
        if m.client and not client_allowed(m.client, msg.client):
            return None
        groups: dict[str, str] = {}
        if isinstance(msg, MailMessage):
            if m.sender is not None and not _search_groups(m.sender, msg.sender, groups):
                return None
            if m.rcpt is not None and not _search_groups(m.rcpt, rcpt or "", groups):
                return None
        if isinstance(msg, HttpRequest):
            http_fields = msg.http_headers

            def values(name: str) -> list[str]:
                wanted = name.lower()
                return [v for k, v in http_fields if k.lower() == wanted]

            return http_match(m, msg.method, msg.host, msg.target, values, groups)
        if headers and m.header:
            fields = getattr(msg, "headers", None)
            if fields is None:
                return None
            for name, pattern in m.header.items():
                if not any(_search_groups(pattern, v, groups) for v in fields.get_all(name)):
                    return None
        return groups

    def _walk(
        self, msg: Message, rcpt: str | None, *, headers: bool = True
    ) -> list[tuple[Route, dict[str, str]]]:
        found = []
        for route in self.routes_for(msg.listener):
            groups = self._match(route, msg, rcpt, headers=headers)
            if groups is None:
                continue
            found.append((route, groups))
            if not route.continue_:
                break
        return found

    def accepts_recipient(self, listener: str, sender: str, rcpt: str, client: str) -> bool:
        """Whether some route could take this recipient (before the header is known).

        Used at RCPT time so the gateway never accepts mail it has nowhere to send:
        it is not an open relay.
        """
        probe = MailMessage(listener=listener, client=client, sender=sender, recipients=(rcpt,))
        return bool(self._walk(probe, rcpt, headers=False))

    def _one_copy(self, route: Route) -> str | None:
        """The first transform of ``route`` registered with ``one_copy=True``, or None."""
        for name in route.transforms:
            spec = self.transforms.get(name)
            if spec is not None and spec.one_copy:
                return name
        return None

    def match(self, msg: Message) -> list[tuple[Route, dict[str, str], tuple[str, ...]]]:
        """The routes ``msg`` takes: (route, named groups, recipients) in route order.

        Mail recipients of a route travel as one copy when their named groups
        are equal, or always when a transform of the route is registered with
        ``one_copy=True``; the groups of such a copy are the distinct values of
        each joined with ",".  Raises NoRoute naming the recipients no route takes.
        """
        return [
            (c.route, dict(join_option_values(c.groups)), c.recipients)
            for c in self._copies(msg)
        ]

    def _copies(self, msg: Message) -> list[_Copy]:
        if isinstance(msg, MailMessage):
            grouped: dict[_CopyKey, list[str]] = {}
            group_sets: dict[_CopyKey, list[dict[str, str]]] = {}
            routes: dict[int, Route] = {}
            unrouted = []
            for rcpt in msg.recipients:
                walked = self._walk(msg, rcpt)
                if not walked:
                    unrouted.append(rcpt)
                for route, groups in walked:
                    one = self._one_copy(route) is not None
                    key: _CopyKey = (id(route), None if one else tuple(sorted(groups.items())))
                    routes[id(route)] = route
                    grouped.setdefault(key, []).append(rcpt)
                    sets = group_sets.setdefault(key, [])
                    if groups not in sets:
                        sets.append(groups)
            if unrouted:
                raise NoRoute(f"no route takes recipient(s) {', '.join(unrouted)}", tuple(unrouted))
            order = {id(r): i for i, r in enumerate(self.routes_for(msg.listener))}
            return [
                _Copy(
                    routes[key[0]],
                    tuple(dict(g) for g in group_sets[key]),
                    tuple(rcpts),
                    self._one_copy(routes[key[0]]),
                )
                for key, rcpts in sorted(grouped.items(), key=lambda kv: order[kv[0][0]])
            ]
        walked = self._walk(msg, None)
        if not walked:
            raise NoRoute(f"no route takes this {msg.kind} message from '{msg.listener}'")
        return [_Copy(route, (groups,), (), None) for route, groups in walked]

    # --- transforming -----------------------------------------------------------

    async def route(self, msg: Message, trace: Trace | None = None) -> list[Routed]:
        """Match, then run each matching route's transforms; raise NoRoute or TransformFailed."""
        out: list[Routed] = []
        for copy in self._copies(msg):
            route, rcpts = copy.route, copy.recipients
            current: Message = msg
            if isinstance(msg, MailMessage) and rcpts != msg.recipients:
                current = msg.with_recipients(rcpts)
            each = [interpolate(route.options, groups) for groups in copy.groups]
            options = join_option_values(each)
            if trace is not None:
                detail = f" for {', '.join(rcpts)}" if rcpts else ""
                if copy.one_copy is not None and len(rcpts) > 1:
                    detail += f" as one copy (transform '{copy.one_copy}')"
                named = ", ".join(str(g) for g in copy.groups if g) or "{}"
                trace.add(f"route '{route.name}' matches{detail}; named groups {named}")
                joined = [
                    f"{name} {value!r}"
                    for name, value in options.items()
                    if len(each) > 1 and any(o.get(name) != value for o in each)
                ]
                if joined:
                    trace.add(f"  options joined for the one copy: {', '.join(joined)}")
            messages = [current]
            for name in route.transforms:
                messages = await self._apply(route, name, messages, options)
                if trace is not None:
                    trace.add(f"  transform '{name}' -> {len(messages)} message(s)")
            for result in messages:
                out.append(Routed(route, result, route.to))
        return out

    async def _apply(
        self, route: Route, name: str, messages: list[Message], options: Mapping[str, Any]
    ) -> list[Message]:
        spec = self.transforms.get(name)
        if spec is None:
            # The configuration was checked against the loaded transforms; this is a
            # plugin that vanished on reload.
            raise TransformFailed(route.name, name, LookupError("no such transform"))
        results: list[Message] = []
        for message in messages:
            if spec.accepts and message.kind not in spec.accepts:
                raise TransformFailed(
                    route.name, name, TypeError(f"it does not take {message.kind} messages")
                )
            try:
                results.extend(await call_transform(spec, message, options))
            except Reject as exc:
                log.info(
                    "transform {transform} of route {route} rejected message {msgid}: {reason}",
                    transform=name,
                    route=route.name,
                    msgid=message.id,
                    reason=exc.reason,
                )
                raise TransformFailed(route.name, name, exc) from exc
            except Exception as exc:
                log.failure(
                    "transform {transform} of route {route} failed on message {msgid}",
                    transform=name,
                    route=route.name,
                    msgid=message.id,
                )
                raise TransformFailed(route.name, name, exc) from exc
        return results


# --- static checks ------------------------------------------------------------------


def _transform_hint(name: str, transforms: Transforms) -> str:
    if name.lower().replace("-", "_") in ("mail_to_http", "mail_to_webhook", "news_to_http"):
        return "; mail becomes a web hook in a destination with 'protocol: webhook'"
    return suggest(name, transforms.names())


def check_routes(config: Config, transforms: Transforms) -> list[Problem]:
    """Transform names exist, and each route's message kinds can reach its destinations."""
    problems: list[Problem] = []
    for route in config.routes:
        label = f"route '{route.name}'"
        where = route.where.get("transforms", route.where.get("", None))
        kinds = {config.listeners[n].kind for n in route.from_ if n in config.listeners}
        specs = []
        for name in route.transforms:
            spec = transforms.get(name)
            if spec is None:
                problems.append(
                    Problem(
                        where,
                        f"{label}: unknown transform '{name}'{_transform_hint(name, transforms)}"
                        " (built in or from a plugin)",
                    )
                )
            else:
                specs.append(spec)
        if len(specs) != len(route.transforms):
            continue
        for start in sorted(kinds, key=str):
            kind: Kind = start
            broken = False
            for spec in specs:
                if spec.accepts and kind not in spec.accepts:
                    takes = ", ".join(sorted(str(k) for k in spec.accepts))
                    problems.append(
                        Problem(
                            where,
                            f"{label}: transform '{spec.name}' takes {takes} messages"
                            f" but gets {kind}",
                        )
                    )
                    broken = True
                    break
                kind = spec.output_kind(kind)
            if broken:
                continue
            for dest_name in route.to:
                dest: BaseDestinationConfig | None = config.destinations.get(dest_name)
                if dest is not None and kind not in dest.kinds:
                    takes = " or ".join(sorted(str(k) for k in dest.kinds))
                    problems.append(
                        Problem(
                            route.where.get("to", where),
                            f"{label}: destination '{dest_name}' ({dest.protocol}) takes {takes}"
                            f" messages but this route delivers {kind}; add a transform that"
                            f" converts {kind} to {takes}",
                        )
                    )
    return problems


# --- DNS routes --------------------------------------------------------------------


_CANDIDATE_MEMO_SIZE = 4096


class DnsRoutes:
    """The DNS routes of one listener, indexed by name so lookups stay fast with thousands.

    Exact names and ``*.suffix`` names go into hash tables keyed by name; a query
    looks up its own name and each of its parent names, so the cost grows with
    the number of labels in the query, not with the number of routes.  Routes
    with no name condition (or only a regex) are checked in order as well.  Of
    all candidates, the first in file order whose other conditions hold wins.
    """

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        self._exact: dict[str, list[int]] = {}
        self._below: dict[str, list[int]] = {}
        self._always: list[int] = []
        # Candidates by query name: traffic repeats names, so most look-ups are one dict hit
        # whatever the number of routes. Cleared when full, which bounds a flood of new names.
        self._memo: dict[str, list[int]] = {}
        for index, route in enumerate(routes):
            names = route.match.qname + route.match.file_names
            if not names:
                self._always.append(index)
                continue
            for name in names:
                table = self._below if name.wildcard else self._exact
                bucket = table.setdefault(name.base, [])
                if not bucket or bucket[-1] != index:
                    bucket.append(index)

    def candidates(self, qname: str) -> list[int]:
        """Indexes of the routes whose names match ``qname``, in file order (shared: read only)."""
        found = self._memo.get(qname)
        if found is None:
            if len(self._memo) >= _CANDIDATE_MEMO_SIZE:
                self._memo.clear()
            found = self._memo[qname] = self._find(qname)
        return found

    def _find(self, qname: str) -> list[int]:
        found: list[int] = []
        exact = self._exact.get(qname)
        if exact:
            found.extend(exact)
        if self._below:
            # Parent names of "a.b.example.test.": "b.example.test.", "example.test.", "test.", "."
            pos = qname.find(".")
            while 0 <= pos < len(qname) - 1:
                parent = qname[pos + 1 :]
                below = self._below.get(parent)
                if below:
                    found.extend(below)
                pos = qname.find(".", pos + 1)
            root = self._below.get(".")
            if root and qname != ".":
                found.extend(root)
        if self._always:
            found.extend(self._always)
        if len(found) > 1:
            found = sorted(set(found))
        return found

    def select(self, qname: str, qtype: int, qclass: int, client: str) -> Route | None:
        """The route for a query: ``qname`` lower-case with a trailing dot."""
        routes = self.routes
        for index in self.candidates(qname):
            route = routes[index]
            m = route.match
            if m.qtype and qtype not in m.qtype:
                continue
            if m.qclass is not None and qclass != m.qclass:
                continue
            if m.qname_regex is not None and m.qname_regex.compiled.search(qname) is None:
                continue
            if m.client and not client_allowed(m.client, client):
                continue
            return route
        return None


# --- HTTP routes --------------------------------------------------------------------


def http_host(host: str) -> str:
    """A Host value as routes compare it: lower case, without the port or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


def _host_matches(names: tuple[str, ...], host: str) -> bool:
    for name in names:
        name = name.lower()
        if name.startswith("*."):
            if host.endswith(name[1:]) and len(host) > len(name) - 1:
                return True
        elif host == name:
            return True
    return False


def http_match(
    m: Any,
    method: str,
    host: str,
    target: str,
    header_values: Any,
    groups: dict[str, str],
) -> dict[str, str] | None:
    """The named groups if a request meets ``m`` (a Match), else None.

    ``header_values(name)`` gives every value of one header field.  Shared by
    the listener's fast path and the router, so a route means the same in both.
    """
    if m.method and method.upper() not in {x.upper() for x in m.method}:
        return None
    if m.host and not _host_matches(m.host, http_host(host)):
        return None
    path = target.split("?", 1)[0]
    if m.prefix is not None and not path.startswith(m.prefix):
        return None
    if m.path is not None and not _search_groups(m.path, path, groups):
        return None
    for name, pattern in m.header.items():
        if not any(_search_groups(pattern, v, groups) for v in header_values(name)):
            return None
    return groups


class HttpRoutes:
    """The routes of one HTTP listener, indexed so that choosing one stays fast with hundreds.

    A route with a ``prefix`` is filed under it; one with only ``host`` names under
    each name; the rest are always candidates.  A request looks up its path cut at
    each distinct prefix length and its host, so the cost grows with the number of
    distinct prefix lengths, not with the number of routes.  Of the candidates,
    the first in file order whose every condition holds wins.
    """

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        self._prefix: dict[str, list[int]] = {}
        self._hosts: dict[str, list[int]] = {}
        self._below: dict[str, list[int]] = {}
        self._always: list[int] = []
        for index, route in enumerate(routes):
            m = route.match
            if m.prefix:
                self._prefix.setdefault(m.prefix, []).append(index)
            elif m.host:
                for name in {h.lower().rstrip(".") for h in m.host}:
                    if name.startswith("*."):
                        self._below.setdefault(name[2:], []).append(index)
                    else:
                        self._hosts.setdefault(name, []).append(index)
            else:
                self._always.append(index)
        self._lengths = sorted({len(p) for p in self._prefix})

    def candidates(self, host: str, path: str) -> list[int]:
        """Indexes of routes that may match, in file order."""
        found: list[int] = []
        if self._lengths:
            table = self._prefix
            size = len(path)
            for length in self._lengths:
                if length > size:
                    break
                hit = table.get(path[:length])
                if hit:
                    found.extend(hit)
        if self._hosts or self._below:
            name = http_host(host)
            hit = self._hosts.get(name)
            if hit:
                found.extend(hit)
            if self._below:
                pos = name.find(".")
                while pos >= 0:
                    hit = self._below.get(name[pos + 1 :])
                    if hit:
                        found.extend(hit)
                    pos = name.find(".", pos + 1)
        if self._always:
            found.extend(self._always)
        if len(found) > 1:
            found = sorted(set(found))
        return found

    def select(
        self, method: str, host: str, target: str, header_values: Any, client: str
    ) -> tuple[Route, dict[str, str]] | None:
        """The route for a request and its named groups, or None."""
        path = target.split("?", 1)[0]
        routes = self.routes
        for index in self.candidates(host, path):
            route = routes[index]
            m = route.match
            if m.client and not client_allowed(m.client, client):
                continue
            groups = http_match(m, method, host, target, header_values, {})
            if groups is not None:
                return route, groups
        return None
