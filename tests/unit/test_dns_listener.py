"""The DNS listener's forward path in memory: destinations in order, counters, stale, SERVFAIL."""

from __future__ import annotations

from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.config import parse
from gateway.message import Kind
from gateway.ports import Resolver
from gateway.protocols.dns.cache import DnsCache
from gateway.protocols.dns.client import UpstreamError
from gateway.protocols.dns.listener import DnsListener
from gateway.protocols.dns.server import DnsUdpProtocol
from gateway.protocols.dns.wire import Question
from tests.support.port import FakePort, runtime_of

CONFIG = """\
version: 1
listeners:
  dns-in:
    protocol: dns
    listen: ["udp:5353:interface=127.0.0.1"]
destinations:
  first: {protocol: dns, servers: ["127.0.0.1:5301"]}
  second: {protocol: dns, servers: ["127.0.0.1:5302"]}
routes:
  - name: everything
    from: dns-in
    to: [first, second]
    cache: CACHE
    serve_stale: 1h
"""


class FakeDestination(Resolver[Question]):
    """A destination whose answers the test decides, query by query, through a Deferred.

    A bug (any exception but UpstreamError) is raised from ``ask`` itself.
    """

    name = "fake"
    kinds = frozenset({Kind.DNS})

    def __init__(self, *results: Any) -> None:
        self.results = list(results)
        self.asked: list[Question] = []
        self.pending: list[Deferred[bytes]] = []

    def resolve(self, data: bytes, question: Question) -> Any:
        self.asked.append(question)
        result = self.results.pop(0)
        if result == "later":
            d: Deferred[bytes] = Deferred()
            self.pending.append(d)
            return d
        if isinstance(result, BaseException) and not isinstance(result, UpstreamError):
            raise result
        if isinstance(result, UpstreamError):
            return fail(result)
        if callable(result):
            return result()
        return succeed(result)

    def ask(self, data: bytes, question: Question, on_answer: Any, on_error: Any) -> None:
        d = self.resolve(data, question)
        d.addCallbacks(on_answer, lambda f: on_error(f.value if f.check(UpstreamError) else f))

    async def close(self) -> None:
        pass


class FakeAskDestination(FakeDestination):
    """The same, with every outcome through the callbacks: a bug arrives as a Failure."""

    def ask(self, data: bytes, question: Question, on_answer: Any, on_error: Any) -> None:
        try:
            d = self.resolve(data, question)
        except Exception:
            on_error(Failure())
            return
        # The Deferred only stands for "now or later" here; the listener sees plain callbacks:
        # an UpstreamError as the exception, anything else (a bug) as a Failure.
        d.addCallbacks(on_answer, lambda f: on_error(f.value if f.check(UpstreamError) else f))


def make_listener(
    *destinations: Any, cache: bool = False
) -> tuple[DnsListener, Clock, FakePort]:
    config = parse(CONFIG.replace("CACHE", "true" if cache else "false"))
    clock = Clock()
    runtime = runtime_of(config, dict(zip(["first", "second"], destinations, strict=True)))
    gateway = FakePort(runtime, reactor=clock)
    return DnsListener(config.listeners["dns-in"], gateway), clock, gateway


def query(name: str = "www.example.test.", qid: int = 0x1234, payload: int = 0) -> bytes:
    q = dns.message.make_query(name, "A", use_edns=payload > 0, payload=payload or 1232)
    q.id = qid
    wire: bytes = q.to_wire()
    return wire


def answer_to(data: bytes, addresses: int = 1, upstream_id: int = 0x9999, ttl: int = 300) -> bytes:
    q = dns.message.from_wire(data)
    r = dns.message.make_response(q)
    r.id = upstream_id
    name = q.question[0].name
    r.answer.append(
        dns.rrset.from_text_list(
            name, ttl, "IN", "A", [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(addresses)]
        )
    )
    wire: bytes = r.to_wire(max_size=65535)
    return wire


# How the destinations answer (Deferred or callbacks) and how the listener does (a Deferred,
# or the server's reply callback as for UDP).
MODES = ["resolve", "ask", "ask+reply", "resolve+reply"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def dest(mode: str, *results: Any) -> FakeDestination:
    return (FakeAskDestination if mode.startswith("ask") else FakeDestination)(*results)


class Asked:
    """One call of listener.answer in the mode under test."""

    def __init__(
        self, mode: str, listener: DnsListener, data: bytes, client: Any, transport: str
    ) -> None:
        self.by_reply = mode.endswith("+reply")
        self.client = client
        self.replies: list[tuple[Any, Any]] = []
        self.deferred: Any = None
        if self.by_reply:
            now = listener.answer(data, client, transport, self.reply)
            assert not isinstance(now, Deferred)
            if now is not None:  # ready at once (cache, local answers, SERVFAIL)
                self.replies.append((now, client))
        else:
            self.deferred = listener.answer(data, client, transport)

    def reply(self, response: Any, client: Any) -> None:
        self.replies.append((response, client))

    @property
    def done(self) -> bool:
        if self.by_reply:
            return bool(self.replies)
        return not isinstance(self.deferred, Deferred) or self.deferred.called

    def result(self) -> Any:
        if self.by_reply:
            assert len(self.replies) == 1, self.replies
            response, client = self.replies[0]
            assert client == self.client
            return response
        if not isinstance(self.deferred, Deferred):
            return self.deferred
        out: list[Any] = []
        self.deferred.addBoth(out.append)
        assert out, "the answer is still pending"
        return out[0]


def ask(mode: str, listener: DnsListener, data: bytes, transport: str = "udp") -> Any:
    """The response, which must be ready."""
    return Asked(mode, listener, data, ("127.0.0.1", 40000), transport).result()


def test_answer_from_first_destination_gets_client_id_and_is_counted(mode: str) -> None:
    data = query()
    listener, _, _ = make_listener(dest(mode, answer_to(data)), dest(mode))
    response = dns.message.from_wire(ask(mode, listener, data))
    assert response.id == 0x1234
    assert response.answer[0].name.to_text() == "www.example.test."
    assert listener.by_route["everything"].forwarded == 1
    assert listener.upstream == {("first", "answered"): 1}
    assert listener.upstream_duration["first"].count == 1


def test_pending_answer_arrives_later(mode: str) -> None:
    data = query()
    first = dest(mode, "later")
    listener, clock, _ = make_listener(first, dest(mode))
    asked = Asked(mode, listener, data, ("127.0.0.1", 40000), "tcp")
    assert not asked.done
    clock.advance(0.25)
    first.pending[0].callback(answer_to(data))
    assert asked.done
    assert dns.message.from_wire(asked.result()).id == 0x1234
    assert listener.upstream_duration["first"].sum == 0.25


def test_failed_destinations_are_tried_in_order_with_every_kind_of_failure(mode: str) -> None:
    data = query()
    # first: an UpstreamError, then a bug raised at once, then a bug reported later; second
    # answers each time.
    first = dest(
        mode,
        UpstreamError("timed out"),
        RuntimeError("bug at once"),
        lambda: fail(ValueError("bug later")),
    )
    second = dest(mode, answer_to(data), answer_to(data), answer_to(data))
    listener, _, _ = make_listener(first, second)
    for _ in range(3):
        response = ask(mode, listener, data)
        assert dns.message.from_wire(response).rcode() == dns.rcode.NOERROR
    assert len(first.asked) == len(second.asked) == 3
    assert listener.upstream == {("first", "failed"): 3, ("second", "answered"): 3}
    assert listener.by_route["everything"].forwarded == 3
    assert listener.by_route["everything"].servfail == 0


def test_every_destination_failing_gives_servfail_with_the_client_id(mode: str) -> None:
    data = query()
    first = dest(mode, "later")
    second = dest(mode, UpstreamError("no answer"))
    listener, _, _ = make_listener(first, second)
    asked = Asked(mode, listener, data, ("127.0.0.1", 40000), "udp")
    assert not asked.done
    first.pending[0].errback(UpstreamError("no answer"))
    response = dns.message.from_wire(asked.result())
    assert response.rcode() == dns.rcode.SERVFAIL
    assert response.id == 0x1234
    counts = listener.by_route["everything"]
    assert (counts.servfail, counts.forwarded) == (1, 0)
    assert listener.upstream == {("first", "failed"): 1, ("second", "failed"): 1}


def test_route_to_something_that_is_not_a_dns_destination_is_skipped(mode: str) -> None:
    data = query()
    listener, _, _ = make_listener(object(), dest(mode, answer_to(data)))
    assert dns.message.from_wire(ask(mode, listener, data)).answer
    listener, _, _ = make_listener(object(), object())
    response = dns.message.from_wire(ask(mode, listener, data))
    assert response.rcode() == dns.rcode.SERVFAIL


def test_large_answer_truncated_for_udp_only(mode: str) -> None:
    data = query(payload=512)
    big = answer_to(data, addresses=60)
    assert len(big) > 512
    listener, _, _ = make_listener(dest(mode, big, big), dest(mode))
    over_udp = dns.message.from_wire(ask(mode, listener, data, "udp"))
    assert over_udp.flags & dns.flags.TC and not over_udp.answer
    over_tcp = dns.message.from_wire(ask(mode, listener, data, "tcp"))
    assert len(over_tcp.answer[0]) == 60


def test_cache_then_stale_answer_when_every_upstream_fails(mode: str) -> None:
    data = query()
    first = dest(mode, answer_to(data, ttl=60), UpstreamError("down"))
    second = dest(mode, UpstreamError("down too"))
    listener, clock, _ = make_listener(first, second, cache=True)
    assert ask(mode, listener, data)
    hit = listener.answer(query(qid=7), ("::1", 1), "udp")
    assert isinstance(hit, bytes) and dns.message.from_wire(hit).id == 7
    assert len(first.asked) == 1
    clock.advance(120)  # expired, within serve_stale
    stale = dns.message.from_wire(ask(mode, listener, query(qid=8)))
    assert stale.id == 8 and stale.answer[0].ttl == 30
    counts = listener.by_route["everything"]
    assert (counts.forwarded, counts.cache, counts.stale, counts.servfail) == (1, 1, 1, 0)


def test_a_bug_after_the_answer_gives_servfail_not_silence(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = query()
    listener, _, _ = make_listener(dest(mode, answer_to(data)), dest(mode), cache=True)

    def broken(*args: Any) -> None:
        raise RuntimeError("cache bug")

    monkeypatch.setattr(DnsCache, "put", broken)
    response = dns.message.from_wire(ask(mode, listener, data))
    assert response.rcode() == dns.rcode.SERVFAIL and response.id == 0x1234
    assert listener.by_route["everything"].servfail == 1


def test_cache_survives_a_reload_with_an_equal_route_and_not_a_changed_one() -> None:
    data = query()
    first = FakeDestination(answer_to(data), answer_to(data))
    listener, _, gateway = make_listener(first, FakeDestination(), cache=True)
    destinations = {"first": first, "second": FakeDestination()}
    ask("resolve", listener, data)
    cache = listener.caches()["everything"]
    # A reload with the same text: equal Route objects, not the same ones.
    config = parse(CONFIG.replace("CACHE", "true"))
    gateway.table = runtime_of(config, destinations)
    assert isinstance(listener.answer(data, ("::1", 1), "udp"), bytes)
    assert listener.caches()["everything"] is cache
    config = parse(CONFIG.replace("CACHE", "true").replace("serve_stale: 1h", "serve_stale: 2h"))
    gateway.table = runtime_of(config, destinations)
    assert ask("resolve", listener, data)
    assert listener.caches()["everything"] is not cache
    assert len(first.asked) == 2


def test_udp_server_sends_the_reply_for_a_forwarded_query() -> None:
    """DnsUdpProtocol passes its reply callback: the answer reaches the client's address."""
    data = query()
    first = FakeAskDestination("later")
    listener, clock, _ = make_listener(first, FakeAskDestination())
    server = DnsUdpProtocol(listener)
    sent: list[tuple[bytes, Any]] = []

    class Port:
        reactor = clock

        class socket:
            @staticmethod
            def sendto(response: bytes, addr: Any) -> None:
                sent.append((response, addr))

    server.makeConnection(Port())  # type: ignore[arg-type]
    server.datagramReceived(data, ("127.0.0.1", 40000))
    first.pending[0].callback(answer_to(data))
    assert not sent  # answers leave together at the end of the reactor's turn
    clock.advance(0)
    [(response, addr)] = sent
    assert addr == ("127.0.0.1", 40000) and dns.message.from_wire(response).id == 0x1234
