"""A review of the HTTP code against RFC 9110/9112: framing holes, proxy semantics, in memory."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from gateway.config import Duration
from gateway.ports import Status, Verdict
from gateway.protocols.http.codec import END, Head, ParseError, RequestReader
from tests.unit.test_http_proxy import RESPONSE, Harness
from tests.unit.test_http_server import Recorder, connect, factory_for, post


def _heads(data: bytes) -> list[Head]:
    reader = RequestReader(16 * 1024)
    reader.receive(data)
    out: list[Head] = []
    while True:
        event = reader.next_event()
        if event is None:
            return out
        if isinstance(event, Head):
            out.append(event)


def _forwarded_head(wire: bytes) -> dict[bytes, bytes]:
    head = wire.partition(b"\r\n\r\n")[0]
    return {
        name.lower(): value
        for name, _, value in (line.partition(b": ") for line in head.split(b"\r\n")[1:])
    }


# --- the codec ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"GET foo HTTP/1.1",  # origin-form must start with "/"
        b"GET * HTTP/1.1",  # asterisk-form is for OPTIONS only
        b"GET example.test:80 HTTP/1.1",  # authority-form is for CONNECT only
        b"GET ../etc/passwd HTTP/1.1",
        b"GET http://user@evil.test/ HTTP/1.1",  # the authority is a Host value, no userinfo
        b'GET http://a"b/ HTTP/1.1',
        b"GET http://a.test?x=/ HTTP/1.1",  # the authority must end with "/" or the target
        b"GET ftp://a.test/x HTTP/1.1",  # only http and https are proxied
    ],
)
def test_a_request_target_of_the_wrong_form_is_400(line: bytes) -> None:
    with pytest.raises(ParseError) as info:
        _heads(line + b"\r\nHost: h\r\n\r\n")
    assert info.value.status == 400


@pytest.mark.parametrize(
    "line",
    [
        b"GET /a?b HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"GET http://example.test/x HTTP/1.1",
        b"GET http://example.test:8080 HTTP/1.1",
        b"GET https://[::1]:8443/a?b HTTP/1.1",
        b"CONNECT example.test:443 HTTP/1.1",
    ],
)
def test_request_targets_of_the_four_forms_are_taken(line: bytes) -> None:
    assert len(_heads(line + b"\r\nHost: h\r\n\r\n")) == 1


def test_expect_100_continue_is_ignored_in_an_http10_request() -> None:
    # RFC 9110 section 10.1.1: an HTTP/1.0 client would take "100 Continue" as the answer.
    (head,) = _heads(b"POST /x HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert not head.expect_continue
    (head,) = _heads(
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert head.expect_continue


def test_the_server_sends_no_100_continue_to_an_http10_client() -> None:
    reactor = MemoryReactorClock()
    protocol, transport = connect(factory_for(Recorder(), reactor))
    protocol.dataReceived(b"PUT /x HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value() == b""
    protocol.dataReceived(b"ok")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert b"PUT /x ok" in transport.value()


@pytest.mark.parametrize(
    "size_line",
    [
        b"5;ext\rX\r\n",  # a bare CR inside the line: some parsers end the line there
        b"5;ext=\x00\r\n",  # NUL
        b"5;ext=\x7f\r\n",
    ],
)
def test_control_characters_in_a_chunk_size_line_are_400(size_line: bytes) -> None:
    data = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + size_line
    reader = RequestReader(16 * 1024)
    reader.receive(data + b"hello\r\n0\r\n\r\n")
    assert isinstance(reader.next_event(), Head)
    with pytest.raises(ParseError) as info:
        while reader.next_event() not in (None, END):
            pass
    assert info.value.status == 400


def test_chunk_extensions_with_quoted_values_are_still_taken() -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5 ; name="a b";x=1\r\nhello\r\n0\r\n\r\n'
    )
    reader = RequestReader(16 * 1024)
    reader.receive(data)
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
        if event is END:
            break
    assert events[1:] == [b"hello", END]


# --- the proxy ------------------------------------------------------------------------------


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


# --- the listener -------------------------------------------------------------------------


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
    gateway, out = post(Verdict(Status.DELIVERED, "queued"), target=target)
    assert out.startswith(b"HTTP/1.1 400 ") and not gateway.submitted


@pytest.mark.parametrize("target", [b"/hooks/.well-known/a", b"/hooks/a..b", b"/hooks/a?x=/../y"])
def test_dots_that_are_not_dot_segments_are_taken(target: bytes) -> None:
    gateway, out = post(Verdict(Status.DELIVERED, "queued"), target=target)
    assert out.startswith(b"HTTP/1.1 202 ") and gateway.submitted


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


@pytest.mark.parametrize(
    "host", [b"a b", b"a/b", b"a\\b", b"evil.test/..", b"a@b", b'a"b', b"[::1", b"a:b:c"]
)
def test_an_invalid_host_field_value_is_400(host: bytes) -> None:
    # RFC 9112 section 3.2: uri-host [":" port], or 400.
    with pytest.raises(ParseError) as info:
        _heads(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert info.value.status == 400


@pytest.mark.parametrize(
    "host",
    [
        b"example.test",
        b"example.test:8080",
        b"[::1]:80",
        b"[fe80::1%25eth0]",
        b"127.0.0.1",
        b"",
        b"xn--bcher-kva.test",
    ],
)
def test_valid_host_field_values_are_taken(host: bytes) -> None:
    (head,) = _heads(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert head.host == host


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


_POST = b"POST / HTTP/1.1\r\nHost: h\r\n"
_CHUNKED = _POST + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (_POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (_POST + b"Content-Length: 5, 5\r\n\r\n", 400),
        (_POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
        (_POST + b"Content-Length: -1\r\n\r\n", 400),
        (_POST + b"Content-Length: +5\r\n\r\n", 400),
        (_POST + b"Content-Length: 0x5\r\n\r\n", 400),
        (_POST + b"Content-Length: 1" + b"0" * 20 + b"\r\n\r\n", 400),
        (_POST + b"Transfer-Encoding: chunked, identity\r\n\r\n", 400),
        (_POST + b"Transfer-Encoding: identity\r\n\r\n", 400),
        (_POST + b"Transfer-Encoding: xchunked\r\n\r\n", 400),
        (_POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (_POST + b"Content-Length : 5\r\n\r\n", 400),  # whitespace before the colon
        (_POST + b"X: a\r\n b\r\n\r\n", 400),  # obs-fold
        (_POST + b"X: a\x00b\r\n\r\n", 400),
        (_POST + b"X: a\rb\r\n\r\n", 400),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (_CHUNKED + b"1" + b"0" * 16 + b"\r\n", 400),  # chunk size over 2**60
        (_CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
        (_CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", 400),
        (_CHUNKED + b"5\nhello\r\n0\r\n\r\n", 400),  # bare LF after the size
        (_CHUNKED + b"5\r\nhelloXX0\r\n\r\n", 400),  # no CRLF after the data
        (_CHUNKED + b"5;" + b"e" * 5000, 400),  # an endless chunk-size line
        (_CHUNKED + b"0\r\n" + b"X: y\r\n" * 5000, 431),  # an endless trailer
    ],
)
def test_smuggling_and_framing_cases_are_refused(data: bytes, status: int) -> None:
    reader = RequestReader(16 * 1024)
    reader.receive(data)
    with pytest.raises(ParseError) as info:
        for _ in range(100):
            if reader.next_event() is None:
                break
    assert info.value.status == status


def test_a_long_chunk_size_with_leading_zeros_is_taken_within_the_limit() -> None:
    reader = RequestReader(16 * 1024)
    reader.receive(_CHUNKED + b"0000000005\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n")
    events = [reader.next_event() for _ in range(3)]
    assert events[1:] == [b"hello", END]


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


def test_a_chunk_size_line_over_the_limit_is_400_even_when_it_comes_whole() -> None:
    reader = RequestReader(16 * 1024)
    reader.receive(_CHUNKED + b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n")
    assert isinstance(reader.next_event(), Head)
    with pytest.raises(ParseError) as info:
        reader.next_event()
    assert info.value.status == 400


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
