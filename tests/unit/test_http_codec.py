"""The HTTP/1.1 codec: framing, limits, and the request smuggling cases it must refuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocols.http.codec import (
    END,
    Head,
    ParseError,
    RequestReader,
    ResponseReader,
    chunk,
)


def events(reader: RequestReader | ResponseReader, data: bytes, eof: bool = False) -> list[object]:
    reader.receive(data)
    if eof:
        reader.receive_eof()
    out: list[object] = []
    while True:
        event = reader.next_event()
        if event is None:
            return out
        out.append(event)


def body_of(evs: list[object]) -> bytes:
    return b"".join(e for e in evs if isinstance(e, bytes))


def parse_error(data: bytes, max_header_size: int = 8192) -> ParseError:
    with pytest.raises(ParseError) as info:
        events(RequestReader(max_header_size), data)
    return info.value


def test_get_without_body_then_pipelined_post() -> None:
    reader = RequestReader(8192)
    evs = events(
        reader,
        b"GET /a?b=1 HTTP/1.1\r\nHost: example.test\r\nX-A: 1\r\n\r\n"
        b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    )
    first, end1, second, data, end2 = evs
    assert isinstance(first, Head) and first.method == b"GET" and first.target == b"/a?b=1"
    assert first.host == b"example.test" and first.keep_alive and first.length == 0
    assert end1 is END and end2 is END
    assert isinstance(second, Head) and second.length == 5 and data == b"hello"


def test_chunked_body_with_extensions_and_trailers() -> None:
    evs = events(
        RequestReader(8192),
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n",
    )
    assert isinstance(evs[0], Head) and evs[0].chunked
    assert body_of(evs) == b"hello world"
    assert evs[-1] is END


def test_body_arrives_in_pieces_of_any_size() -> None:
    reader = RequestReader(8192)
    message = b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789"
    out: list[object] = []
    for i in range(len(message)):
        out += events(reader, message[i : i + 1])
    assert body_of(out) == b"0123456789" and out[-1] is END


def test_http10_keep_alive_rules() -> None:
    head = events(RequestReader(8192), b"GET / HTTP/1.0\r\n\r\n")[0]
    assert isinstance(head, Head) and not head.keep_alive
    head = events(RequestReader(8192), b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")[0]
    assert isinstance(head, Head) and head.keep_alive
    head = events(RequestReader(8192), b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")[0]
    assert isinstance(head, Head) and not head.keep_alive


@pytest.mark.parametrize(
    ("data", "status"),
    [
        # request smuggling: where does the body end?
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x10\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length : 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\n Content-Length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
        # bad chunked encoding
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"f" * 16
            + b"\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nnot a field\r\n",
            400,
        ),
        # request line and Host
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/1.1 x\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/x\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
        (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ],
)
def test_refused(data: bytes, status: int) -> None:
    assert parse_error(data).status == status


def test_header_limits() -> None:
    assert parse_error(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 8192).status == 414
    big = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 9000 + b"\r\n\r\n"
    assert parse_error(big, 8192).status == 431
    # Without the end of the header yet: refused as soon as the limit is passed.
    assert parse_error(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 9000, 8192).status == 431
    trailer = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
        + b"X: 1\r\n" * 2000
    )
    assert parse_error(trailer, 8192).status == 431


def test_eof_inside_a_body_is_an_error_but_not_between_requests() -> None:
    reader = RequestReader(8192)
    assert events(reader, b"", eof=True) == []
    reader = RequestReader(8192)
    with pytest.raises(ParseError):
        events(reader, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\nabc", eof=True)


def test_response_framing() -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    evs = events(
        reader, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    assert [e.status for e in evs if isinstance(e, Head)] == [100, 200]
    assert body_of(evs) == b"ok"
    reader = ResponseReader()
    reader.expect(b"HEAD")
    evs = events(reader, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert evs[-1] is END and reader.idle
    reader = ResponseReader()
    reader.expect(b"GET")
    evs = events(reader, b"HTTP/1.0 200 OK\r\n\r\nuntil close", eof=True)
    assert body_of(evs) == b"until close" and evs[-1] is END
    head = evs[0]
    assert isinstance(head, Head) and not head.keep_alive
    reader = ResponseReader()
    reader.expect(b"GET")
    with pytest.raises(ParseError) as info:
        events(reader, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert info.value.status == 502


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=3000),
    sizes=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=20),
    cuts=st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=30),
)
def test_any_chunking_and_any_split_gives_the_body_back(
    body: bytes, sizes: list[int], cuts: list[int]
) -> None:
    encoded = b""
    rest = body
    i = 0
    while rest:
        size = sizes[i % len(sizes)]
        encoded += chunk(rest[:size])
        rest = rest[size:]
        i += 1
    message = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + encoded + b"0\r\n\r\n"
    )
    reader = RequestReader(8192)
    out: list[object] = []
    pos = 0
    j = 0
    while pos < len(message):
        step = cuts[j % len(cuts)]
        out += events(reader, message[pos : pos + step])
        pos += step
        j += 1
    assert body_of(out) == body
    assert out[-1] is END


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_never_raises_anything_but_parse_error(data: bytes) -> None:
    reader = RequestReader(1024)
    try:
        events(reader, data, eof=True)
    except ParseError as exc:
        assert 400 <= exc.status < 600


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


def test_a_chunk_size_line_over_the_limit_is_400_even_when_it_comes_whole() -> None:
    reader = RequestReader(16 * 1024)
    reader.receive(_CHUNKED + b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n")
    assert isinstance(reader.next_event(), Head)
    with pytest.raises(ParseError) as info:
        reader.next_event()
    assert info.value.status == 400


@pytest.mark.parametrize("line", [b"HTTP/1.1 001 C", b"HTTP/1.1 099 X", b"HTTP/1.0 000 Zero"])
def test_an_upstream_status_below_100_is_a_malformed_response(line: bytes) -> None:
    """Found by fuzzing: "HTTP/1.1 001" was taken as a final response with status 1, which
    the proxy would have passed on. A status code is 100-999 (RFC 9110 15)."""
    reader = ResponseReader()
    reader.receive(line + b"\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(ParseError) as caught:
        reader.next_event()
    assert caught.value.status == 502
