"""A packet cache for forwarded DNS answers: whole responses, aged on the way out, LRU-bounded.

Positive answers live for their lowest TTL, NXDOMAIN and NODATA for their SOA's negative TTL
(RFC 2308), and expired answers may be served stale while upstreams fail (RFC 8767).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable

from .wire import (
    COOKIE,
    ECS,
    NOERROR,
    NXDOMAIN,
    CacheKey,
    WireError,
    adjust_ttls,
    ecs_scope,
    inspect_response,
    set_ttls,
    without_option,
)

__all__ = ["DnsCache"]

_U32_MAX = 0x7FFFFFFF  # RFC 2181 §8: the largest TTL
_pack_id = struct.Struct(">H").pack


class _Entry:
    """One cached response; ``aged`` memoizes the copy for the current whole second of age."""

    __slots__ = ("aged", "aged_at", "expires", "inserted", "offsets", "response")

    def __init__(self, response: bytes, offsets: list[int], inserted: float, ttl: int) -> None:
        self.response = response
        self.offsets = offsets
        self.inserted = inserted
        self.expires = inserted + ttl
        self.aged = response
        self.aged_at = 0


class DnsCache:
    """Maps (qname, qtype, qclass, DO) to a response, with TTL countdown and LRU eviction.

    Not cached: truncated responses, anything but NOERROR and NXDOMAIN (SERVFAIL included: a
    failure upstream should be retried at once rather than pinned for seconds, and RFC 2308
    §7.1 makes caching it optional), negative answers without an SOA to time them, answers
    with a zero TTL, and packets that do not parse.

    TTLs are clamped into [min_ttl, max_ttl] (negative answers: negative_max_ttl) in the stored
    copy too, so clients never hold an answer longer than this cache would.
    """

    def __init__(
        self,
        max_entries: int = 10000,
        *,
        clock: Callable[[], float],
        min_ttl: int = 0,
        max_ttl: int = 86400,
        negative_max_ttl: int = 3600,
        serve_stale: float = 0.0,
        stale_ttl: int = 30,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1; to cache nothing, use no cache")
        if not 0 <= min_ttl <= max_ttl <= _U32_MAX:
            raise ValueError("TTL limits must satisfy 0 <= min_ttl <= max_ttl <= 2147483647")
        if not 0 <= negative_max_ttl <= _U32_MAX:
            raise ValueError("negative_max_ttl must be between 0 and 2147483647")
        if serve_stale < 0:
            raise ValueError("serve_stale is a number of seconds; use 0 to serve nothing stale")
        if not 0 <= stale_ttl <= _U32_MAX:
            raise ValueError("stale_ttl must be between 0 and 2147483647 (RFC 8767 suggests 30)")
        self._max_entries = max_entries
        self._clock = clock
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._negative_max_ttl = negative_max_ttl
        self._serve_stale = serve_stale
        self._stale_ttl = stale_ttl
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.stale_hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: CacheKey, response: bytes) -> None:
        """Store ``response`` under ``key`` if it may be cached; otherwise do nothing."""
        try:
            info = inspect_response(response)
        except WireError:
            return
        if info.truncated or not response[2] & 0x80 or info.min_ttl is None or info.max_ttl is None:
            return
        if info.rcode == NOERROR and info.answers:
            ttl, ceiling = info.min_ttl, self._max_ttl
            if info.negative_ttl is not None:
                # A CNAME chain ending in NODATA carries an SOA: its end is negative (RFC 2308 §5).
                ttl = min(ttl, info.negative_ttl)
        elif info.rcode in (NOERROR, NXDOMAIN):
            # NXDOMAIN, or NODATA (NOERROR without answers): RFC 2308 §5 times them by the SOA.
            # Without an SOA, a NOERROR with no answer may be a referral; neither is cached.
            if info.negative_ttl is None:
                return
            ttl, ceiling = min(info.min_ttl, info.negative_ttl), self._negative_max_ttl
        else:
            return
        if ttl == 0:
            return  # a zero TTL means "use once" (RFC 1035 §3.2.1)
        floor = min(self._min_ttl, ceiling)
        ttl = min(max(ttl, floor), ceiling)
        if ttl == 0:
            return
        offsets = info.ttl_offsets
        if b"\x00\x08" in response:  # maybe a Client Subnet option (a quick test first)
            scope = ecs_scope(response)
            if scope:
                # An answer for the client's subnet only (RFC 7871 §7.3.1): this cache is one
                # for everybody, so it does not keep it.
                return
            if scope == 0:
                # Valid for every client, but the option echoes the first client's subnet.
                response = without_option(response, ECS)
                offsets = inspect_response(response).ttl_offsets
        if b"\x00\x0a" in response:  # maybe a COOKIE option (a quick test before the walk)
            # The upstream's cookie answers the client who asked first, not the ones served
            # from here, who would take the answer for a spoofed one (RFC 7873 §5.3).
            stripped = without_option(response, COOKIE)
            if stripped is not response:
                response = stripped
                offsets = inspect_response(response).ttl_offsets  # those after the OPT moved
        # Clamp record TTLs in the stored copy so they agree with how long we keep it.
        if info.min_ttl < floor or info.max_ttl > ceiling:
            response = _clamp_ttls(response, offsets, floor, ceiling)
        entries = self._entries
        entries[key] = _Entry(response, offsets, self._clock(), ttl)
        entries.move_to_end(key)
        if len(entries) > self._max_entries:
            entries.popitem(last=False)

    def get(self, key: CacheKey, new_id: int) -> bytes | None:
        """A fresh answer with ID ``new_id`` and TTLs aged by the whole seconds since it came."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        now = self._clock()
        if now >= entry.expires:
            if now >= entry.expires + self._serve_stale:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        # Another hit within the same whole second, the usual case, only swaps the ID.
        elapsed = int(now - entry.inserted)
        if elapsed != entry.aged_at:
            return _aged(entry, now, new_id)
        return _pack_id(new_id) + entry.aged[2:]

    def get_stale(self, key: CacheKey, new_id: int) -> bytes | None:
        """For when upstreams fail: an answer expired less than ``serve_stale`` seconds ago.

        Its TTLs are all ``stale_ttl`` (RFC 8767 §4). A still fresh answer is returned as get()
        would, so a caller may use this as its only fallback.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now < entry.expires:
            self._entries.move_to_end(key)
            self.hits += 1
            return _aged(entry, now, new_id)
        if now >= entry.expires + self._serve_stale:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        self.stale_hits += 1
        return set_ttls(entry.response, entry.offsets, self._stale_ttl, new_id)

    def purge(self) -> int:
        """Drop the entries past their stale window; return how many. For a periodic timer."""
        limit = self._clock() - self._serve_stale
        dead = [key for key, entry in self._entries.items() if entry.expires <= limit]
        for key in dead:
            del self._entries[key]
        return len(dead)

    def clear(self) -> None:
        self._entries.clear()


def _aged(entry: _Entry, now: float, new_id: int) -> bytes:
    # Whole seconds, as TTLs are; a clock stepping back must not raise TTLs.
    elapsed = int(now - entry.inserted)
    elapsed = max(elapsed, 0)
    if elapsed != entry.aged_at:
        # Many hits on one entry fall in the same second: rewrite the TTLs once per second and
        # only swap the ID for the others.
        entry.aged = adjust_ttls(entry.response, entry.offsets, elapsed, 0)
        entry.aged_at = elapsed
    return _pack_id(new_id) + entry.aged[2:]


def _clamp_ttls(response: bytes, offsets: list[int], floor: int, ceiling: int) -> bytes:
    buf = bytearray(response)
    for offset in offsets:
        ttl = int.from_bytes(buf[offset : offset + 4], "big")
        if ttl > _U32_MAX:
            ttl = 0  # RFC 2181 §8
        buf[offset : offset + 4] = min(max(ttl, floor), ceiling).to_bytes(4, "big")
    return bytes(buf)
