"""The routes of one HTTP listener, indexed so that choosing one stays fast with hundreds.

Also the HTTP listener's Matcher, so that the router and the listener's own
fast path mean the same by a route.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.config import Match, Route, client_allowed
from gateway.message import HttpRequest, Message
from gateway.ports import Explained, Sample
from gateway.protocols.http.config import HttpMatch
from gateway.routing import search_groups

HeaderValues = Callable[[str], list[str]]


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
    m: HttpMatch,
    method: str,
    host: str,
    target: str,
    header_values: HeaderValues,
    groups: dict[str, str],
) -> dict[str, str] | None:
    """The named groups if a request meets ``m``, else None.

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
    if m.path is not None and not search_groups(m.path, path, groups):
        return None
    for name, pattern in m.header.items():
        if not any(search_groups(pattern, v, groups) for v in header_values(name)):
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
        self._keys = [route.match.view(HttpMatch) for route in routes]
        for index, m in enumerate(self._keys):
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
        self, method: str, host: str, target: str, header_values: HeaderValues, client: str
    ) -> tuple[Route, dict[str, str]] | None:
        """The route for a request and its named groups, or None."""
        path = target.split("?", 1)[0]
        routes = self.routes
        for index in self.candidates(host, path):
            route = routes[index]
            networks = route.match.client
            if networks and not client_allowed(networks, client):
                continue
            groups = http_match(self._keys[index], method, host, target, header_values, {})
            if groups is not None:
                return route, groups
        return None


def match_request(
    match: Match, message: Message, rcpt: str | None, groups: dict[str, str], headers: bool
) -> bool:
    """The Matcher of the HTTP listener, for requests the router routes (web hooks)."""
    if not isinstance(message, HttpRequest):
        return False
    fields = message.http_headers

    def values(name: str) -> list[str]:
        wanted = name.lower()
        return [v for k, v in fields if k.lower() == wanted]

    keys = match.view(HttpMatch)
    return (
        http_match(keys, message.method, message.host, message.target, values, groups) is not None
    )


def http_dry_run(
    config: Any, routes: tuple[Route, ...], shapes: Mapping[str, str], sample: Sample
) -> Explained:
    """``gateway route --dry-run`` for an HTTP listener: the route its own index picks; a
    request for a store-and-forward route goes on to the router as a message."""
    if not sample.method:
        raise ValueError("give the request to route: --method METHOD --path PATH [--header ...]")
    headers = sample.headers
    host = sample.host or next((v for k, v in headers if k.lower() == "host"), "")

    def values(name: str) -> list[str]:
        wanted = name.lower()
        return [v for k, v in headers if k.lower() == wanted]

    what = f"{sample.method} {sample.target} (Host: {host or '-'}) from {sample.client}"
    allow = config.allow
    if allow and not client_allowed(allow, sample.client):
        return Explained(
            None,
            (f"{what}: the client is not in the listener's 'allow' list",),
            refused="connection closed (not in 'allow')",
        )
    chosen = HttpRoutes(routes).select(sample.method, host, sample.target, values, sample.client)
    if chosen is None:
        return Explained(None, (f"{what}: no route takes it; answered 404",), refused="404")
    route, groups = chosen
    found = f" (named groups: {groups})" if groups else ""
    proxies = [name for name in route.to if shapes.get(name) == "proxy"]
    if proxies:
        return Explained(
            route.name,
            (f"{what}: route '{route.name}'{found} proxies it to {proxies[0]}",),
            destinations=(proxies[0],),
        )
    request = HttpRequest(
        listener=config.name,
        client=sample.client,
        method=sample.method,
        target=sample.target,
        host=host,
        http_headers=headers,
        body=sample.data,
    )
    return Explained(
        route.name,
        (f"{what}: route '{route.name}'{found} takes it as a message (202 once stored)",),
        request,
    )
