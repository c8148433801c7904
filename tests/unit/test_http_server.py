"""The HTTP server shell and the listener's store-and-forward answers, in memory."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.config import Network
from gateway.listening import Admission, Guard
from gateway.message import HttpRequest
from gateway.ports import Reason, Status, Verdict
from gateway.protocols.http.listener import HttpListener, HttpSockets
from gateway.protocols.http.server import Exchange, HttpServerFactory, HttpServerProtocol
from tests.support.port import FakePort, runtime_of


class Recorder:
    """A handler that answers each request with its method, target and body."""

    def __init__(self, read_body: bool = True) -> None:
        self.exchanges: list[Exchange] = []
        self.read_body = read_body

    def handle(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)
        parts: list[bytes] = []
        handler = self

        class Sink:
            def body_data(self, data: bytes) -> None:
                parts.append(data)

            def body_end(self) -> None:
                head = exchange.head
                exchange.respond(200, head.method + b" " + head.target + b" " + b"".join(parts))

        if exchange.body_done:
            Sink().body_end()
        elif handler.read_body:
            exchange.read_body(Sink())


def connect(
    factory: HttpServerFactory, port: int = 40000
) -> tuple[HttpServerProtocol, StringTransport]:
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
    protocol.makeConnection(transport)
    return protocol, transport


def factory_for(handler: Any, reactor: MemoryReactorClock, **kw: Any) -> HttpServerFactory:
    return HttpServerFactory(handler, reactor, **kw)


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    reactor = MemoryReactorClock()
    factory = factory_for(Recorder(), reactor)
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"GET /one HTTP/1.1\r\nHost: h\r\n\r\nPOST /two HTTP/1.1\r\nHost: h\r\n"
        b"Content-Length: 3\r\n\r\nabcGET /three HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    out = transport.value()
    assert out.index(b"GET /one") < out.index(b"POST /two abc") < out.index(b"GET /three")
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert transport.disconnecting  # the third asked to close
    assert out.rstrip().endswith(b"GET /three")


def test_a_trickled_header_is_cut_off_after_header_timeout() -> None:
    reactor = MemoryReactorClock()
    factory = factory_for(Recorder(), reactor, header_timeout=2.0, idle_timeout=100.0)
    protocol, transport = connect(factory)
    for byte in b"GET / HTTP/1.1\r\nHost":
        protocol.dataReceived(bytes([byte]))
        reactor.advance(0.25)
    reactor.advance(1.0)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


def test_an_idle_connection_is_closed_silently() -> None:
    reactor = MemoryReactorClock()
    factory = factory_for(Recorder(), reactor, idle_timeout=5.0)
    _, transport = connect(factory)
    reactor.advance(4.0)
    assert not transport.disconnecting
    reactor.advance(2.0)
    assert transport.disconnecting and transport.value() == b""


def test_a_stalled_body_is_cut_off_after_idle_timeout() -> None:
    reactor = MemoryReactorClock()
    factory = factory_for(Recorder(), reactor, idle_timeout=5.0)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    reactor.advance(3.0)
    protocol.dataReceived(b"de")  # progress resets the clock
    reactor.advance(3.0)
    assert not transport.disconnecting
    reactor.advance(3.0)
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting


def test_too_many_connections_get_503() -> None:
    reactor = MemoryReactorClock()
    factory = factory_for(Recorder(read_body=False), reactor, guard=Guard("web", (), 1))
    busy, first = connect(factory)
    busy.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\npart")
    first.clear()
    _, second = connect(factory, 40001)
    assert first.value() == b"" and not first.disconnecting
    answer = second.value()
    assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer
    # A request already on its way is read and dropped (a lingering close), so the
    # client gets the 503 rather than a reset; then the connection closes.
    protocol = next(p for p in factory.guard.connections if p.transport is second)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\nsome body")
    assert second.value() == answer and not second.disconnecting
    reactor.advance(5.1)
    factory.sweep()
    assert second.disconnecting


def test_when_full_the_longest_idle_connection_makes_room() -> None:
    """Defect: 1,000 sockets that sent nothing filled max_connections and every other
    client got 503. As nginx reuses idle keep-alive connections when it runs out, the
    connection idle the longest is closed for a new one; busy ones never are."""
    reactor = MemoryReactorClock()
    factory = factory_for(Recorder(), reactor, guard=Guard("web", (), 3))
    idle = []
    for n in range(3):
        idle.append(connect(factory, 40000 + n))
        reactor.advance(1)
    idle[0][0].dataReceived(b"GET /busy")  # a request on its way: never closed
    _, newcomer = connect(factory, 41000)
    assert newcomer.value() == b"" and not newcomer.disconnecting
    assert [t.disconnecting for _, t in idle] == [False, True, False]
    assert factory.guard.aborted == {"idle_closed_for_room": 1}


def test_a_body_trickled_in_is_cut_at_the_body_deadline() -> None:
    """Defect: each byte of a body restarted the idle timer, so bodies sent at a byte a
    second each held a connection (and, proxied, an upstream connection) with no limit."""
    reactor = MemoryReactorClock()
    factory = factory_for(Recorder(), reactor, idle_timeout=5, body_timeout=20)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n")
    for _ in range(25):
        protocol.dataReceived(b"x")
        reactor.advance(1)
        factory.sweep()
        if transport.value():
            break
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert 19 <= reactor.seconds() <= 21
    factory.stop()


def test_body_over_max_body_gets_413_while_streaming() -> None:
    reactor = MemoryReactorClock()
    factory = factory_for(Recorder(), reactor, max_body=10)
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n"
    )
    assert transport.value() == b""
    protocol.dataReceived(b"8\r\n12345678\r\n0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    # The rest after the 413 is not parsed: it is dropped until the client is quiet.
    assert not transport.disconnecting
    reactor.advance(5.1)
    factory.sweep()
    assert transport.disconnecting


def test_413_mid_body_lingers_then_closes_after_a_quiet_spell() -> None:
    reactor = MemoryReactorClock()
    recorder = Recorder()
    factory = factory_for(recorder, reactor, max_body=10)
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n" + b"x" * 16
    )
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer
    # The client is still sending: closing now would reset the connection, and the
    # client could lose the 413. Its data is read and dropped instead.
    assert not transport.disconnecting
    for _ in range(3):
        reactor.advance(4)
        factory.sweep()
        protocol.dataReceived(b"y" * 4096)
        assert not transport.disconnecting
    assert transport.value() == answer  # nothing more is said
    reactor.advance(5.1)
    factory.sweep()
    assert transport.disconnecting
    assert len(recorder.exchanges) == 1


def test_lingering_ends_after_thirty_seconds_however_busy_the_client() -> None:
    reactor = MemoryReactorClock()
    factory = factory_for(Recorder(), reactor, max_body=10)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    protocol.dataReceived(b"20\r\n" + b"x" * 20)
    assert transport.value().startswith(b"HTTP/1.1 413 ") and not transport.disconnecting
    for _ in range(14):
        reactor.advance(2)
        factory.sweep()
        protocol.dataReceived(b"y" * 1024)
    assert not transport.disconnecting  # 28 s
    reactor.advance(2.5)
    protocol.dataReceived(b"y" * 1024)
    assert transport.disconnecting


def test_a_declared_length_over_max_body_is_413_before_the_handler_and_without_100() -> None:
    reactor = MemoryReactorClock()
    recorder = Recorder()
    factory = factory_for(recorder, reactor, max_body=1000)
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"PUT /big HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer
    assert b"1001 bytes" in answer
    assert recorder.exchanges == []
    # The body the client may send anyway is dropped; the connection closes once it is quiet.
    assert not transport.disconnecting
    protocol.dataReceived(b"z" * 1001)
    assert transport.value() == answer
    reactor.advance(6)
    factory.sweep()
    assert transport.disconnecting
    # At the limit exactly, the request goes through.
    protocol, transport = connect(factory, 40001)
    protocol.dataReceived(
        b"PUT /ok HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n" + b"a" * 1000
    )
    assert transport.value().startswith(b"HTTP/1.1 200 ")


def test_a_handler_that_waits_makes_the_connection_stop_reading() -> None:
    reactor = MemoryReactorClock()
    recorder = Recorder(read_body=False)
    factory = factory_for(recorder, reactor)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 900000\r\n\r\n")
    for _ in range(5):
        protocol.dataReceived(b"x" * 65536)
    assert transport.producerState == "paused"  # not read into memory without end
    exchange = recorder.exchanges[0]
    got: list[int] = []

    class Sink:
        def body_data(self, data: bytes) -> None:
            got.append(len(data))
            exchange.pause_body()

        def body_end(self) -> None:
            pass

    exchange.read_body(Sink())
    assert got == [5 * 65536]  # what was buffered, then the sink paused
    assert transport.producerState == "paused"
    exchange.resume_body()
    assert transport.producerState == "producing"
    protocol.dataReceived(b"y" * 1000)
    assert got == [5 * 65536, 1000]


def test_expect_100_continue_is_answered_when_the_body_is_wanted() -> None:
    reactor = MemoryReactorClock()
    factory = factory_for(Recorder(), reactor)
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    protocol.dataReceived(b"ok")
    assert b"PUT /x ok" in transport.value()


# --- the listener's store-and-forward answers --------------------------------------------


HOOKS = """
version: 1
listeners:
  web: {protocol: http, listen: "tcp:8080", max_size: 100}
destinations:
  box: {protocol: maildir, path: box}
routes:
  - {name: hooks, from: web, match: {prefix: /hooks/}, transforms: [http_to_mail], to: box}
"""


def hooks_port(verdict: Verdict) -> FakePort:
    """A FakePort with one web hook route, answering ``verdict``."""
    return FakePort(runtime_of(HOOKS), verdict=verdict)


def post(
    verdict: Verdict, target: bytes = b"/hooks/a", body: bytes = b'{"a": 1}'
) -> tuple[FakePort, bytes]:
    gateway = hooks_port(verdict)
    listener = HttpListener(gateway.current().config.listeners["web"], gateway)
    reactor = MemoryReactorClock()
    factory = factory_for(listener, reactor, max_body=100)
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"POST "
        + target
        + b" HTTP/1.1\r\nHost: hooks.example.test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    return gateway, transport.value()


def test_delivered_is_202_with_the_message_id() -> None:
    gateway, out = post(Verdict(Status.DELIVERED, Reason.NONE, "queued"))
    [message] = gateway.submitted
    assert isinstance(message, HttpRequest)
    assert message.method == "POST" and message.target == "/hooks/a" and message.body == b'{"a": 1}'
    assert message.host == "hooks.example.test" and message.client == "127.0.0.1"
    assert ("Content-Type", "application/json") in message.http_headers
    assert out.startswith(b"HTTP/1.1 202 ")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["id"] == message.id


def test_refusals_and_temporary_failures() -> None:
    _, out = post(Verdict(Status.PERMANENT, Reason.UNAUTHENTICATED, "bad signature"))
    assert out.startswith(b"HTTP/1.1 401 ") and b"bad signature" in out
    _, out = post(Verdict(Status.PERMANENT, Reason.NO_ROUTE, "no route"))
    assert out.startswith(b"HTTP/1.1 404 ")
    _, out = post(Verdict(Status.PERMANENT, Reason.BAD_MESSAGE, "not JSON"))
    assert out.startswith(b"HTTP/1.1 400 ")
    _, out = post(Verdict(Status.PERMANENT, Reason.POLICY, "not from you"))
    assert out.startswith(b"HTTP/1.1 403 ")
    _, out = post(Verdict(Status.TEMPORARY, Reason.UNAVAILABLE, "the spool is full"))
    assert out.startswith(b"HTTP/1.1 503 ") and b"Retry-After: " in out


def test_clients_outside_allow_get_403() -> None:
    gateway = hooks_port(Verdict(Status.DELIVERED, Reason.NONE, "queued"))
    config = dataclasses.replace(
        gateway.current().config.listeners["web"], allow=(Network.parse("10.0.0.0/8"),)
    )
    sockets = HttpSockets(config, gateway, MemoryReactorClock())
    protocol, transport = connect(sockets.factory())
    protocol.dataReceived(b"POST /hooks/a HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}")
    assert transport.value().startswith(b"HTTP/1.1 403 ") and not gateway.submitted
    assert sockets.guard.refused[Admission.NOT_ALLOWED] == 1


def test_no_route_and_too_large_are_answered_without_submitting() -> None:
    gateway, out = post(Verdict(Status.DELIVERED, Reason.NONE, "queued"), target=b"/elsewhere")
    assert out.startswith(b"HTTP/1.1 404 ") and not gateway.submitted
    gateway, out = post(Verdict(Status.DELIVERED, Reason.NONE, "queued"), body=b"x" * 101)
    assert out.startswith(b"HTTP/1.1 413 ") and not gateway.submitted


def test_the_server_sends_no_100_continue_to_an_http10_client() -> None:
    reactor = MemoryReactorClock()
    protocol, transport = connect(factory_for(Recorder(), reactor))
    protocol.dataReceived(b"PUT /x HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value() == b""
    protocol.dataReceived(b"ok")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert b"PUT /x ok" in transport.value()


@pytest.mark.parametrize(
    "target",
    [
        b"/hooks/../admin",
        b"/hooks/%2e%2e/admin",
        b"/hooks/.%2E/admin",
        b"/hooks/..%2fadmin",
        b"/hooks/..\\admin",
        b"/hooks/./a",
        b"/hooks/..",
    ],
)
def test_dot_segments_that_would_leave_the_route_s_prefix_are_400(target: bytes) -> None:
    # The route matched "/hooks/"; an upstream that resolves ".." would serve "/admin".
    gateway, out = post(Verdict(Status.DELIVERED, Reason.NONE, "queued"), target=target)
    assert out.startswith(b"HTTP/1.1 400 ") and not gateway.submitted


@pytest.mark.parametrize("target", [b"/hooks/.well-known/a", b"/hooks/a..b", b"/hooks/a?x=/../y"])
def test_dots_that_are_not_dot_segments_are_taken(target: bytes) -> None:
    gateway, out = post(Verdict(Status.DELIVERED, Reason.NONE, "queued"), target=target)
    assert out.startswith(b"HTTP/1.1 202 ") and gateway.submitted
