"""The reverse proxy in memory: both connections are StringTransports on a MemoryReactorClock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from gateway.config import Duration
from gateway.protocols.http.config import HttpDestinationConfig, HttpUrl
from gateway.protocols.http.proxy import HttpProxyDestination
from gateway.protocols.http.server import Exchange, HttpServerFactory, HttpServerProtocol


class Harness:
    def __init__(self, *urls: str, **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        config = HttpDestinationConfig(
            name="app", url=tuple(HttpUrl.parse(u) for u in urls), **options
        )
        self.proxy = HttpProxyDestination(config, self.reactor)
        self.factory = HttpServerFactory(self, self.reactor)
        self.upstreams: list[tuple[Any, StringTransport]] = []
        self.connects = 0

    def handle(self, exchange: Exchange) -> None:
        self.proxy.proxy(exchange, "to-app")

    def client(self) -> tuple[HttpServerProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 5555))
        protocol.makeConnection(transport)
        return protocol, transport

    def accept(self, index: int = -1) -> tuple[Any, StringTransport]:
        """Complete the proxy's latest connection attempt (to the upstream at ``index``)."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        self.upstreams.append((protocol, transport))
        return protocol, transport

    def refuse(self, index: int = -1) -> None:
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\nX-App: 1\r\n\r\nhello"


def test_request_and_response_headers_and_connection_reuse() -> None:
    h = Harness("http://127.0.0.1:8081/base")
    client, out = h.client()
    client.dataReceived(
        b"GET /x?y=1 HTTP/1.1\r\nHost: www.example.test\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\nTE: trailers\r\nX-Forwarded-For: 203.0.113.9\r\nUpgrade: h2c\r\n"
        b"Proxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n"
    )
    upstream, wire = h.accept()
    sent = wire.value()
    head, _, _ = sent.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /base/x?y=1 HTTP/1.1"
    fields = dict(line.split(b": ", 1) for line in lines[1:])
    assert fields[b"Host"] == b"www.example.test"
    assert fields[b"X-Forwarded-For"] == b"203.0.113.9, 192.0.2.10"
    assert fields[b"X-Forwarded-Proto"] == b"http"
    assert fields[b"Forwarded"] == b'for=192.0.2.10;proto=http;host="www.example.test"'
    assert fields[b"Accept"] == b"*/*"
    for hop in (b"Connection", b"X-Secret", b"TE", b"Upgrade", b"Proxy-Authorization"):
        assert hop not in fields
    upstream.dataReceived(RESPONSE)
    answer = out.value()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhello")
    assert b"Keep-Alive" not in answer and b"X-App: 1" in answer
    # The upstream connection went back to the pool: the next request uses it.
    out.clear()
    wire.clear()
    client.dataReceived(b"GET /two HTTP/1.1\r\nHost: www.example.test\r\n\r\n")
    assert len(h.reactor.tcpClients) == 1
    assert wire.value().startswith(b"GET /base/two HTTP/1.1\r\n")
    upstream.dataReceived(RESPONSE)
    assert out.value().endswith(b"hello")


def test_a_close_delimited_response_becomes_chunked_and_the_connection_is_not_kept() -> None:
    h = Harness("http://127.0.0.1:8081", host="upstream")
    client, out = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n")
    upstream, wire = h.accept()
    assert b"\r\nHost: 127.0.0.1:8081\r\n" in wire.value()  # host: upstream
    upstream.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome ")
    upstream.dataReceived(b"text")
    upstream.connectionLost(Failure(ConnectionError()))
    answer = out.value()
    assert b"Transfer-Encoding: chunked" in answer
    assert answer.endswith(b"5\r\nsome \r\n4\r\ntext\r\n0\r\n\r\n")
    assert not h.proxy.upstreams[0].idle
    assert not out.disconnecting  # the client's connection stays open


def test_streamed_chunked_upload_and_interim_responses() -> None:
    h = Harness("http://127.0.0.1:8081")
    client, out = h.client()
    client.dataReceived(
        b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    )
    upstream, wire = h.accept()
    assert out.value() == b"HTTP/1.1 100 Continue\r\n\r\n"  # once the upstream is there
    assert b"Transfer-Encoding: chunked" in wire.value() and b"Expect" not in wire.value()
    client.dataReceived(b"3\r\nabc\r\n")
    assert wire.value().endswith(b"\r\n\r\n3\r\nabc\r\n")  # sent on before the body ends
    client.dataReceived(b"0\r\n\r\n")
    assert wire.value().endswith(b"3\r\nabc\r\n0\r\n\r\n")
    upstream.dataReceived(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    assert out.value().count(b"100 Continue") == 1
    assert b"HTTP/1.1 201 Created" in out.value()


def test_no_answer_in_time_is_504_and_the_upstream_is_skipped() -> None:
    h = Harness("http://127.0.0.1:8081", "http://127.0.0.1:8082", timeout=Duration(5))
    client, out = h.client()
    client.dataReceived(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    h.accept()
    h.reactor.advance(4.5)
    assert out.value() == b""
    h.reactor.advance(1.5)
    assert out.value().startswith(b"HTTP/1.1 504 ")
    assert b"to-app" in out.value()
    assert not h.proxy.upstreams[0].healthy
    # The next request goes to the other upstream.
    out.clear()
    client.dataReceived(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert h.reactor.tcpClients[-1][1] == 8082


def test_connect_failure_moves_on_then_502_when_none_is_left() -> None:
    h = Harness("http://127.0.0.1:8081", "http://127.0.0.1:8082", fail_timeout=Duration(30))
    client, out = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    h.refuse()
    assert h.reactor.tcpClients[-1][1] == 8082
    h.refuse()
    assert out.value().startswith(b"HTTP/1.1 502 ")
    assert b"to-app" in out.value() and b"cannot connect" in out.value()
    assert not any(u.healthy for u in h.proxy.upstreams)
    h.reactor.advance(31)
    assert all(u.healthy for u in h.proxy.upstreams)


def test_a_pooled_connection_the_server_closed_is_retried_on_a_new_one() -> None:
    h = Harness("http://127.0.0.1:8081")
    client, out = h.client()
    client.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    first, _ = h.accept()
    first.dataReceived(RESPONSE)
    out.clear()
    client.dataReceived(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    # The server had closed the kept connection: it goes away without an answer.
    first.connectionLost(Failure(ConnectionError()))
    assert len(h.reactor.tcpClients) == 2
    second, wire = h.accept()
    assert wire.value().startswith(b"GET /b ")
    second.dataReceived(RESPONSE)
    assert out.value().startswith(b"HTTP/1.1 200 ")
    assert h.proxy.upstreams[0].healthy


def test_a_kept_connection_idle_past_keepalive_timeout_is_closed() -> None:
    h = Harness("http://127.0.0.1:8081", keepalive_timeout=Duration(30))
    client, out = h.client()
    client.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    first, wire = h.accept()
    first.dataReceived(RESPONSE)
    assert out.value().endswith(b"hello")
    upstream = h.proxy.upstreams[0]
    assert len(upstream.idle) == 1
    kept = upstream.idle[0]
    h.reactor.advance(20)
    assert upstream.idle == [kept] and not wire.disconnecting
    h.reactor.advance(11)
    # Idle for more than 30 s: closed before the upstream's own timeout can race a request.
    assert upstream.idle == [] and wire.disconnecting
    out.clear()
    client.dataReceived(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(h.reactor.tcpClients) == 2
    second, wire2 = h.accept()
    assert wire2.value().startswith(b"GET /b ")
    second.dataReceived(RESPONSE)
    assert out.value().endswith(b"hello")


def test_least_connections_and_round_robin() -> None:
    h = Harness("http://127.0.0.1:8081", "http://127.0.0.1:8082", "http://127.0.0.1:8083")
    picks = [h.proxy.choose([]).url.port for _ in range(6)]  # type: ignore[union-attr]
    assert picks == [8081, 8082, 8083, 8081, 8082, 8083]
    h = Harness("http://127.0.0.1:8081", "http://127.0.0.1:8082", balance="least-connections")
    a, b = h.proxy.upstreams
    a.active = 3
    assert h.proxy.choose([]) is b
    b.active = 5
    assert h.proxy.choose([]) is a


def test_client_gone_mid_response_closes_the_upstream_connection() -> None:
    h = Harness("http://127.0.0.1:8081")
    client, _ = h.client()
    client.dataReceived(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, wire = h.accept()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    client.connectionLost(Failure(ConnectionError()))
    assert wire.disconnecting
    assert not h.proxy.upstreams[0].idle


def _forwarded_head(wire: bytes) -> dict[bytes, bytes]:
    head = wire.partition(b"\r\n\r\n")[0]
    return {
        name.lower(): value
        for name, _, value in (line.partition(b": ") for line in head.split(b"\r\n")[1:])
    }


def test_connection_naming_content_length_does_not_strip_the_request_framing() -> None:
    # Dropping Content-Length because Connection names it would make the upstream read the
    # body as the next request: request smuggling.
    h = Harness("http://127.0.0.1:8081")
    client, _ = h.client()
    client.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: Content-Length\r\nContent-Length: 33\r\n\r\n"
        b"GET /admin HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    _upstream, wire = h.accept()
    fields = _forwarded_head(wire.value())
    assert fields.get(b"content-length") == b"33" or fields.get(b"transfer-encoding") == b"chunked"


def test_connection_naming_content_length_does_not_strip_the_response_framing() -> None:
    h = Harness("http://127.0.0.1:8081")
    client, out = h.client()
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, _ = h.accept()
    upstream.dataReceived(
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"
    )
    answer = out.value()
    assert b"\r\nContent-Length: 5\r\n" in answer or b"Transfer-Encoding: chunked" in answer
    assert answer.endswith(b"hello") or answer.endswith(b"0\r\n\r\n")


def test_a_post_is_not_sent_again_when_a_pooled_connection_dies() -> None:
    # RFC 9112 section 9.3.1: a proxy must not retry a non-idempotent request by itself;
    # the upstream may have acted on the first copy before its connection closed.
    h = Harness("http://127.0.0.1:8081")
    client, out = h.client()
    client.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    first, wire = h.accept()
    first.dataReceived(RESPONSE)
    out.clear()
    wire.clear()
    client.dataReceived(b"POST /pay HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    assert wire.value().startswith(b"POST /pay ")
    first.connectionLost(Failure(ConnectionError()))
    assert len(h.reactor.tcpClients) == 1  # no second connection, no second POST
    assert out.value().startswith(b"HTTP/1.1 502 ")
    # A kept-alive connection closing is no sign of a failing upstream: not skipped.
    assert h.proxy.upstreams[0].healthy


def test_an_absolute_form_target_sets_the_host_sent_upstream() -> None:
    # RFC 9112 section 3.2.2: the authority in the target wins over the Host field (the
    # listener routes on it, so the upstream must get the same).
    h = Harness("http://127.0.0.1:8081")
    client, _ = h.client()
    client.dataReceived(b"GET http://right.example/x?y HTTP/1.1\r\nHost: wrong.example\r\n\r\n")
    _upstream, wire = h.accept()
    assert wire.value().startswith(b"GET /x?y HTTP/1.1\r\n")
    fields = _forwarded_head(wire.value())
    assert fields[b"host"] == b"right.example"
    assert b'host="right.example"' in fields[b"forwarded"]


def test_a_head_response_with_content_length_does_not_wait_for_a_body() -> None:
    h = Harness("http://127.0.0.1:8081")
    client, out = h.client()
    client.dataReceived(b"HEAD /big HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, wire = h.accept()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
    answer = out.value()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n")
    assert b"\r\nContent-Length: 1000000\r\n" in answer
    assert b"Transfer-Encoding" not in answer
    # Done: the next request on the same client connection reuses the upstream connection.
    out.clear()
    wire.clear()
    client.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(h.reactor.tcpClients) == 1
    assert wire.value().startswith(b"GET /a ")
    upstream.dataReceived(RESPONSE)
    assert out.value().endswith(b"hello")


@pytest.mark.parametrize("status", [204, 304])
def test_responses_without_a_body_end_at_their_head(status: int) -> None:
    h = Harness("http://127.0.0.1:8081")
    client, out = h.client()
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, _ = h.accept()
    upstream.dataReceived(b'HTTP/1.1 %d X\r\nETag: "1"\r\n\r\n' % status)
    answer = out.value()
    assert answer.startswith(b"HTTP/1.1 %d " % status) and answer.endswith(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in answer
    assert h.proxy.upstreams[0].idle  # complete: back in the pool


def test_an_early_response_closes_both_connections_and_pools_nothing() -> None:
    h = Harness("http://127.0.0.1:8081")
    client, out = h.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    upstream, wire = h.accept()
    upstream.dataReceived(b"HTTP/1.1 413 Too Big\r\nContent-Length: 3\r\n\r\nno\n")
    answer = out.value()
    assert answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer
    assert wire.disconnecting and not h.proxy.upstreams[0].idle
    # The rest of the body is read and dropped (a lingering close), never parsed as a
    # request, and the connection closes once the client has been quiet for a while.
    assert not out.disconnecting
    client.dataReceived(b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n" + b"x" * 40)
    assert out.value() == answer and len(h.reactor.tcpClients) == 1
    h.reactor.advance(6)
    client.factory.sweep()
    assert out.disconnecting


def test_a_client_that_stalls_its_upload_does_not_mark_the_upstream_failed() -> None:
    # Waiting on the client is not the upstream's fault: no 504, no "skipped for a while";
    # the listener's idle timeout ends it with 408.
    h = Harness("http://127.0.0.1:8081", "http://127.0.0.1:8082", timeout=Duration(5))
    client, out = h.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    _upstream, wire = h.accept()
    for _ in range(20):
        h.reactor.advance(0.5)
    assert out.value() == b""
    assert all(u.healthy for u in h.proxy.upstreams)
    for _ in range(110):
        h.reactor.advance(0.5)
    assert out.value().startswith(b"HTTP/1.1 408 ")
    assert wire.disconnecting and not h.proxy.upstreams[0].idle
    assert all(u.healthy for u in h.proxy.upstreams)


def test_an_upstream_that_stops_reading_the_upload_is_a_504() -> None:
    h = Harness("http://127.0.0.1:8081", timeout=Duration(5))
    client, out = h.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n")
    _upstream, wire = h.accept()
    wire.producer.pauseProducing()  # the upstream's socket buffer is full
    client.dataReceived(b"x" * 10)
    for _ in range(14):
        h.reactor.advance(0.5)
    assert out.value().startswith(b"HTTP/1.1 504 ")
    assert not h.proxy.upstreams[0].healthy


def test_a_client_gone_mid_upload_to_a_slow_upstream_really_closes_the_upstream() -> None:
    # Twisted's loseConnection() waits on a paused streaming producer: with the request
    # body still registered as the upstream's producer, the connection would never close
    # (it would resume the producer and stop there).  Closing must unregister it.
    h = Harness("http://127.0.0.1:8081")
    client, _ = h.client()
    client.dataReceived(
        b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10
    )
    _upstream, wire = h.accept()
    assert wire.producer is not None
    wire.producer.pauseProducing()  # the upstream reads slowly
    client.connectionLost(Failure(ConnectionError()))
    assert wire.disconnecting
    assert wire.producer is None
    assert not h.proxy.upstreams[0].idle


def test_connection_close_from_the_upstream_is_not_pooled_nor_passed_on() -> None:
    h = Harness("http://127.0.0.1:8081")
    client, out = h.client()
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, wire = h.accept()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert wire.disconnecting and not h.proxy.upstreams[0].idle
    answer = out.value()
    assert answer.endswith(b"\r\n\r\nok") and b"Connection: close" not in answer
    assert not out.disconnecting


@pytest.mark.parametrize(
    ("request_line", "closes"),
    [
        (b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", True),
        (b"GET /x HTTP/1.0\r\n\r\n", True),
        (b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),
    ],
)
def test_the_client_s_connection_wishes_are_kept(request_line: bytes, closes: bool) -> None:
    h = Harness("http://127.0.0.1:8081")
    client, out = h.client()
    client.dataReceived(request_line)
    upstream, wire = h.accept()
    assert b"Connection" not in wire.value()  # the upstream connection is the proxy's
    upstream.dataReceived(RESPONSE)
    answer = out.value()
    assert answer.endswith(b"hello")
    assert out.disconnecting is closes
    assert (b"Connection: close" in answer) is closes
    if request_line.startswith(b"GET /x HTTP/1.0") and not closes:
        assert b"Connection: keep-alive" in answer
    assert h.proxy.upstreams[0].idle  # the upstream connection is kept either way


@pytest.mark.parametrize("reason", [b"OK\rX-Injected: 1", b"O\x00K", b"OK\x1b[31m"])
def test_control_characters_in_the_upstream_s_status_line_are_502(reason: bytes) -> None:
    # Passed on, a bare CR would split the client's response head (RFC 9112 section 2.2).
    h = Harness("http://127.0.0.1:8081")
    client, out = h.client()
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, _ = h.accept()
    upstream.dataReceived(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 2\r\n\r\nok")
    answer = out.value()
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert reason not in answer


def test_an_absolute_form_target_s_scheme_is_case_insensitive() -> None:
    h = Harness("http://127.0.0.1:8081/base")
    client, _ = h.client()
    client.dataReceived(b"GET HTTP://right.example/x HTTP/1.1\r\nHost: wrong.example\r\n\r\n")
    _upstream, wire = h.accept()
    assert wire.value().startswith(b"GET /base/x HTTP/1.1\r\n")
    assert _forwarded_head(wire.value())[b"host"] == b"right.example"


def test_requests_beyond_max_connections_wait_for_a_free_upstream_connection() -> None:
    """Defect: every request in progress had a connection of its own: ten HTTP/2 clients
    opened 900 upstream connections. Past max_connections a request waits for one."""
    h = Harness("http://127.0.0.1:8081", max_connections=2, connect_timeout=Duration(5))
    clients = [h.client() for _ in range(4)]
    for n, (client, _) in enumerate(clients):
        client.dataReceived(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % n)
    assert len(h.reactor.tcpClients) == 2  # two connections, two requests waiting
    first, first_wire = h.accept(0)
    h.accept(1)
    first.dataReceived(RESPONSE)
    assert clients[0][1].value().endswith(b"hello")
    # The freed connection carries the request that waited longest.
    assert b"GET /2 " in first_wire.value() and b"GET /3 " not in first_wire.value()
    assert len(h.reactor.tcpClients) == 2
    # The last one waits no longer than connect_timeout, then gets 503.
    h.reactor.advance(6)
    h.proxy._sweep()
    assert clients[3][1].value().startswith(b"HTTP/1.1 503 ")
    assert b"connections to http://127.0.0.1:8081 stayed busy" in clients[3][1].value()


def test_a_client_that_leaves_while_waiting_gives_its_turn_away() -> None:
    h = Harness("http://127.0.0.1:8081", max_connections=1)
    (one, _), (two, _), (three, three_out) = [h.client() for _ in range(3)]
    one.dataReceived(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
    two.dataReceived(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    three.dataReceived(b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, wire = h.accept()
    two.connectionLost(Failure(ConnectionError()))
    upstream.dataReceived(RESPONSE)
    assert b"GET /3 " in wire.value() and b"GET /2 " not in wire.value()
    upstream.dataReceived(RESPONSE)
    assert three_out.value().endswith(b"hello")
