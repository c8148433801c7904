"""The router: which routes a message takes, and the transforms applied on the way.

Routes are tried in file order and the first that matches wins, unless it says
``continue: true``, in which case later routes may match as well (fan-out).
Mail is routed per recipient, like an MTA does: recipients that take the same
route with the same named groups travel together as one copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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

    def match(self, msg: Message) -> list[tuple[Route, dict[str, str], tuple[str, ...]]]:
        """The routes ``msg`` takes: (route, named groups, recipients) in route order.

        Raises NoRoute naming the recipients no route takes.
        """
        if isinstance(msg, MailMessage):
            grouped: dict[tuple[int, tuple[tuple[str, str], ...]], list[str]] = {}
            routes: dict[int, Route] = {}
            unrouted = []
            for rcpt in msg.recipients:
                walked = self._walk(msg, rcpt)
                if not walked:
                    unrouted.append(rcpt)
                for route, groups in walked:
                    key = (id(route), tuple(sorted(groups.items())))
                    routes[id(route)] = route
                    grouped.setdefault(key, []).append(rcpt)
            if unrouted:
                raise NoRoute(f"no route takes recipient(s) {', '.join(unrouted)}", tuple(unrouted))
            order = {id(r): i for i, r in enumerate(self.routes_for(msg.listener))}
            return [
                (routes[rid], dict(groups), tuple(rcpts))
                for (rid, groups), rcpts in sorted(grouped.items(), key=lambda kv: order[kv[0][0]])
            ]
        walked = self._walk(msg, None)
        if not walked:
            raise NoRoute(f"no route takes this {msg.kind} message from '{msg.listener}'")
        return [(route, groups, ()) for route, groups in walked]

    # --- transforming -----------------------------------------------------------

    async def route(self, msg: Message, trace: Trace | None = None) -> list[Routed]:
        """Match, then run each matching route's transforms; raise NoRoute or TransformFailed."""
        out: list[Routed] = []
        for route, groups, rcpts in self.match(msg):
            current: Message = msg
            if isinstance(msg, MailMessage) and rcpts != msg.recipients:
                current = msg.with_recipients(rcpts)
            options = interpolate(route.options, groups)
            if trace is not None:
                detail = f" for {', '.join(rcpts)}" if rcpts else ""
                trace.add(f"route '{route.name}' matches{detail}; named groups {groups or '{}'}")
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
