"""Response rate limiting for DNS over UDP, as BIND's ``rate-limit`` and Knot's ``rrl`` do it.

A UDP query's source address can be forged: an attacker sends small queries
"from" a victim and the server floods the victim with answers. The limiter
counts the answers going to each client network (IPv4 /24, IPv6 /56 by
default) per answer: the same name and type for a positive or empty answer,
and all errors (NXDOMAIN, REFUSED, SERVFAIL ...) together, so random names do
not dodge it. Past the rate an answer is not sent, except every ``slip``-th
one, which goes out truncated (TC, no records): a real client behind the
forged traffic then asks again over TCP, which cannot be forged, and gets
its answer. TCP and DoH answers are never limited.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable

from gateway.config import Rate
from gateway.limits import RateLimiter
from gateway.protocols.dns.config import RateLimitConfig
from gateway.protocols.dns.wire import truncate

_NOERROR = 0


@functools.lru_cache(maxsize=65536)
def _network(host: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _question(response: bytes) -> bytes | None:
    """The question (name, type, class) of a response, name in lower case; None if odd."""
    size = len(response)
    pos = 12
    while pos < size:
        length = response[pos]
        if length == 0:
            end = pos + 5
            return response[12:end].lower() if end <= size else None
        if length > 63:
            return None  # a compression pointer in a question: not one we made
        pos += 1 + length
    return None


class ResponseRateLimiter:
    """Decides, per UDP answer, whether it goes out whole, truncated (slipped) or not at all."""

    def __init__(self, config: RateLimitConfig, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.dropped = 0  # for /metrics
        self.slipped = 0
        self._limited = 0
        self.configure(config)

    def configure(self, config: RateLimitConfig) -> None:
        """New settings; counts are kept for rates that did not change."""
        old = getattr(self, "config", None)
        self.config = config
        if old is None or old.responses != config.responses:
            self._responses = RateLimiter(config.responses, self.clock)
        errors: Rate = config.errors or config.responses
        if old is None or (old.errors or old.responses) != errors:
            self._errors = RateLimiter(errors, self.clock)

    def check(self, response: bytes, host: str) -> bytes | None:
        """``response`` when it may go to ``host``; a truncated copy (slip); or None (drop)."""
        config = self.config
        network = _network(host, config.ipv4_prefix, config.ipv6_prefix)
        if len(response) < 12:
            return response
        if response[3] & 0x0F == _NOERROR:
            question = _question(response)
            key = f"{network} {question!r}" if question is not None else network
            wait = self._responses.take(key)
        else:
            wait = self._errors.take(network)
        if not wait:
            return response
        self._limited += 1
        slip = config.slip
        if slip and self._limited % slip == 0:
            self.slipped += 1
            return truncate(response, 0)
        self.dropped += 1
        return None
