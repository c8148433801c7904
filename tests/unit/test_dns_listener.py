"""The DNS listener's forward path in memory: destinations in order, counters, stale, SERVFAIL."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from gateway.config import parse
from gateway.message import Kind
from gateway.ports import Resolver
from gateway.protocols.dns.cache import DnsCache
from gateway.protocols.dns.client import UpstreamError
from gateway.protocols.dns.listener import DnsListener
from gateway.protocols.dns.server import DnsTcpFactory, DnsUdpProtocol
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


def make_listener(*destinations: Any, cache: bool = False) -> tuple[DnsListener, Clock, FakePort]:
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


def edns_query(name: str, qid: int, version: int = 0, dnssec: bool = False) -> bytes:
    message = dns.message.make_query(
        name, "A", use_edns=version, payload=1232, want_dnssec=dnssec, id=qid
    )
    wire: bytes = message.to_wire()
    return wire


def test_edns_version_1_gets_badvers_not_a_cached_answer() -> None:
    """Defect: a query with EDNS version 1 was answered as if it were version 0 (here from the
    cache, which ignores the version), where RFC 6891 §6.1.3 requires RCODE=BADVERS (16: 0 in
    the header, 1 in the OPT's extended RCODE) and an OPT with the version we speak, 0."""
    data = edns_query("www.example.test.", 0x1111)
    first = FakeDestination(answer_to(data))
    listener, _, _ = make_listener(first, FakeDestination(), cache=True)
    assert dns.message.from_wire(ask("resolve", listener, data)).answer
    newer = edns_query("www.example.test.", 0x2222, version=1, dnssec=False)
    out = listener.answer(newer, ("127.0.0.1", 40000), "udp")
    assert isinstance(out, bytes), out
    reply = dns.message.from_wire(out)
    assert reply.id == 0x2222 and reply.flags & dns.flags.QR
    assert reply.rcode() == dns.rcode.BADVERS and out[3] & 0x0F == 0
    assert reply.edns == 0 and not reply.answer
    assert [r.name.to_text() for r in reply.question] == ["www.example.test."]
    assert len(first.asked) == 1, "the version 1 query must not reach an upstream either"


def test_edns_version_1_gets_badvers_from_a_local_answer_route() -> None:
    """Defect: a route with local records (answer:) answered an EDNS version 1 query NOERROR
    with the records, instead of BADVERS (RFC 6891 §6.1.3)."""
    listener = local_listener()
    out = listener.answer(
        edns_query("printer.lan.test.", 7, version=1, dnssec=True), ("127.0.0.1", 1), "udp"
    )
    reply = dns.message.from_wire(out)
    assert reply.rcode() == dns.rcode.BADVERS and not reply.answer
    assert reply.ednsflags & dns.flags.DO  # the DO bit is still copied (RFC 3225 §3)


class _Pending:
    def __init__(self) -> None:
        self.pending: list[tuple[bytes, Deferred[bytes | None]]] = []

    def answer(self, data: bytes, client: Any, transport: str, reply: Any = None) -> Any:
        d: Deferred[bytes | None] = Deferred()
        self.pending.append((data, d))
        return d


def _frame(qid: int) -> bytes:
    wire = dns.message.make_query(f"n{qid}.example.test.", "A", id=qid).to_wire()
    return struct.pack("!H", len(wire)) + wire


def _frames(raw: bytes) -> list[dns.message.Message]:
    out = []
    while raw:
        (length,) = struct.unpack_from("!H", raw)
        out.append(dns.message.from_wire(raw[2 : 2 + length]))
        raw = raw[2 + length :]
    return out


def test_tcp_max_pending_holds_back_queries_that_arrived_in_one_segment() -> None:
    """Defect: DnsTcpProtocol paused the socket at max_pending but went on taking every query
    already read: 200 pipelined queries in one segment were all put in flight at once
    (RFC 7766 §6.2.1.1 lets a server bound a client's concurrent queries; ours did not)."""
    handler = _Pending()
    factory = DnsTcpFactory(handler, Clock(), idle_timeout=30)
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"".join(_frame(i) for i in range(200)))
    assert len(handler.pending) == protocol.max_pending == 64
    assert transport.producerState == "paused"
    # Answers, out of order: the held queries go in flight as room frees up, all answered.
    answered = 0
    while answered < 200:
        batch = list(handler.pending)
        handler.pending.clear()
        assert batch, f"queries stuck after {answered} answers"
        assert len(batch) <= 64
        for data, d in reversed(batch):
            query = dns.message.from_wire(data)
            d.callback(dns.message.make_response(query).to_wire())
            answered += 1
    replies = _frames(transport.value())
    assert sorted(r.id for r in replies) == list(range(200))
    assert transport.producerState == "producing"


class _Echo:
    """Answers every query at once with an empty response."""

    def answer(self, data: bytes, client: Any, transport: str, reply: Any = None) -> Any:
        return dns.message.make_response(dns.message.from_wire(data)).to_wire()


def test_a_tcp_client_trickling_a_query_is_closed_at_the_idle_timeout() -> None:
    """Defect: every byte read restarted the TCP idle timer, so a client sending one byte
    of a query per period held its connection for ever; only whole messages count now."""
    clock = Clock()
    factory = DnsTcpFactory(_Echo(), clock, idle_timeout=10)

    def connect(port: int) -> tuple[Any, StringTransport]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        protocol.makeConnection(transport)
        return protocol, transport

    slow, slow_transport = connect(40000)
    frame = _frame(1)
    for i in range(4):
        clock.advance(3)
        slow.dataReceived(frame[i : i + 1])
    assert slow_transport.disconnecting and slow_transport.value() == b""
    # Whole queries are activity: a client that asks every 9 s stays.
    steady, steady_transport = connect(40001)
    for qid in range(3):
        clock.advance(9)
        steady.dataReceived(_frame(qid))
    assert not steady_transport.disconnecting
    assert [r.id for r in _frames(steady_transport.value())] == [0, 1, 2]
    clock.advance(10)
    assert steady_transport.disconnecting


def test_cache_hit_repeats_the_clients_question_case_and_rd_bit() -> None:
    """Defect: a cache hit returned the question as the first client spelled it, so a client
    randomising the case of its names (0x20, unbound's use-caps-for-id) saw a mismatched
    question, and RD as the first query had it (RFC 1035 §4.1.1: RD is copied)."""
    first_query = dns.message.make_query("WwW.ExAmPlE.TeSt.", "A", id=1)
    data = first_query.to_wire()
    first = FakeDestination(answer_to(data))
    listener, _, _ = make_listener(first, FakeDestination(), cache=True)
    ask("resolve", listener, data)
    second = dns.message.make_query("wWw.eXaMpLe.tEsT.", "A", id=2)
    second.flags &= ~dns.flags.RD
    out = listener.answer(second.to_wire(), ("127.0.0.1", 40000), "udp")
    assert isinstance(out, bytes) and len(first.asked) == 1
    reply = dns.message.from_wire(out)
    assert reply.question[0].name.to_text() == "wWw.eXaMpLe.tEsT."
    assert not reply.flags & dns.flags.RD
    assert reply.id == 2 and reply.answer[0][0].address == "10.0.0.1"


def test_stale_answer_repeats_the_clients_question_case() -> None:
    """Defect: a stale answer (every upstream failing) carried the question as spelled by the
    client whose query filled the cache, not this client's (0x20 clients reject it)."""
    from gateway.protocols.dns.client import UpstreamError

    data = dns.message.make_query("Www.Example.Test.", "A", id=1).to_wire()
    first = FakeDestination(answer_to(data, ttl=10), UpstreamError("down"))
    second = FakeDestination(UpstreamError("down"))
    listener, clock, _ = make_listener(first, second, cache=True)
    ask("resolve", listener, data)
    clock.advance(60)
    again = dns.message.make_query("wWW.eXAMPLE.tEST.", "A", id=2).to_wire()
    reply = dns.message.from_wire(ask("resolve", listener, again))
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    assert reply.question[0].name.to_text() == "wWW.eXAMPLE.tEST."


LOCAL = """\
version: 1
listeners:
  dns-in:
    protocol: dns
    listen: ["udp:5353:interface=127.0.0.1"]
routes:
  - name: local
    from: dns-in
    answer: ["printer.lan.test. 60 IN A 192.0.2.200"]
"""


def local_listener() -> DnsListener:
    config = parse(LOCAL)
    gateway = FakePort(runtime_of(config), reactor=Clock())
    return DnsListener(config.listeners["dns-in"], gateway)  # type: ignore[arg-type]


def test_local_answer_copies_the_do_bit() -> None:
    """Defect: local answers (answer:) cleared the DO bit of a DNSSEC-OK query, which
    RFC 3225 §3 says MUST be copied into the response."""
    out = local_listener().answer(
        edns_query("printer.lan.test.", 9, dnssec=True), ("127.0.0.1", 1), "udp"
    )
    reply = dns.message.from_wire(out)
    assert reply.answer and reply.edns == 0 and reply.ednsflags & dns.flags.DO


def test_local_answer_ignores_trailing_bytes_and_formerrs_bad_records() -> None:
    """Defect: a local-answer route gave SERVFAIL and logged a traceback for a query with bytes
    after its last record (forwarded queries ignore them) and for a query with a malformed
    record (that is the client's FORMERR, RFC 1035 §4.1.1)."""
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        listener = local_listener()
        good = dns.message.make_query("printer.lan.test.", "A", id=5).to_wire()
        reply = dns.message.from_wire(listener.answer(good + b"junk", ("127.0.0.1", 1), "udp"))
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer[0][0].address == "192.0.2.200"
        # ANCOUNT 1 with an A record whose rdata is 3 octets long.
        bad = good[:6] + b"\x00\x01" + good[8:] + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x10"
        bad += b"\x00\x03\x01\x02\x03"
        reply = dns.message.from_wire(listener.answer(bad, ("127.0.0.1", 1), "udp"))
        assert reply.rcode() == dns.rcode.FORMERR and reply.id == 5
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, failures


def test_local_answer_does_not_give_class_in_records_to_another_class() -> None:
    """Defect: a CHAOS-class query for a local name got the route's class IN records back, as if
    they were CH data; the local records are class IN only (RFC 1034 §4.3.2)."""
    query = dns.message.make_query("printer.lan.test.", "A", "CH", id=3).to_wire()
    reply = dns.message.from_wire(local_listener().answer(query, ("127.0.0.1", 1), "udp"))
    assert not reply.answer
    assert reply.rcode() == dns.rcode.REFUSED


def test_other_opcodes_get_notimp_even_without_a_question() -> None:
    """Defect: a DSO message (opcode 6, which has no question, RFC 8490 §5.1.1) or an UPDATE
    with two zones got FORMERR: the question count was checked before the opcode, so the
    client was told its message was malformed rather than that we do not implement the opcode
    (RFC 1035 §4.1.1 NOTIMP; unbound checks the opcode first too)."""
    listener, _, _ = make_listener(FakeDestination(), FakeDestination())
    dso = struct.pack(">HHHHHH", 0x4242, 6 << 11, 0, 0, 0, 0)
    update = struct.pack(">HHHHHH", 0x4343, 5 << 11, 2, 0, 0, 0)
    for data, ident, opcode in ((dso, 0x4242, 6), (update, 0x4343, 5)):
        out = listener.answer(data, ("127.0.0.1", 40000), "udp")
        assert isinstance(out, bytes)
        reply = dns.message.from_wire(out)
        assert reply.id == ident and reply.opcode() == opcode
        assert reply.rcode() == dns.rcode.NOTIMP and reply.flags & dns.flags.QR
    # A response with such an opcode is still dropped (no reflection).
    response = struct.pack(">HHHHHH", 1, 0x8000 | 6 << 11, 0, 0, 0, 0)
    assert listener.answer(response, ("::1", 1), "udp") is None


def test_formerr_for_a_bad_opt_record_carries_an_opt_record() -> None:
    """Defect: a query whose OPT record was itself wrong (two OPT records, an OPT cut off, an
    OPT not owned by the root) got a bare FORMERR header; RFC 6891 §7 says that FORMERR MUST
    include an OPT record, so the client can tell an EDNS format error from a server without
    EDNS (and does not fall back to plain DNS)."""
    listener, _, _ = make_listener(FakeDestination(), FakeDestination())
    good = edns_query("www.example.test.", 0x5151, dnssec=True)
    opt = good[-11:]
    two = good[:10] + b"\x00\x02" + good[12:] + opt
    cut = good[:-2]
    not_root = good[:-11] + b"\x01a\x00" + opt[1:]
    for data in (two, cut, not_root):
        out = listener.answer(data, ("127.0.0.1", 40000), "udp")
        assert isinstance(out, bytes)
        reply = dns.message.from_wire(out)
        assert reply.id == 0x5151 and reply.rcode() == dns.rcode.FORMERR
        assert reply.edns == 0, f"no OPT in the FORMERR for {data!r}"
        assert [r.name.to_text() for r in reply.question] == ["www.example.test."]
    # DO is copied where it could be read (RFC 3225 §3).
    reply = dns.message.from_wire(listener.answer(two, ("127.0.0.1", 40000), "udp"))
    assert reply.ednsflags & dns.flags.DO


def test_cached_answers_do_not_hand_one_clients_cookie_to_another() -> None:
    """Defect: the cache kept the upstream's COOKIE option, which echoes the first client's
    client cookie, and served it to every later client; RFC 7873 §5.3 has a client discard
    an answer whose client cookie is not its own, so cache hits looked spoofed. Other options
    (here NSID) and the records after the OPT record (TTLs aged on hits) stay intact."""
    cookie_a = dns.edns.GenericOption(10, b"AAAAAAAA" + b"S" * 16)
    nsid = dns.edns.GenericOption(3, b"upstream-1")
    query_a = dns.message.make_query(
        "www.example.test.", "A", use_edns=0, id=1, options=[dns.edns.GenericOption(10, b"A" * 8)]
    )
    response = dns.message.make_response(query_a)
    response.use_edns(0, 0, 1232, options=[cookie_a, nsid])
    response.answer.append(dns.rrset.from_text("www.example.test.", 300, "IN", "A", "192.0.2.1"))
    # A record after the OPT: its TTL offset moves when the option goes.
    wire = response.to_wire()
    wire = wire[:10] + b"\x00\x02" + wire[12:] + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c"
    wire += b"\x00\x04\xc0\x00\x02\x02"
    first = FakeDestination(wire)
    listener, clock, _ = make_listener(first, FakeDestination(), cache=True)
    ask("resolve", listener, query_a.to_wire())
    clock.advance(5)
    query_b = dns.message.make_query(
        "www.example.test.", "A", use_edns=0, id=2, options=[dns.edns.GenericOption(10, b"B" * 8)]
    )
    out = listener.answer(query_b.to_wire(), ("127.0.0.1", 40001), "udp")
    assert isinstance(out, bytes) and len(first.asked) == 1
    reply = dns.message.from_wire(out)
    assert [o.otype for o in reply.options] == [3], reply.options
    assert reply.answer[0].ttl == 295
    assert [(r.ttl, r[0].address) for r in reply.additional] == [(295, "192.0.2.2")]


def _ecs_answer(query: dns.message.Message, scope: int) -> bytes:
    response = dns.message.make_response(query)
    ecs = dns.edns.ECSOption("192.0.2.0", 24, scope)
    response.use_edns(0, 0, 1232, options=[ecs])
    response.answer.append(dns.rrset.from_text("www.example.test.", 300, "IN", "A", "192.0.2.1"))
    wire: bytes = response.to_wire()
    return wire


def test_answers_scoped_to_a_client_subnet_are_not_cached_for_everybody() -> None:
    """Defect: an answer with an EDNS Client Subnet option of scope /24 (valid for one
    subnet only, RFC 7871 7.3.1) was cached and served to every client, and one of scope /0
    handed the first client's subnet to all the later ones."""
    ecs_query = dns.message.make_query(
        "www.example.test.", "A", use_edns=0, id=1,
        options=[dns.edns.ECSOption("192.0.2.0", 24)],
    )  # fmt: skip
    other = dns.message.make_query("www.example.test.", "A", use_edns=0, id=2).to_wire()
    # Scope /24: not kept, the next client is asked upstream for again.
    scoped = FakeDestination(_ecs_answer(ecs_query, 24), _ecs_answer(ecs_query, 24))
    listener, _, _ = make_listener(scoped, FakeDestination(), cache=True)
    ask("resolve", listener, ecs_query.to_wire())
    ask("resolve", listener, other)
    assert len(scoped.asked) == 2
    # Scope /0: kept, without the option.
    everyone = FakeDestination(_ecs_answer(ecs_query, 0))
    listener, _, _ = make_listener(everyone, FakeDestination(), cache=True)
    ask("resolve", listener, ecs_query.to_wire())
    out = listener.answer(other, ("127.0.0.1", 40001), "udp")
    assert isinstance(out, bytes) and len(everyone.asked) == 1
    reply = dns.message.from_wire(out)
    assert not reply.options and reply.answer[0][0].address == "192.0.2.1"


def test_without_allow_a_dns_listener_answers_this_host_only(tmp_path: Path) -> None:
    """The default 'allow' of DNS and DoH listeners is loopback: a listener on a public
    address (the systemd socket on [::]:53) is not an open resolver."""
    config = parse(
        "version: 1\nlisteners:\n  d: {protocol: dns, listen: 'udp:53'}\n"
        "  h: {protocol: doh, listen: 'tcp:8443'}\nroutes: [{from: [d, h], action: refuse}]\n",
        "routes.yaml",
        tmp_path,
    )
    for listener in config.listeners.values():
        assert [str(n.net) for n in listener.allow] == ["127.0.0.0/8", "::1/128"]


def test_a_client_outside_allow_is_refused_and_counted() -> None:
    data = query()
    listener, _, _ = make_listener(FakeDestination(answer_to(data)), FakeDestination())
    refused = listener.answer(data, ("192.0.2.1", 5353), "udp")
    assert isinstance(refused, bytes)
    assert dns.message.from_wire(refused).rcode() == dns.rcode.REFUSED
    assert listener.not_allowed == 1 and listener.by_route == {}
    answered = ask("resolve", listener, data)
    assert dns.message.from_wire(answered).answer


def test_udp_answers_are_capped_at_max_udp_size_whatever_the_clients_buffer() -> None:
    """RFC 6891 lets a client ask for 65,535 octets; a 50-octet query then made a
    62,795-octet answer (1,256 times amplification). Answers over max_udp_size (1232 by
    default) go out truncated, with TC, and the client asks again over TCP."""
    data = query(payload=65000)
    big = answer_to(data, addresses=150)
    assert len(big) > 1232
    listener, _, _ = make_listener(FakeDestination(big, big), FakeDestination(), cache=False)
    capped = dns.message.from_wire(ask("resolve", listener, data, "udp"))
    assert capped.flags & dns.flags.TC and not capped.answer
    whole = dns.message.from_wire(ask("resolve", listener, data, "tcp"))
    assert len(whole.answer[0]) == 150
