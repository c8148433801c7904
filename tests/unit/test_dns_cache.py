"""Tests for the DNS packet cache: TTL countdown on a fake clock, negative caching, LRU, serve-stale."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocols.dns.cache import DnsCache
from gateway.protocols.dns.wire import CacheKey

SOA = "ns.example.test. hostmaster.example.test. 2024 7200 900 1209600 {minimum}"


class Clock:
    """A hand-driven clock, in seconds."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def key_for(qname: str = "www.example.test.", qtype: int = 1) -> CacheKey:
    return (qname, qtype, 1, False)


def response(
    qname: str = "www.example.test.",
    answer: list[tuple[str, int, str, list[str]]] | None = None,
    authority: list[tuple[str, int, str, list[str]]] | None = None,
    *,
    rcode: int = dns.rcode.NOERROR,
    flags: int = 0,
) -> bytes:
    query = dns.message.make_query(qname, "A", use_edns=0)
    message = dns.message.make_response(query)
    for section, entries in ((message.answer, answer), (message.authority, authority)):
        for owner, ttl, rdtype, texts in entries or []:
            section.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, *texts))
    message.set_rcode(dns.rcode.Rcode.make(rcode))
    message.flags |= flags
    return message.to_wire(max_size=65535)


def a_answer(ttl: int = 300, qname: str = "www.example.test.", address: str = "192.0.2.1") -> bytes:
    return response(qname, answer=[(qname, ttl, "A", [address])])


def nxdomain(soa_ttl: int = 3600, minimum: int = 300) -> bytes:
    return response(
        "nope.example.test.",
        authority=[("example.test.", soa_ttl, "SOA", [SOA.format(minimum=minimum)])],
        rcode=dns.rcode.NXDOMAIN,
    )


def ttls(data: bytes) -> list[int]:
    message = dns.message.from_wire(data, one_rr_per_rrset=True)
    return [
        rrset.ttl
        for section in (message.answer, message.authority, message.additional)
        for rrset in section
    ]


def make_cache(clock: Clock, **options: float) -> DnsCache:
    return DnsCache(clock=clock, **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- positive answers


def test_fresh_hit_counts_down_ttls_and_takes_the_new_id() -> None:
    clock = Clock()
    cache = make_cache(clock)
    data = a_answer(ttl=300)
    cache.put(key_for(), data)
    assert len(cache) == 1

    first = cache.get(key_for(), 0x1111)
    assert first is not None and first[2:] == data[2:]
    assert dns.message.from_wire(first).id == 0x1111

    clock.advance(100.7)
    aged = cache.get(key_for(), 0x2222)
    assert aged is not None
    assert dns.message.from_wire(aged).id == 0x2222
    assert ttls(aged) == [200]
    assert dns.message.from_wire(aged).answer == dns.message.from_wire(data).answer

    clock.advance(0.2)  # same whole second: the memoised copy, with this query's ID
    again = cache.get(key_for(), 0x3333)
    assert again is not None and ttls(again) == [200] and dns.message.from_wire(again).id == 0x3333

    clock.advance(0.2)
    assert ttls(cache.get(key_for(), 1) or b"") == [199]
    assert (cache.hits, cache.misses) == (4, 0)


def test_entry_expires_after_its_lowest_ttl() -> None:
    clock = Clock()
    cache = make_cache(clock)
    data = response(
        answer=[
            ("www.example.test.", 300, "CNAME", ["web.example.test."]),
            ("web.example.test.", 60, "A", ["192.0.2.1"]),
        ],
        authority=[("example.test.", 86400, "NS", ["ns.example.test."])],
    )
    cache.put(key_for(), data)
    clock.advance(59.9)
    hit = cache.get(key_for(), 1)
    assert hit is not None and ttls(hit) == [241, 1, 86341]
    clock.advance(0.1)
    assert cache.get(key_for(), 1) is None
    assert cache.misses == 1
    assert len(cache) == 0  # no serve-stale window, so it is gone


def test_miss_for_unknown_key() -> None:
    cache = make_cache(Clock())
    assert cache.get(key_for(), 1) is None
    assert cache.misses == 1 and cache.hits == 0


def test_keys_are_distinct() -> None:
    clock = Clock()
    cache = make_cache(clock)
    cache.put(key_for(), a_answer(address="192.0.2.1"))
    cache.put(("www.example.test.", 1, 1, True), a_answer(address="192.0.2.99"))
    plain = dns.message.from_wire(cache.get(key_for(), 1) or b"")
    with_do = dns.message.from_wire(cache.get(("www.example.test.", 1, 1, True), 1) or b"")
    assert plain.answer[0][0].address == "192.0.2.1"
    assert with_do.answer[0][0].address == "192.0.2.99"
    assert cache.get(key_for(qtype=28), 1) is None


def test_put_replaces_an_existing_entry() -> None:
    clock = Clock()
    cache = make_cache(clock)
    cache.put(key_for(), a_answer(ttl=100))
    clock.advance(50)
    cache.put(key_for(), a_answer(ttl=300))
    assert ttls(cache.get(key_for(), 1) or b"") == [300]
    assert len(cache) == 1


def test_ttls_are_clamped_to_max_and_min() -> None:
    clock = Clock()
    cache = make_cache(clock, max_ttl=3600, min_ttl=60)
    cache.put(key_for("long.test."), a_answer(ttl=1_000_000, qname="long.test."))
    cache.put(key_for("short.test."), a_answer(ttl=10, qname="short.test."))
    assert ttls(cache.get(key_for("long.test."), 1) or b"") == [3600]
    clock.advance(30)
    # Kept for min_ttl, and the TTL shown agrees with how long it is kept.
    assert ttls(cache.get(key_for("short.test."), 1) or b"") == [30]
    clock.advance(3570)
    assert cache.get(key_for("long.test."), 1) is None


def test_clock_stepping_back_does_not_raise_ttls() -> None:
    clock = Clock()
    cache = make_cache(clock)
    cache.put(key_for(), a_answer(ttl=300))
    clock.advance(10)
    assert ttls(cache.get(key_for(), 1) or b"") == [290]
    clock.advance(-20)
    assert ttls(cache.get(key_for(), 1) or b"") == [300]


# --------------------------------------------------------------------------- what is not cached


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("servfail", response(rcode=dns.rcode.SERVFAIL)),
        (
            "servfail with records",
            response(
                answer=[("www.example.test.", 300, "A", ["192.0.2.1"])], rcode=dns.rcode.SERVFAIL
            ),
        ),
        ("refused", response(rcode=dns.rcode.REFUSED)),
        ("formerr", response(rcode=dns.rcode.FORMERR)),
        (
            "badvers (extended rcode, header says NOERROR)",
            response(
                answer=[("www.example.test.", 300, "A", ["192.0.2.1"])], rcode=dns.rcode.BADVERS
            ),
        ),
        (
            "truncated",
            response(answer=[("www.example.test.", 300, "A", ["192.0.2.1"])], flags=dns.flags.TC),
        ),
        ("ttl zero", a_answer(ttl=0)),
        (
            "one ttl zero among others",
            response(
                answer=[
                    ("www.example.test.", 300, "CNAME", ["w.test."]),
                    ("w.test.", 0, "A", ["192.0.2.1"]),
                ]
            ),
        ),
        ("nxdomain without soa", response(rcode=dns.rcode.NXDOMAIN)),
        (
            "nodata without soa (maybe a referral)",
            response(authority=[("example.test.", 3600, "NS", ["ns.example.test."])]),
        ),
        ("nxdomain with soa minimum zero", nxdomain(minimum=0)),
        ("a query, not a response", dns.message.make_query("www.example.test.", "A").to_wire()),
        ("garbage", b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x03www"),
        ("too short", b"\x00"),
    ],
)
def test_not_cached(name: str, data: bytes) -> None:
    cache = make_cache(Clock())
    cache.put(key_for(), data)
    assert len(cache) == 0, name
    assert cache.get(key_for(), 1) is None


# --------------------------------------------------------------------------- negative answers


def test_nxdomain_is_cached_for_the_soa_minimum() -> None:
    clock = Clock()
    cache = make_cache(clock)
    key = key_for("nope.example.test.")
    cache.put(key, nxdomain(soa_ttl=3600, minimum=300))
    clock.advance(299.5)
    hit = cache.get(key, 7)
    assert hit is not None
    reply = dns.message.from_wire(hit)
    assert reply.rcode() == dns.rcode.NXDOMAIN and reply.id == 7
    assert ttls(hit) == [3600 - 299]
    clock.advance(0.5)
    assert cache.get(key, 7) is None


def test_nxdomain_uses_the_soa_ttl_when_lower() -> None:
    clock = Clock()
    cache = make_cache(clock)
    key = key_for("nope.example.test.")
    cache.put(key, nxdomain(soa_ttl=60, minimum=300))
    clock.advance(59)
    assert cache.get(key, 1) is not None
    clock.advance(1)
    assert cache.get(key, 1) is None


def test_nodata_is_cached_like_nxdomain() -> None:
    clock = Clock()
    cache = make_cache(clock)
    data = response(authority=[("example.test.", 900, "SOA", [SOA.format(minimum=120)])])
    cache.put(key_for(qtype=28), data)
    clock.advance(119)
    hit = cache.get(key_for(qtype=28), 1)
    assert hit is not None and dns.message.from_wire(hit).rcode() == dns.rcode.NOERROR
    clock.advance(1)
    assert cache.get(key_for(qtype=28), 1) is None


def test_negative_answers_are_capped_by_negative_max_ttl() -> None:
    clock = Clock()
    cache = make_cache(clock, negative_max_ttl=30)
    key = key_for("nope.example.test.")
    cache.put(key, nxdomain(soa_ttl=3600, minimum=3600))
    hit = cache.get(key, 1)
    assert hit is not None and ttls(hit) == [30]
    clock.advance(30)
    assert cache.get(key, 1) is None


# --------------------------------------------------------------------------- LRU


def test_lru_eviction_order() -> None:
    cache = make_cache(Clock(), max_entries=3)
    names = ["a.test.", "b.test.", "c.test.", "d.test."]
    for name in names[:3]:
        cache.put(key_for(name), a_answer(qname=name))
    assert cache.get(key_for("a.test."), 1) is not None  # a becomes the most recent
    cache.put(key_for("d.test."), a_answer(qname="d.test."))
    assert len(cache) == 3
    assert cache.get(key_for("b.test."), 1) is None  # the least recently used went
    for name in ("a.test.", "c.test.", "d.test."):
        assert cache.get(key_for(name), 1) is not None
    cache.put(key_for("e.test."), a_answer(qname="e.test."))
    assert cache.get(key_for("a.test."), 1) is None


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), max_size=80), st.integers(1, 8))
def test_never_more_than_max_entries(operations: list[tuple[int, bool]], size: int) -> None:
    clock = Clock()
    cache = make_cache(clock, max_entries=size)
    model: list[str] = []  # most recent last
    for index, is_put in operations:
        name = f"n{index}.test."
        if is_put:
            cache.put(key_for(name), a_answer(qname=name))
            if name in model:
                model.remove(name)
            model.append(name)
            del model[:-size]
        else:
            hit = cache.get(key_for(name), 1)
            assert (hit is not None) == (name in model)
            if name in model:
                model.remove(name)
                model.append(name)
        assert len(cache) == len(model) <= size


# --------------------------------------------------------------------------- serve-stale


def test_serve_stale_within_the_window() -> None:
    clock = Clock()
    cache = make_cache(clock, serve_stale=3600, stale_ttl=30)
    cache.put(key_for(), a_answer(ttl=300))
    clock.advance(400)
    assert cache.get(key_for(), 1) is None  # expired: the caller goes upstream first
    assert len(cache) == 1  # but it is kept for stale serving
    stale = cache.get_stale(key_for(), 0x4242)
    assert stale is not None
    assert dns.message.from_wire(stale).id == 0x4242
    assert ttls(stale) == [30]  # RFC 8767
    assert cache.stale_hits == 1
    clock.advance(300 + 3600 - 400)
    assert cache.get_stale(key_for(), 1) is None
    assert len(cache) == 0
    assert cache.stale_hits == 1


def test_get_stale_on_a_fresh_entry_answers_as_get_would() -> None:
    clock = Clock()
    cache = make_cache(clock, serve_stale=60)
    cache.put(key_for(), a_answer(ttl=300))
    clock.advance(10)
    assert ttls(cache.get_stale(key_for(), 1) or b"") == [290]
    assert (cache.hits, cache.stale_hits) == (1, 0)
    assert cache.get_stale(key_for("other.test."), 1) is None


def test_no_stale_serving_by_default() -> None:
    clock = Clock()
    cache = make_cache(clock)
    cache.put(key_for(), a_answer(ttl=300))
    clock.advance(300)
    assert cache.get_stale(key_for(), 1) is None
    assert len(cache) == 0


def test_expired_entry_past_the_window_is_dropped_by_get() -> None:
    clock = Clock()
    cache = make_cache(clock, serve_stale=10)
    cache.put(key_for(), a_answer(ttl=5))
    clock.advance(20)
    assert cache.get(key_for(), 1) is None
    assert len(cache) == 0


def test_purge_drops_entries_past_their_window() -> None:
    clock = Clock()
    cache = make_cache(clock, serve_stale=100)
    cache.put(key_for("short.test."), a_answer(ttl=10, qname="short.test."))
    cache.put(key_for("long.test."), a_answer(ttl=1000, qname="long.test."))
    clock.advance(50)
    assert cache.purge() == 0  # expired but still servable stale
    clock.advance(60)
    assert cache.purge() == 1
    assert len(cache) == 1 and cache.get(key_for("long.test."), 1) is not None
    cache.clear()
    assert len(cache) == 0


# --------------------------------------------------------------------------- options and robustness


@pytest.mark.parametrize(
    "options",
    [
        {"max_entries": 0},
        {"min_ttl": -1},
        {"min_ttl": 100, "max_ttl": 10},
        {"max_ttl": 2**31},
        {"negative_max_ttl": -5},
        {"serve_stale": -1.0},
        {"stale_ttl": -1},
    ],
)
def test_bad_options_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make_cache(Clock(), **options)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_put_never_raises_on_garbage(data: bytes) -> None:
    cache = make_cache(Clock())
    cache.put(key_for(), data)
    hit = cache.get(key_for(), 9)
    if hit is not None:
        assert hit[:2] == b"\x00\x09" and len(hit) == len(data)


def test_cname_to_nodata_lives_no_longer_than_the_negative_ttl() -> None:
    clock = Clock()
    cache = make_cache(clock)
    data = response(
        answer=[("www.example.test.", 3600, "CNAME", ["web.example.test."])],
        authority=[("example.test.", 3600, "SOA", [SOA.format(minimum=60)])],
    )
    cache.put(key_for(), data)
    clock.advance(59)
    assert cache.get(key_for(), 1) is not None
    clock.advance(1)
    assert cache.get(key_for(), 1) is None
