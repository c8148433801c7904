"""The DNS routes of one listener, indexed by name: choosing one stays fast with thousands."""

from __future__ import annotations

from gateway.config import Route, client_allowed
from gateway.protocols.dns.config import DnsMatch

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
        self._keys = [route.match.view(DnsMatch) for route in routes]
        for index, keys in enumerate(self._keys):
            names = keys.qname + keys.file_names
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
        all_keys = self._keys
        for index in self.candidates(qname):
            route = routes[index]
            m = all_keys[index]
            if m.qtype and qtype not in m.qtype:
                continue
            if m.qclass is not None and qclass != m.qclass:
                continue
            if m.qname_regex is not None and m.qname_regex.compiled.search(qname) is None:
                continue
            client_networks = route.match.client
            if client_networks and not client_allowed(client_networks, client):
                continue
            return route
        return None
