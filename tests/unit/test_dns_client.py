"""The UDP side of DnsUpstream in memory: matching answers, the timeout wheel, failover, sockets."""

from __future__ import annotations

from typing import Any

import dns.message
import dns.rrset
import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.protocols.dns.client import DnsUpstream, UpstreamError
from gateway.protocols.dns.wire import parse_query

FIRST = ("127.0.0.1", 5301)
SECOND = ("127.0.0.1", 5302)


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> int:
        self.sent.append((data, addr))
        return len(data)


class FakePort:
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.socket = FakeSocket()
        self.listening = True

    def stopListening(self) -> None:
        self.listening = False


class UdpClock(Clock):
    """A Clock whose listenUDP hands out FakePorts, remembered in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []
        self.packet_sizes: list[int] = []

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> FakePort:
        self.packet_sizes.append(maxPacketSize)
        fake = FakePort(protocol)
        protocol.makeConnection(fake)
        self.ports.append(fake)
        return fake

    def sent(self) -> list[tuple[FakePort, bytes, Any]]:
        """Every datagram sent so far, with its port, and forget them."""
        self.advance(0)  # queries go out once the reactor has read what is waiting
        out = []
        for port in self.ports:
            out += [(port, data, addr) for data, addr in port.socket.sent]
            port.socket.sent.clear()
        return out


def query(name: str = "www.example.test.", qid: int = 4242) -> bytes:
    message = dns.message.make_query(name, "A", use_edns=False)
    message.id = qid
    wire: bytes = message.to_wire()
    return wire


def answer_to(sent: bytes, name: str | None = None) -> bytes:
    """unbound's answer to the datagram ``sent``, optionally spelling the name otherwise."""
    message = dns.message.from_wire(sent)
    response = dns.message.make_response(message)
    owner = name or message.question[0].name.to_text()
    if name is not None:
        response.question = [dns.rrset.RRset(dns.name.from_text(name), 1, 1)]
    response.answer.append(dns.rrset.from_text(owner, 300, "IN", "A", "192.0.2.10"))
    wire: bytes = response.to_wire()
    return wire


def resolve(upstream: DnsUpstream, data: bytes) -> list[Any]:
    results: list[Any] = []
    upstream.resolve(data, parse_query(data)).addBoth(results.append)
    return results


def test_answer_comes_back_with_the_upstream_id_and_the_question_checked() -> None:
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST], timeout=2.0)
    data = query()
    results = resolve(upstream, data)
    [(port, sent, addr)] = clock.sent()
    assert addr == FIRST and sent[2:] == data[2:]
    port.protocol.datagramReceived(answer_to(sent), FIRST)
    assert results == [answer_to(sent)]
    assert upstream.ignored == 0


@pytest.mark.parametrize(
    "tamper",
    ["wrong id", "wrong server", "other name", "a query", "short"],
)
def test_answers_that_do_not_match_are_ignored(tamper: str) -> None:
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST], timeout=2.0)
    results = resolve(upstream, query())
    [(port, sent, _)] = clock.sent()
    good = answer_to(sent)
    bad, source = good, FIRST
    if tamper == "wrong id":
        bad = bytes([sent[0] ^ 0xFF, sent[1]]) + good[2:]
    elif tamper == "wrong server":
        source = SECOND
    elif tamper == "other name":
        bad = answer_to(sent, name="other.example.test.")
    elif tamper == "a query":
        bad = sent
    else:
        bad = good[:11]
    port.protocol.datagramReceived(bad, source)
    assert results == [] and upstream.ignored == 1
    port.protocol.datagramReceived(good, FIRST)
    assert results == [good]


def test_an_upstream_that_changes_the_case_of_the_name_is_still_matched() -> None:
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST], timeout=2.0)
    results = resolve(upstream, query("www.example.test."))
    [(port, sent, _)] = clock.sent()
    reply = answer_to(sent, name="WwW.ExAmple.TEST.")
    port.protocol.datagramReceived(reply, FIRST)
    assert results == [reply]


def test_no_answer_fails_after_the_timeout_and_not_before() -> None:
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST], timeout=0.5)
    results = resolve(upstream, query())
    clock.advance(0.45)
    assert results == []
    clock.advance(0.2)  # the wheel turns every 0.1 s: at most a tick late
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(UpstreamError)
    assert "127.0.0.1:5301: no answer within 0.5s" in str(failure.value)
    # A late answer finds nothing waiting, and the wheel stops turning once empty.
    [(port, sent, _)] = clock.sent()
    port.protocol.datagramReceived(answer_to(sent), FIRST)
    assert upstream.ignored == 1 and not clock.getDelayedCalls()


def test_answered_attempts_leave_the_timeout_wheel() -> None:
    """A turn of the wheel meets only attempts that did time out, not every answered one."""
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST], timeout=0.5)
    answered = [resolve(upstream, query(f"a{i}.example.test.", qid=i)) for i in range(50)]
    silent = resolve(upstream, query("silent.example.test.", qid=99))
    for port, data, _ in clock.sent():
        if b"silent" not in data:
            port.protocol.datagramReceived(answer_to(data), FIRST)
    assert all(len(got) == 1 for got in answered)
    assert sum(len(bucket) for bucket in upstream._wheel.values()) == 1
    clock.advance(0.7)
    [failure] = silent
    assert failure.check(UpstreamError)
    assert not upstream._wheel and not clock.getDelayedCalls()


def test_the_next_server_is_asked_when_the_first_is_silent() -> None:
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST, SECOND], timeout=1.0)
    results = resolve(upstream, query())
    [(first_port, first, _)] = clock.sent()
    clock.advance(1.2)
    [(port, second, addr)] = clock.sent()
    assert addr == SECOND and results == []
    # The first server's late answer is not taken; the second's is.
    first_port.protocol.datagramReceived(answer_to(first), FIRST)
    assert results == []
    port.protocol.datagramReceived(answer_to(second), SECOND)
    assert results == [answer_to(second)]


def test_every_server_silent_names_each_in_the_error() -> None:
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST, SECOND], timeout=1.0)
    results = resolve(upstream, query())
    clock.advance(1.2)
    clock.advance(1.2)
    [failure] = results
    assert str(failure.value) == (
        "127.0.0.1:5301: no answer within 1s; 127.0.0.1:5302: no answer within 1s"
    )


def test_many_queries_in_flight_each_get_their_own_answer() -> None:
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST], timeout=2.0, sockets=4)
    names = [f"host{i}.example.test." for i in range(200)]
    results = {name: resolve(upstream, query(name, qid=i)) for i, name in enumerate(names)}
    sent = clock.sent()
    assert len(sent) == 200 and len(clock.ports) == 4
    # Upstream IDs are unique per socket: (socket, ID) tells every query apart.
    assert len({(id(port), data[:2]) for port, data, _ in sent}) == 200
    for port, data, _ in reversed(sent):
        port.protocol.datagramReceived(answer_to(data), FIRST)
    for name, got in results.items():
        assert len(got) == 1 and dns.message.from_wire(got[0]).question[0].name.to_text() == name


def test_a_socket_is_replaced_after_rotate_after_queries_and_closed_when_idle() -> None:
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST], timeout=2.0, sockets=1, rotate_after=3)
    pending = []
    for i in range(3):
        resolve(upstream, query(qid=i))
        pending += clock.sent()
    old = clock.ports[0]
    resolve(upstream, query(qid=9))
    assert len(clock.ports) == 2 and old.listening  # the old one still waits for answers
    for port, data, _ in pending:
        port.protocol.datagramReceived(answer_to(data), FIRST)
    assert not old.listening and clock.ports[1].listening


def test_close_fails_what_is_pending_and_stops_the_timer() -> None:
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST], timeout=2.0)
    results = resolve(upstream, query())
    upstream.close()
    [failure] = results
    assert "the gateway is stopping" in str(failure.value)
    assert not clock.getDelayedCalls() and not clock.ports[0].listening


def test_upstream_sockets_read_whole_datagrams_of_any_dns_size() -> None:
    """Defect: Twisted reads 8,192 octets of a datagram unless told otherwise, so a longer
    upstream answer was passed on cut short, claiming all its records."""
    clock = UdpClock()
    upstream = DnsUpstream(clock, [FIRST], timeout=2.0)
    resolve(upstream, query())
    assert clock.packet_sizes == [65535]
