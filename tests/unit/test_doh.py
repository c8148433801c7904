"""Tests for DNS over HTTPS: the doh_site server and the DohUpstream client, in memory.

The server is driven through its real HTTP/1.1 channel on a StringTransport; the client talks
to canned HTTP servers and to doh_site itself over iosim's in-memory connections (plain HTTP/1.1,
and TLS with HTTP/2 when h2 is installed). No sockets, no global reactor, no sleeps.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_from_bytes

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from gateway.config import Rate
from gateway.listening import Guard
from gateway.protocols.dns import doh_client
from gateway.protocols.dns.client import UpstreamError
from gateway.protocols.dns.config import DohLimits
from gateway.protocols.dns.doh_client import DohUpstream
from gateway.protocols.dns.doh_server import (
    answer_json,
    cache_control,
    decode_dns_parameter,
    doh_site,
)
from gateway.protocols.dns.wire import WireError, error_response, parse_query
from tests.support.tls import server_key_and_certificate

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
DNS_MESSAGE = "application/dns-message"


# --------------------------------------------------------------------------- helpers


def make_answer(data: bytes) -> bytes | None:
    """A small resolver: www/short/servfail.example.test, NXDOMAIN with an SOA for the rest."""
    try:
        query = dns.message.from_wire(data)
    except Exception:
        return None
    response = dns.message.make_response(query)
    name = query.question[0].name
    text = name.to_text()
    if text == "www.example.test.":
        response.answer.append(dns.rrset.from_text(name, 300, "IN", "A", "192.0.2.10"))
    elif text == "short.example.test.":
        response.answer.append(dns.rrset.from_text(name, 300, "IN", "A", "192.0.2.11"))
        response.answer.append(dns.rrset.from_text(name, 30, "IN", "TXT", '"thirty"'))
    elif text == "servfail.example.test.":
        response.set_rcode(dns.rcode.SERVFAIL)
    else:
        response.set_rcode(dns.rcode.NXDOMAIN)
        soa = "ns.example.test. hostmaster.example.test. 1 3600 900 604800 60"
        response.authority.append(dns.rrset.from_text("example.test.", 3600, "IN", "SOA", soa))
    return response.to_wire()


def wire_like_handler(data: bytes) -> bytes | None:
    """What the gateway's DNS handler does with garbage: drop it, or FORMERR."""
    try:
        parse_query(data)
    except WireError as exc:
        return error_response(data, 1, None) if exc.header_ok else None
    return make_answer(data)


class Handler:
    """A DnsHandler whose answers each test chooses; it records every call."""

    def __init__(self, reply: Callable[[bytes], Any] = make_answer) -> None:
        self.reply = reply
        self.calls: list[tuple[bytes, tuple[str, int], str]] = []

    def answer(self, data: bytes, client: tuple[str, int], transport: str) -> Any:
        self.calls.append((data, client, transport))
        return self.reply(data)


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes) -> list[HttpResponse]:
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"an unfinished response: {data!r}"
        lines = head.split(b"\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        assert "transfer-encoding" not in headers
        length = int(headers.get("content-length", "0"))
        responses.append(HttpResponse(int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return responses


def get_request(target: str, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: doh.test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post_request(
    body: bytes, *headers: str, content_type: str | None = DNS_MESSAGE, path: str = "/dns-query"
) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: doh.test", f"Content-Length: {len(body)}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode() + body


class Server:
    """doh_site on one in-memory HTTP/1.1 connection."""

    def __init__(self, handler: Handler | None = None, **options: Any) -> None:
        self.handler = handler or Handler()
        self.reactor = MemoryReactorClock()
        self.site = doh_site(self.handler, reactor=self.reactor, **options)
        self.protocol = self.site.buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.protocol.makeConnection(self.transport)

    def send(self, raw: bytes) -> list[HttpResponse]:
        self.transport.clear()
        self.protocol.dataReceived(raw)
        return parse_responses(self.transport.value())

    def one(self, raw: bytes) -> HttpResponse:
        [response] = self.send(raw)
        return response


def query(name: str = "www.example.test", rdtype: str = "A", qid: int = 0) -> bytes:
    return dns.message.make_query(name, rdtype, id=qid).to_wire()


def b64(data: bytes, padding: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(data).decode()
    return encoded if padding else encoded.rstrip("=")


@pytest.fixture
def logged_failures() -> Iterator[list[dict[str, Any]]]:
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)


# --------------------------------------------------------------------------- wire form


def test_post_answers_with_the_handlers_answer() -> None:
    server = Server()
    data = query(qid=0x1234)
    response = server.one(post_request(data))
    assert response.status == 200
    assert response.headers["content-type"] == DNS_MESSAGE
    assert response.headers["cache-control"] == "max-age=300"
    assert response.body == make_answer(data)
    assert server.handler.calls == [(data, ("127.0.0.1", 40000), "doh")]


def test_post_accepts_media_type_parameters_and_case() -> None:
    server = Server()
    response = server.one(post_request(query(), content_type="Application/DNS-Message; x=1"))
    assert response.status == 200


@pytest.mark.parametrize("padding", [True, False, "percent-encoded"])
@pytest.mark.parametrize("name", ["www.example.test", "wwwx.example.test", "wwwxy.example.test"])
def test_get_decodes_base64url_with_or_without_padding(padding: bool | str, name: str) -> None:
    server = Server()
    data = query(name, qid=7)
    encoded = b64(data, padding=bool(padding))
    if padding == "percent-encoded":
        encoded = encoded.replace("=", "%3D")
    response = server.one(get_request(f"/dns-query?dns={encoded}"))
    assert response.status == 200
    assert server.handler.calls[0][0] == data


def test_the_three_names_cover_every_padding_length() -> None:
    # One, two and no "=": the padding test above is only as good as this.
    lengths = {
        len(query(n)) % 3 for n in ("www.example.test", "wwwx.example.test", "wwwxy.example.test")
    }
    assert lengths == {0, 1, 2}


def test_get_and_post_answers_are_identical() -> None:
    server = Server()
    data = query()
    by_get = server.one(get_request(f"/dns-query?dns={b64(data)}"))
    by_post = server.one(post_request(data))
    assert by_get.body == by_post.body == make_answer(data)


@pytest.mark.parametrize(
    "target",
    [
        "/dns-query",
        "/dns-query?dns=",
        "/dns-query?dns=AAAA+AAA",
        "/dns-query?dns=AAAA/AAA",
        "/dns-query?dns=AAAA!AAA",
        "/dns-query?dns=AAAAA",  # a length no base64 has
        "/dns-query?dns=AA%3D%3D%3D",  # three padding characters
        "/dns-query?dns=AAAA&dns=AAAA",
        "/dns-query?other=1",
    ],
)
def test_get_with_a_missing_or_invalid_dns_parameter_is_400(target: str) -> None:
    server = Server()
    response = server.one(get_request(target))
    assert response.status == 400
    assert response.headers["content-type"].startswith("text/plain")
    assert server.handler.calls == []


def test_a_message_shorter_than_a_header_is_400_without_asking() -> None:
    server = Server()
    assert server.one(post_request(b"\x00" * 11)).status == 400
    assert server.handler.calls == []


def test_a_handler_that_drops_the_query_gives_400() -> None:
    server = Server(Handler(lambda data: None))
    response = server.one(post_request(b"\x00" * 40))
    assert response.status == 400
    assert len(server.handler.calls) == 1


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "application/dns-json"]
)
def test_post_with_another_content_type_is_415(content_type: str) -> None:
    server = Server()
    assert server.one(post_request(query(), content_type=content_type)).status == 415
    assert server.handler.calls == []


def test_post_without_a_content_type_is_415() -> None:
    assert Server().one(post_request(query(), content_type=None)).status == 415


@pytest.mark.parametrize("method", ["PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
def test_other_methods_are_405_with_allow(method: str) -> None:
    server = Server()
    [response] = server.send(
        f"{method} /dns-query HTTP/1.1\r\nHost: doh.test\r\nContent-Length: 0\r\n\r\n".encode()
    )
    assert response.status == 405
    assert response.headers["allow"] == "GET, POST"


@pytest.mark.parametrize(
    "target", ["/", "/dns-query/", "/dns-query/x", "/DNS-QUERY", "/resolve?name=www.example.test"]
)
def test_other_paths_are_404(target: str) -> None:
    server = Server()
    assert server.one(get_request(target)).status == 404
    assert server.one(post_request(query(), path=target)).status == 404
    assert server.handler.calls == []


def test_another_path_can_be_configured() -> None:
    server = Server(path="/resolve")
    assert server.one(get_request(f"/resolve?dns={b64(query())}")).status == 200
    assert server.one(get_request(f"/dns-query?dns={b64(query())}")).status == 404


# --------------------------------------------------------------------------- sizes


def test_a_body_announced_too_big_with_expect_is_refused_before_it_is_sent() -> None:
    server = Server(max_size=512)
    head = (
        b"POST /dns-query HTTP/1.1\r\nHost: doh.test\r\nContent-Type: application/dns-message\r\n"
        b"Content-Length: 513\r\nExpect: 100-continue\r\n\r\n"
    )
    [response] = server.send(head)
    assert response.status == 413
    assert response.headers["connection"] == "close"
    assert b"100 Continue" not in server.transport.value()
    assert server.transport.disconnecting
    assert server.handler.calls == []


def test_a_body_that_fits_with_expect_gets_100_continue() -> None:
    server = Server(max_size=512)
    data = query()
    head = (
        b"POST /dns-query HTTP/1.1\r\nHost: doh.test\r\nContent-Type: application/dns-message\r\n"
        b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(data)
    )
    server.protocol.dataReceived(head)
    assert server.transport.value().startswith(b"HTTP/1.1 100 Continue")
    assert server.handler.calls == []
    server.protocol.dataReceived(data)
    assert server.handler.calls[0][0] == data


def test_a_too_big_body_without_expect_is_discarded_and_the_connection_goes_on() -> None:
    server = Server(max_size=512)
    responses = server.send(post_request(b"\x00" * 513) + post_request(query()))
    assert [r.status for r in responses] == [413, 200]
    assert not server.transport.disconnecting
    assert len(server.handler.calls) == 1


def test_a_chunked_body_that_grows_too_big_is_413() -> None:
    server = Server(max_size=512)
    chunks = b"".join(b"%x\r\n%s\r\n" % (100, b"\x00" * 100) for _ in range(6)) + b"0\r\n\r\n"
    raw = (
        b"POST /dns-query HTTP/1.1\r\nHost: doh.test\r\nContent-Type: application/dns-message\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunks
    )
    assert server.one(raw).status == 413
    assert server.handler.calls == []


def test_a_chunked_body_that_fits_is_answered() -> None:
    server = Server(max_size=512)
    data = query()
    raw = (
        b"POST /dns-query HTTP/1.1\r\nHost: doh.test\r\nContent-Type: application/dns-message\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    )
    assert server.one(raw).status == 200


def test_exactly_max_size_is_accepted() -> None:
    server = Server(Handler(lambda data: None), max_size=100)
    # The handler refuses it (400), which shows it got past the size check.
    assert server.one(post_request(b"\x00" * 100)).status == 400
    assert len(server.handler.calls) == 1


def test_a_get_query_bigger_than_max_size_is_413() -> None:
    server = Server(max_size=100)
    assert server.one(get_request(f"/dns-query?dns={b64(bytes(101))}")).status == 413
    assert server.handler.calls == []


def test_max_size_must_fit_a_dns_message() -> None:
    with pytest.raises(ValueError, match="max_size"):
        doh_site(Handler(), max_size=70000)
    with pytest.raises(ValueError, match="path"):
        doh_site(Handler(), path="dns-query")


# --------------------------------------------------------------------------- Cache-Control


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("www.example.test", "max-age=300"),
        ("short.example.test", "max-age=30"),  # the smallest TTL
        ("nx.example.test", "max-age=60"),  # min(SOA TTL 3600, SOA MINIMUM 60)
        ("servfail.example.test", "max-age=0"),  # no record, no TTL
    ],
)
def test_cache_control_follows_the_answer(name: str, expected: str) -> None:
    server = Server()
    assert server.one(post_request(query(name))).headers["cache-control"] == expected


def test_cache_control_of_a_negative_answer_with_a_low_soa_ttl() -> None:
    response = dns.message.make_response(dns.message.make_query("nx.example.test", "A"))
    response.set_rcode(dns.rcode.NXDOMAIN)
    soa = "ns.example.test. hostmaster.example.test. 1 3600 900 604800 600"
    response.authority.append(dns.rrset.from_text("example.test.", 45, "IN", "SOA", soa))
    assert cache_control(response.to_wire()) == b"max-age=45"


def test_cache_control_of_an_unreadable_answer_is_zero() -> None:
    assert cache_control(b"\x00" * 5) == b"max-age=0"


def test_errors_are_not_cached() -> None:
    assert Server().one(get_request("/dns-query")).headers["cache-control"] == "no-store"


# --------------------------------------------------------------------------- deferred answers, failures


def test_a_deferred_answer_is_sent_when_it_fires() -> None:
    pending: Deferred[bytes | None] = Deferred()
    server = Server(Handler(lambda data: pending))
    data = query()
    assert server.send(post_request(data)) == []
    pending.callback(make_answer(data))
    [response] = parse_responses(server.transport.value())
    assert response.status == 200
    assert response.headers["cache-control"] == "max-age=300"
    assert response.body == make_answer(data)


def test_a_deferred_none_is_400() -> None:
    server = Server(Handler(lambda data: succeed(None)))
    assert server.one(post_request(query())).status == 400


def test_a_client_gone_before_the_answer_is_not_written_to(
    logged_failures: list[dict[str, Any]],
) -> None:
    pending: Deferred[bytes | None] = Deferred()
    server = Server(Handler(lambda data: pending))
    server.send(post_request(query()))
    server.protocol.connectionLost(Failure(ConnectionLost()))
    server.transport.clear()
    pending.callback(make_answer(query()))
    assert server.transport.value() == b""
    assert logged_failures == []


def test_a_handler_that_raises_is_500_without_a_traceback(
    logged_failures: list[dict[str, Any]],
) -> None:
    def broken(data: bytes) -> bytes:
        raise RuntimeError("secret internals")

    response = Server(Handler(broken)).one(post_request(query()))
    assert response.status == 500
    assert b"Traceback" not in response.body
    assert b"secret" not in response.body
    assert len(logged_failures) == 1


def test_a_failed_deferred_is_500(logged_failures: list[dict[str, Any]]) -> None:
    server = Server(Handler(lambda data: fail(RuntimeError("secret internals"))))
    response = server.one(post_request(query()))
    assert response.status == 500
    assert b"secret" not in response.body
    assert len(logged_failures) == 1


# --------------------------------------------------------------------------- JSON form


def test_json_answer_like_cloudflares() -> None:
    server = Server()
    response = server.one(get_request("/dns-query?name=www.example.test&type=A"))
    assert response.status == 200
    assert response.headers["content-type"] == "application/dns-json"
    assert response.headers["cache-control"] == "max-age=300"
    assert response.json() == {
        "Status": 0,
        "TC": False,
        "RD": True,
        "RA": False,
        "AD": False,
        "CD": False,
        "Question": [{"name": "www.example.test", "type": 1}],
        "Answer": [{"name": "www.example.test", "type": 1, "TTL": 300, "data": "192.0.2.10"}],
    }


def test_json_query_is_a_recursive_query_with_a_random_id() -> None:
    server = Server()
    for _ in range(4):
        server.one(get_request("/dns-query?name=www.example.test"))
    queries = [dns.message.from_wire(data) for data, _, _ in server.handler.calls]
    assert all(q.flags & dns.flags.RD for q in queries)
    assert all(q.question[0].rdtype == dns.rdatatype.A for q in queries)  # A by default
    assert all(transport == "doh" for _, _, transport in server.handler.calls)
    assert len({q.id for q in queries}) > 1


@pytest.mark.parametrize(("given", "rdtype"), [("AAAA", 28), ("aaaa", 28), ("28", 28), ("MX", 15)])
def test_json_type_by_name_or_number(given: str, rdtype: int) -> None:
    server = Server()
    response = server.one(get_request(f"/dns-query?name=www.example.test&type={given}"))
    assert response.status == 200
    assert dns.message.from_wire(server.handler.calls[0][0]).question[0].rdtype == rdtype
    assert response.json()["Question"] == [{"name": "www.example.test", "type": rdtype}]


def test_json_do_and_cd_flags() -> None:
    server = Server()
    server.one(get_request("/dns-query?name=www.example.test&do=1&cd=true"))
    server.one(get_request("/dns-query?name=www.example.test&do=0&cd=0"))
    with_flags, without = (dns.message.from_wire(d) for d, _, _ in server.handler.calls)
    assert with_flags.ednsflags & dns.flags.DO and with_flags.flags & dns.flags.CD
    assert not without.ednsflags & dns.flags.DO and not without.flags & dns.flags.CD


def test_json_negative_answer_has_status_and_authority() -> None:
    response = Server().one(get_request("/dns-query?name=nx.example.test&type=A"))
    body = response.json()
    assert body["Status"] == 3
    assert "Answer" not in body
    assert body["Authority"][0]["type"] == 6
    assert body["Authority"][0]["data"].startswith("ns.example.test. hostmaster.example.test.")
    assert response.headers["cache-control"] == "max-age=60"


def test_json_chosen_by_accept_header() -> None:
    server = Server()
    response = server.one(
        get_request("/dns-query?name=www.example.test", "Accept: application/dns-json")
    )
    assert response.headers["content-type"] == "application/dns-json"
    missing = server.one(get_request("/dns-query", "Accept: application/dns-json"))
    assert missing.status == 400
    assert "name" in missing.json()["error"]


@pytest.mark.parametrize(
    "target",
    [
        "/dns-query?name=",
        "/dns-query?name=a..example.test",
        "/dns-query?name=" + "a" * 64 + ".test",
        "/dns-query?name=" + ".".join(["abcdefgh"] * 40),
        "/dns-query?name=www.example.test&type=NOPE",
        "/dns-query?name=www.example.test&type=70000",
        "/dns-query?name=www.example.test&type=0",
        "/dns-query?name=www.example.test&type=AXFR",
        "/dns-query?name=www.example.test&type=OPT",
        "/dns-query?name=www.example.test&do=maybe",
        "/dns-query?name=a&name=b",
    ],
)
def test_json_bad_name_or_type_is_400_with_a_json_error(target: str) -> None:
    server = Server()
    response = server.one(get_request(target))
    assert response.status == 400
    assert response.headers["content-type"] == "application/dns-json"
    assert isinstance(response.json()["error"], str)
    assert server.handler.calls == []


def test_json_and_wire_parameters_together_are_400() -> None:
    server = Server()
    assert server.one(get_request(f"/dns-query?dns={b64(query())}&name=x.test")).status == 400


def test_json_with_no_answer_from_the_handler_is_502() -> None:
    response = Server(Handler(lambda data: None)).one(get_request("/dns-query?name=x.test"))
    assert response.status == 502
    assert "error" in response.json()


def test_answer_json_renders_the_root_and_names_in_data() -> None:
    response = dns.message.make_response(dns.message.make_query(".", "NS"))
    response.answer.append(dns.rrset.from_text(".", 100, "IN", "NS", "a.root.test."))
    body = answer_json(response.to_wire())
    assert body["Question"] == [{"name": ".", "type": 2}]
    assert body["Answer"] == [{"name": ".", "type": 2, "TTL": 100, "data": "a.root.test."}]


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_dns_parameters_never_raise(value: str) -> None:
    failures: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(failures.append)
    try:
        server = Server(Handler(wire_like_handler))
        response = server.one(get_request("/dns-query?dns=" + quote(value, safe="")))
    finally:
        globalLogPublisher.removeObserver(failures.append)
    assert response.status in (200, 400)
    assert not [event for event in failures if "log_failure" in event]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_raw_dns_parameters_and_bodies_never_raise(value: bytes) -> None:
    server = Server(Handler(wire_like_handler))
    by_get = server.one(get_request("/dns-query?dns=" + quote_from_bytes(value, safe="")))
    by_post = server.one(post_request(value))
    assert by_get.status in (200, 400)
    assert by_post.status in (200, 400)


@settings(max_examples=200)
@given(st.binary(min_size=12, max_size=600), st.booleans())
def test_any_base64url_query_reaches_the_handler_intact(data: bytes, padding: bool) -> None:
    server = Server(Handler(lambda d: bytes(12)))
    assert server.one(get_request(f"/dns-query?dns={b64(data, padding)}")).status == 200
    assert server.handler.calls[0][0] == data
    assert decode_dns_parameter(b64(data, padding).encode()) == data


# --------------------------------------------------------------------------- the client


def make_question(name: str = "www.example.test", rdtype: str = "A") -> tuple[bytes, Any]:
    data = query(name, rdtype, qid=0xBEEF)
    return data, parse_query(data)


@dataclass
class SeenRequest:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes


class CannedHttpServer(Protocol):
    """An HTTP/1.1 server that records requests and answers each with respond(request)."""

    def __init__(self, seen: list[SeenRequest], respond: Callable[[SeenRequest], bytes]) -> None:
        self.seen = seen
        self.respond = respond
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if len(rest) < length:
                return
            method, target, _ = lines[0].split(b" ")
            request = SeenRequest(method, target, headers, rest[:length])
            self.buffer = rest[length:]
            self.seen.append(request)
            assert self.transport is not None
            self.transport.write(self.respond(request))


def http_reply(
    body: bytes, status: int = 200, content_type: bytes = b"application/dns-message"
) -> bytes:
    return (
        b"HTTP/1.1 %d Whatever\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (status, content_type, len(body))
        + body
    )


def dns_reply(request: SeenRequest) -> bytes:
    if request.method == b"GET":
        data = decode_dns_parameter(request.target.partition(b"dns=")[2])
    else:
        data = request.body
    answer = make_answer(data)
    assert answer is not None
    return http_reply(answer)


class Upstream:
    """A DohUpstream on a MemoryReactorClock whose connections reach a server on port 8053."""

    def __init__(
        self,
        server_factory: Any,
        url: str = "http://127.0.0.1:8053/dns-query",
        reactor: MemoryReactorClock | None = None,
        **options: Any,
    ) -> None:
        self.reactor = reactor or MemoryReactorClock()
        self.reactor.listenTCP(8053, server_factory)
        self.completer = iosim.ConnectionCompleter(self.reactor)
        self.pumps: list[iosim.IOPump] = []
        self.upstream = DohUpstream(self.reactor, url, **options)

    def resolve(self, data: bytes, question: Any) -> Deferred[bytes]:
        return Deferred.fromCoroutine(self.upstream.resolve(data, question))

    def run(self) -> None:
        """Complete every pending connection and move bytes until nothing moves."""
        for _ in range(50):
            pump = self.completer.succeedOnce()
            if pump is not None:
                self.pumps.append(pump)
            moved = any([p.flush() for p in self.pumps])
            if pump is None and not moved:
                return
        raise AssertionError("the connections never settled")


def canned(respond: Callable[[SeenRequest], bytes] = dns_reply) -> tuple[Any, list[SeenRequest]]:
    seen: list[SeenRequest] = []
    return Factory.forProtocol(lambda: CannedHttpServer(seen, respond)), seen


def result_of(deferred: Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_post_sends_id_zero_and_the_dns_message_content_type() -> None:
    factory, seen = canned()
    up = Upstream(factory)
    data, question = make_question()
    d = up.resolve(data, question)
    up.run()
    answer = result_of(d)
    [request] = seen
    assert request.method == b"POST"
    assert request.target == b"/dns-query"
    assert request.headers[b"content-type"] == b"application/dns-message"
    assert request.headers[b"accept"] == b"application/dns-message"
    assert request.body == b"\x00\x00" + data[2:]
    # The answer is passed on as the server sent it: ID 0, the caller restores the client's.
    assert answer[:2] == b"\x00\x00"
    assert dns.message.from_wire(answer).answer[0].to_text().endswith("192.0.2.10")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8053/dns-query", "http://127.0.0.1:8053/q?x=1"])
def test_get_sends_base64url_without_padding(url: str) -> None:
    factory, seen = canned()
    up = Upstream(factory, url=url, method="GET")
    for name in ("www.example.test", "wwwx.example.test", "wwwxy.example.test"):
        data, question = make_question(name)
        d = up.resolve(data, question)
        up.run()
        result_of(d)
    for request in seen:
        assert request.method == b"GET"
        encoded = request.target.partition(b"dns=")[2]
        assert b"=" not in encoded and b"+" not in encoded and b"/" not in encoded
        assert request.target.startswith(b"/dns-query?dns=" if "x=1" not in url else b"/q?x=1&dns=")
    assert len({len(r.target) % 4 for r in seen}) > 1  # lengths that would have needed padding


def test_keep_alive_connections_are_reused() -> None:
    factory, seen = canned()
    up = Upstream(factory, connections=2)
    data, question = make_question()
    for _ in range(5):
        d = up.resolve(data, question)
        up.run()
        result_of(d)
    assert len(seen) == 5
    assert up.upstream.connections_opened == 1


def test_no_more_connections_than_allowed_under_load() -> None:
    factory, seen = canned()
    up = Upstream(factory, connections=3)
    data, question = make_question()
    pending = [up.resolve(data, question) for _ in range(40)]
    up.run()
    assert all(result_of(d) for d in pending)
    assert len(seen) == 40
    assert up.upstream.connections_opened == 3


@pytest.mark.parametrize("status", [404, 500, 503])
def test_an_http_error_status_is_an_upstream_error(status: int) -> None:
    factory, _ = canned(lambda request: http_reply(b"<html>no</html>", status, b"text/html"))
    up = Upstream(factory)
    d = up.resolve(*make_question())
    up.run()
    with pytest.raises(UpstreamError, match=f"HTTP {status} from http://127.0.0.1:8053/dns-query"):
        result_of(d)


def test_the_connection_stays_usable_after_an_error_status() -> None:
    replies = iter([http_reply(b"busy", 503, b"text/plain")])
    factory, _ = canned(lambda request: next(replies, None) or dns_reply(request))
    up = Upstream(factory, connections=1)
    first = up.resolve(*make_question())
    up.run()
    with pytest.raises(UpstreamError):
        result_of(first)
    second = up.resolve(*make_question())
    up.run()
    assert result_of(second)
    assert up.upstream.connections_opened == 1


def test_a_wrong_content_type_is_an_upstream_error() -> None:
    factory, _ = canned(
        lambda request: http_reply(dns_reply(request).partition(b"\r\n\r\n")[2], 200, b"text/html")
    )
    up = Upstream(factory)
    d = up.resolve(*make_question())
    up.run()
    with pytest.raises(UpstreamError, match="content type text/html"):
        result_of(d)


def test_an_answer_to_another_question_is_refused() -> None:
    other = make_answer(query("short.example.test"))
    assert other is not None
    factory, _ = canned(lambda request: http_reply(other))
    up = Upstream(factory)
    d = up.resolve(*make_question())
    up.run()
    with pytest.raises(UpstreamError, match="another question"):
        result_of(d)


def test_a_malformed_answer_is_refused() -> None:
    factory, _ = canned(lambda request: http_reply(b"\x00\x00\x81"))
    up = Upstream(factory)
    d = up.resolve(*make_question())
    up.run()
    with pytest.raises(UpstreamError, match="malformed"):
        result_of(d)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_an_oversized_answer_is_refused_and_its_connection_closed(tls: bool) -> None:
    factory, _ = canned(lambda request: http_reply(b"\x00" * 80000))
    reactor = MemoryReactorClock()
    if tls:
        # A server that speaks HTTP/1.1 only: the client's HTTP/2 probe falls back.
        options = server_tls_options(alpn=[b"http/1.1"])
        factory = TLSMemoryBIOFactory(options, False, factory, clock=reactor)
    scheme = "https" if tls else "http"
    up = Upstream(
        factory, url=f"{scheme}://127.0.0.1:8053/dns-query", reactor=reactor, verify=False
    )
    d = up.resolve(*make_question())
    up.run()
    with pytest.raises(UpstreamError, match="bigger than"):
        result_of(d)
    assert up.pumps[-1].clientIO.disconnected
    assert up.upstream.protocol == "http/1.1"


def test_a_refused_connection_is_an_upstream_error() -> None:
    factory, _ = canned()
    up = Upstream(factory)
    d = up.resolve(*make_question())
    up.completer.failOnce()
    with pytest.raises(UpstreamError, match="refused the connection"):
        result_of(d)


def test_no_answer_in_time_is_an_upstream_error() -> None:
    factory, _ = canned(lambda request: b"")  # reads the query, never answers
    up = Upstream(factory, timeout=2.5)
    d = up.resolve(*make_question())
    up.run()
    assert not d.called
    up.reactor.advance(2.5)
    with pytest.raises(UpstreamError, match=r"no answer from .* within 2\.5s"):
        result_of(d)


def test_no_connection_in_time_is_an_upstream_error() -> None:
    factory, _ = canned()
    up = Upstream(factory, timeout=3)
    d = up.resolve(*make_question())
    up.reactor.advance(3)
    with pytest.raises(UpstreamError, match="within 3s"):
        result_of(d)


def test_a_kept_alive_connection_closed_by_the_server_is_retried_once() -> None:
    closed_once: list[bool] = []

    def respond(request: SeenRequest) -> bytes:
        if not closed_once:
            closed_once.append(True)
            return b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\npartial"
        return dns_reply(request)

    factory, seen = canned(respond)
    up = Upstream(factory)
    d = up.resolve(*make_question())
    up.run()
    assert not d.called
    up.pumps[0].serverIO.loseConnection()
    up.run()
    assert result_of(d)
    assert len(seen) == 2


def test_against_doh_site_in_memory() -> None:
    handler = Handler()
    reactor_for_site = MemoryReactorClock()
    site = doh_site(handler, reactor=reactor_for_site)
    for method in ("POST", "GET"):
        up = Upstream(site, method=method)
        data, question = make_question()
        d = up.resolve(data, question)
        up.run()
        assert result_of(d) == make_answer(b"\x00\x00" + data[2:])
    assert [call[0][:2] for call in handler.calls] == [b"\x00\x00", b"\x00\x00"]


def test_close_closes_pooled_connections() -> None:
    factory, _ = canned()
    up = Upstream(factory)
    d = up.resolve(*make_question())
    up.run()
    result_of(d)
    closing = up.upstream.close()
    up.run()
    up.reactor.advance(2)  # the TLS-less connection closes at once; the grace timer is moot
    result_of(closing)
    assert all(p.clientIO.disconnected for p in up.pumps)
    with pytest.raises(UpstreamError, match="closed"):
        result_of(up.resolve(*make_question()))


def test_bad_urls_and_options_are_refused_with_a_sentence() -> None:
    reactor = MemoryReactorClock()
    with pytest.raises(ValueError, match="https://"):
        DohUpstream(reactor, "dns.example/dns-query")
    with pytest.raises(ValueError, match="POST or GET"):
        DohUpstream(reactor, "https://dns.example/dns-query", method="PUT")
    with pytest.raises(ValueError, match="CA file"):
        DohUpstream(reactor, "https://dns.example/dns-query", ca_file="/nonexistent/ca.pem")


# --------------------------------------------------------------------------- the HTTP/2 shell

H2 = doh_client.H2_AVAILABLE
needs_h2 = pytest.mark.skipif(not H2, reason="the h2 extra is not installed")


class H2Pair:
    """_H2Protocol on a StringTransport, and an h2 server state machine on the other end."""

    def __init__(self, server_settings: dict[int, int] | None = None) -> None:
        import h2.config
        import h2.connection

        self.changes = 0
        self.client = doh_client._H2Protocol(b"doh.test", self._changed)
        self.transport = StringTransport()
        self.transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        self.client.makeConnection(self.transport)
        self.client.handshakeCompleted()
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.server = h2.connection.H2Connection(config=config)
        self.server.initiate_connection()
        if server_settings:
            self.server.update_settings(server_settings)
        self.events: list[Any] = []
        self.pump()

    def _changed(self) -> None:
        self.changes += 1

    def pump(self) -> list[Any]:
        new: list[Any] = []
        for _ in range(100):
            to_server = self.transport.value()
            self.transport.clear()
            if to_server:
                new += self.server.receive_data(to_server)
            to_client = self.server.data_to_send()
            if to_client:
                self.client.dataReceived(to_client)
            if not to_server and not to_client:
                self.events += new
                return new
        raise AssertionError("the HTTP/2 exchange never settled")

    def respond(self, stream_id: int, body: bytes, status: bytes = b"200") -> None:
        headers = [(b":status", status), (b"content-type", b"application/dns-message")]
        self.server.send_headers(stream_id, headers)
        self.server.send_data(stream_id, body, end_stream=True)
        self.pump()


def request_headers(method: bytes = b"POST") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", b"doh.test"),
        (b":path", b"/dns-query"),
    ]


def of_type(events: list[Any], name: str) -> list[Any]:
    return [e for e in events if type(e).__name__ == name]


@needs_h2
def test_h2_streams_are_multiplexed_and_answered_in_any_order() -> None:
    pair = H2Pair()
    first = pair.client.request(request_headers(), b"first query")
    second = pair.client.request(request_headers(b"GET"), b"")
    events = pair.pump()
    received = of_type(events, "RequestReceived")
    assert [e.stream_id for e in received] == [1, 3]
    assert [e.data for e in of_type(events, "DataReceived")] == [b"first query"]
    pair.respond(3, b"second answer")
    assert result_of(second).body == b"second answer"
    assert not first.called
    pair.respond(1, b"first answer", b"503")
    reply = result_of(first)
    assert (reply.status, reply.content_type, reply.body) == (
        503,
        b"application/dns-message",
        b"first answer",
    )
    assert pair.client.streams == {}


@needs_h2
def test_h2_request_bodies_wait_for_the_flow_control_window() -> None:
    import h2.settings

    pair = H2Pair({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    body = bytes(range(256)) * 4
    d = pair.client.request(request_headers(), body)
    events = pair.pump()
    got = b"".join(e.data for e in of_type(events, "DataReceived"))
    assert len(got) == 100  # the window, no more
    for _ in range(20):
        for event in of_type(pair.events, "DataReceived"):
            pair.server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        pair.events.clear()
        events = pair.pump()
        got += b"".join(e.data for e in of_type(events, "DataReceived"))
        if of_type(events, "StreamEnded"):
            break
    assert got == body
    pair.respond(1, b"answer")
    assert result_of(d).body == b"answer"


@needs_h2
def test_h2_goaway_sends_every_open_stream_elsewhere() -> None:
    pair = H2Pair()
    first = pair.client.request(request_headers(), b"q1")
    second = pair.client.request(request_headers(), b"q2")
    pair.pump()
    pair.server.close_connection(last_stream_id=1)
    pair.pump()
    # h2 reads no frame after a GOAWAY, so even stream 1 cannot be finished here: both go
    # again (the caller retries _Retryable once, on another connection).
    for d in (first, second):
        with pytest.raises(doh_client._Retryable, match="closed the HTTP/2 connection"):
            result_of(d)
    assert not pair.client.has_room()
    assert pair.transport.disconnecting


@needs_h2
def test_h2_stream_reset_by_the_server() -> None:
    import h2.errors

    pair = H2Pair()
    refused = pair.client.request(request_headers(), b"q1")
    broken = pair.client.request(request_headers(), b"q2")
    pair.pump()
    pair.server.reset_stream(1, h2.errors.ErrorCodes.REFUSED_STREAM)
    pair.server.reset_stream(3, h2.errors.ErrorCodes.INTERNAL_ERROR)
    pair.pump()
    with pytest.raises(doh_client._Retryable):
        result_of(refused)
    failure: list[Failure] = []
    broken.addErrback(failure.append)
    assert failure[0].check(UpstreamError) and not failure[0].check(doh_client._Retryable)


@needs_h2
def test_h2_cancel_resets_the_stream_and_keeps_the_connection() -> None:
    pair = H2Pair()
    d = pair.client.request(request_headers(), b"q1")
    pair.pump()
    d.addErrback(lambda f: None)
    d.cancel()
    events = pair.pump()
    assert [e.stream_id for e in of_type(events, "StreamReset")] == [1]
    assert pair.client.has_room() and not pair.transport.disconnecting
    again = pair.client.request(request_headers(), b"q2")
    pair.pump()
    pair.respond(3, b"a2")
    assert result_of(again).body == b"a2"


@needs_h2
def test_h2_connection_lost_fails_open_streams_as_retryable() -> None:
    pair = H2Pair()
    d = pair.client.request(request_headers(), b"q1")
    pair.client.connectionLost(Failure(ConnectionLost()))
    with pytest.raises(doh_client._Retryable):
        result_of(d)
    assert pair.client.gone and not pair.client.has_room()


@needs_h2
def test_h2_respects_the_servers_stream_limit() -> None:
    import h2.settings

    pair = H2Pair({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    assert pair.client.max_streams == 2
    pair.client.request(request_headers(), b"q1")
    assert pair.client.has_room()
    pair.client.request(request_headers(), b"q2")
    assert not pair.client.has_room()


@needs_h2
def test_h2_oversized_answer_is_refused_and_the_stream_reset() -> None:
    pair = H2Pair()
    d = pair.client.request(request_headers(), b"q1")
    pair.pump()
    pair.server.send_headers(1, [(b":status", b"200")])
    sent = 0
    while not d.called and sent < 200_000:
        pair.server.send_data(1, bytes(16000))
        sent += 16000
        pair.pump()
    assert sent <= 80_000
    with pytest.raises(UpstreamError, match="bigger than"):
        result_of(d)
    assert of_type(pair.events, "StreamReset")


# --------------------------------------------------------------------------- HTTP/2 end to end over TLS in memory


def tls_site(handler: Handler, reactor: MemoryReactorClock) -> Any:
    """doh_site behind TLS, speaking HTTP/2 (ALPN) when h2 is installed."""
    site = doh_site(handler, reactor=reactor)
    return TLSMemoryBIOFactory(server_tls_options(), False, site, clock=reactor)


def server_tls_options(alpn: list[bytes] | None = None) -> CertificateOptions:
    key, cert = server_key_and_certificate()
    return CertificateOptions(privateKey=key, certificate=cert, acceptableProtocols=alpn)


@pytest.fixture
def site_clock(monkeypatch: pytest.MonkeyPatch) -> MemoryReactorClock:
    """Twisted's HTTP/2 server takes the global reactor for its timers; give it ours."""
    clock = MemoryReactorClock()
    if H2:
        from twisted.web import _http2, http

        monkeypatch.setattr(http, "H2Connection", functools.partial(_http2.H2Connection, clock))
    return clock


@needs_h2
@pytest.mark.parametrize("connections", [1, 2])
def test_h2_end_to_end_with_doh_site_over_tls(
    site_clock: MemoryReactorClock, connections: int
) -> None:
    handler = Handler()
    up = Upstream(
        tls_site(handler, site_clock),
        url="https://127.0.0.1:8053/dns-query",
        reactor=site_clock,
        verify=False,
        connections=connections,
    )
    data, question = make_question()
    pending = [up.resolve(data, question) for _ in range(250)]
    up.run()
    answers = {result_of(d) for d in pending}
    assert answers == {make_answer(b"\x00\x00" + data[2:])}
    assert up.upstream.protocol == "h2"
    # 250 streams at once would fill three connections of 100 streams: no more than allowed
    # (fewer when answers free streams before another connection is needed).
    assert 1 <= up.upstream.connections_opened <= connections
    assert len(handler.calls) == 250


@needs_h2
def test_a_query_that_times_out_connecting_does_not_fail_the_next(
    site_clock: MemoryReactorClock,
) -> None:
    up = Upstream(
        tls_site(Handler(), site_clock),
        url="https://127.0.0.1:8053/dns-query",
        reactor=site_clock,
        verify=False,
        timeout=3,
    )
    first = up.resolve(*make_question())
    site_clock.advance(2)
    second = up.resolve(*make_question())  # waits for the connection the first one opens
    site_clock.advance(1)
    with pytest.raises(UpstreamError, match="within 3s"):
        result_of(first)
    assert not second.called
    # The first attempt was abandoned; the second query makes its own.
    assert len(site_clock.tcpClients) == 2
    site_clock.tcpClients.pop(0)
    site_clock.connectors.pop(0)
    up.run()
    assert result_of(second)


def test_http11_over_tls_when_http2_is_off(site_clock: MemoryReactorClock) -> None:
    handler = Handler()
    up = Upstream(
        tls_site(handler, site_clock),
        url="https://127.0.0.1:8053/dns-query",
        reactor=site_clock,
        verify=False,
        http2=False,
    )
    d = up.resolve(*make_question())
    up.run()
    assert result_of(d)
    assert up.upstream.protocol == "http/1.1"


def test_verification_fails_against_an_unknown_certificate(
    site_clock: MemoryReactorClock,
) -> None:
    up = Upstream(
        tls_site(Handler(), site_clock), url="https://127.0.0.1:8053/dns-query", reactor=site_clock
    )
    d = up.resolve(*make_question())
    up.run()
    with pytest.raises(UpstreamError, match=r"(?i)TLS handshake failed.*certificate"):
        result_of(d)


def test_verification_fails_when_the_certificate_is_for_another_name(
    site_clock: MemoryReactorClock, tmp_path: Any
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(server_key_and_certificate()[1].public_bytes(serialization.Encoding.PEM))
    up = Upstream(
        tls_site(Handler(), site_clock),
        url="https://127.0.0.1:8053/dns-query",
        reactor=site_clock,
        ca_file=str(ca_file),
    )
    d = up.resolve(*make_question())
    up.run()
    with pytest.raises(UpstreamError, match="certificate is not for this host"):
        result_of(d)


def test_open_connections_are_counted_for_metrics_and_alpn_passes_through() -> None:
    from gateway.listening import Admission, Guard
    from gateway.protocols.dns import listener

    site = doh_site(Handler(), reactor=MemoryReactorClock())
    guard: Guard[object] = Guard("doh-in", (), 2)
    counted = listener._GuardedSite(site, guard)
    assert counted.acceptableProtocols() == site.acceptableProtocols()
    first = counted.buildProtocol(PEER)
    first.makeConnection(StringTransport(peerAddress=PEER))
    second = counted.buildProtocol(PEER)
    second_transport = StringTransport(peerAddress=PEER)
    second.makeConnection(second_transport)
    assert len(guard.connections) == 2
    assert counted.buildProtocol(PEER) is None  # over max_connections: refused
    assert guard.refused[Admission.TOO_MANY] == 1 and len(guard.connections) == 2
    second.dataReceived(post_request(query()))
    assert second_transport.value().startswith(b"HTTP/1.1 200 ") and len(guard.connections) == 2
    second.connectionLost(Failure(ConnectionDone()))
    assert list(guard.connections) == [first]
    first.connectionLost(Failure(ConnectionDone()))
    assert not guard.connections


SOA = "ns.example.test. hostmaster.example.test. 1 3600 900 604800 60"


def _response(rcode: int = dns.rcode.NOERROR, *, cname: bool = False, soa: bool = False) -> Any:
    query = dns.message.make_query("nx.example.test.", "A")
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if cname:
        response.answer.append(
            dns.rrset.from_text("nx.example.test.", 300, "IN", "CNAME", "gone.example.test.")
        )
    if soa:
        response.authority.append(dns.rrset.from_text("example.test.", 3600, "IN", "SOA", SOA))
    return response


def test_doh_cache_control_is_zero_for_servfail_refused_and_truncated_answers() -> None:
    """Defect: Cache-Control max-age came from the records whatever the RCODE: a SERVFAIL with
    an SOA got max-age=60, a REFUSED or truncated answer with records their TTL, so HTTP caches
    kept failures and partial answers (RFC 8484 §5.1, RFC 2308 §7)."""
    servfail = _response(dns.rcode.SERVFAIL, soa=True).to_wire()
    assert cache_control(servfail) == b"max-age=0"
    refused = _response(dns.rcode.REFUSED, cname=True).to_wire()
    assert cache_control(refused) == b"max-age=0"
    truncated = _response(cname=True)
    truncated.flags |= dns.flags.TC
    assert cache_control(truncated.to_wire()) == b"max-age=0"
    assert cache_control(_response(cname=True).to_wire()) == b"max-age=300"


def test_doh_cache_control_of_nxdomain_after_a_cname_uses_the_soa_minimum() -> None:
    """Defect: an NXDOMAIN reached through a CNAME (an answer record, and an SOA in the
    authority section) got max-age=300 from the CNAME instead of the negative TTL,
    min(SOA TTL, SOA MINIMUM) = 60 (RFC 2308 §5)."""
    nxdomain = _response(dns.rcode.NXDOMAIN, cname=True, soa=True).to_wire()
    assert cache_control(nxdomain) == b"max-age=60"
    nodata = _response(cname=True, soa=True).to_wire()
    assert cache_control(nodata) == b"max-age=60"


def test_a_client_over_its_query_rate_gets_429_and_retry_after() -> None:
    """Defect (issue 16): nothing limited how fast one DoH client could query."""
    guard: Guard[Any] = Guard("doh-in", (), 100, DohLimits(query_rate=Rate.parse("2/s")))
    server = Server(throttle=functools.partial(guard.throttle, "query_rate"))
    responses = server.send(post_request(query()) * 3)
    assert [r.status for r in responses] == [200, 200, 429]
    assert responses[2].headers["retry-after"] == "1"
    assert responses[2].body == b"too many queries, slow down\n"
    assert len(server.handler.calls) == 2
    assert guard.throttled == {"query_rate": 1}
