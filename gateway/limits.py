"""The counting behind ``limits:`` (gateway.config.ClientLimits), per client.

A client is its IPv4 address, or the /64 an IPv6 address is in (one host
usually has a whole /64).  ``RateLimiter`` lets events through at a ``Rate``
per client with a burst of the rate's own count (a token bucket, as nginx's
``limit_req ... burst``) and says how long an event over it should wait.
Its table is bounded: the clients seen longest ago are forgotten first, so a
flood from many addresses costs bounded memory (a forgotten client starts
again with a full burst).  ``ConnectionCounter`` counts open connections per
client; it holds only clients with a connection open.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable

from gateway.config import Rate

__all__ = ["ConnectionCounter", "RateLimiter", "client_key"]

# Clients remembered per limit; beyond it the one seen longest ago is forgotten.
MAX_CLIENTS = 100_000


def client_key(host: str) -> str:
    """The client a limit counts: the IPv4 address, or the /64 of an IPv6 address."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


class RateLimiter:
    """At most ``rate`` events per client, a burst of ``rate.count`` included."""

    def __init__(self, rate: Rate, clock: Callable[[], float], max_clients: int = MAX_CLIENTS):
        self.rate = rate
        self.clock = clock
        self.max_clients = max_clients
        self.limited = 0  # events refused, for /metrics
        # client -> (tokens left, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def peek(self, client: str) -> float:
        """Seconds until ``client`` may have an event (0.0: now), counting nothing."""
        found = self._buckets.get(client)
        if found is None:
            return 0.0
        tokens, then = found
        tokens = min(float(self.rate.count), tokens + (self.clock() - then) * self.rate.per_second)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate.per_second

    def take(self, client: str) -> float:
        """Count one event of ``client``: 0.0 when it may go on, else seconds to wait."""
        now = self.clock()
        capacity = float(self.rate.count)
        per_second = self.rate.per_second
        found = self._buckets.pop(client, None)
        if found is None:
            tokens = capacity
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
        else:
            tokens, then = found
            tokens = min(capacity, tokens + (now - then) * per_second)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        self.limited += 1
        return (1.0 - tokens) / per_second


class ConnectionCounter:
    """Connections open per client, with a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def has_room(self, client: str) -> bool:
        """Whether ``client`` may open one more connection."""
        return self._open.get(client, 0) < self.limit

    def open(self, client: str) -> None:
        """Count a connection of ``client`` (whether it had room is ``has_room``'s to say)."""
        self._open[client] = self._open.get(client, 0) + 1

    def close(self, client: str) -> None:
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)
