"""Limits per client (``limits:``): the counting, the guard, and each protocol's answer.

Defect (issue 16): nothing limited how fast one client could connect, send or
fail, nor how many connections one address could hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from gateway.config import ClientLimits, ConfigError, Rate, parse
from gateway.limits import ConnectionCounter, RateLimiter, client_key
from gateway.listening import Admission, Guard, retry_after
from gateway.protocols.http.config import HttpLimits
from gateway.protocols.http.server import Exchange, HttpServerFactory
from gateway.protocols.nntp.config import NntpLimits
from gateway.protocols.nntp.server import NntpServerFactory, NntpSession, Response
from gateway.protocols.smtp.config import SmtpLimits, SmtpListenerConfig
from gateway.protocols.smtp.listener import SmtpListener
from gateway.protocols.smtp.server import Reply, SmtpServerFactory, SmtpSession
from tests.support.port import FakePort


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the counting ------------------------------------------------------------------------


def test_a_client_is_its_ipv4_address_or_its_ipv6_slash_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:ffff::9") == client_key("2001:db8:1:2::1")
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("") == ""


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [("60/m", 60, 60.0), ("10/s", 10, 1.0), (" 1000 / h ", 1000, 3600.0)],
)
def test_rates_read_as_count_per_unit(text: str, count: int, per: float) -> None:
    rate = Rate.parse(text)
    assert (rate.count, rate.per) == (count, per)
    assert Rate.parse(str(rate)) == rate


@pytest.mark.parametrize("text", ["0/s", "10", "10/d", "x/s", "-1/s", "1.5/s"])
def test_a_bad_rate_says_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="expected a rate such as 60/m"):
        Rate.parse(text)


def test_a_rate_lets_its_burst_through_then_its_average() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate.parse("3/s"), clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(1 / 3)
    assert limiter.take("b") == 0.0  # another client has its own bucket
    clock.now += 0.34
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    clock.now += 10
    assert [limiter.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled to the burst
    assert limiter.limited == 3


def test_peeking_at_a_rate_counts_nothing() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate.parse("1/m"), clock)
    assert limiter.peek("a") == 0.0
    assert limiter.peek("a") == 0.0
    assert limiter.take("a") == 0.0
    assert limiter.peek("a") == pytest.approx(60.0)
    clock.now += 30
    assert limiter.peek("a") == pytest.approx(30.0)


def test_the_client_table_is_bounded_and_forgets_the_oldest() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate.parse("1/h"), clock, max_clients=100)
    for n in range(1000):
        limiter.take(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter) == 100
    assert limiter.take("10.0.3.231") > 0  # among the last 100: remembered
    assert limiter.take("10.0.0.1") == 0.0  # forgotten: a full burst again


def test_connections_are_counted_per_client() -> None:
    counter = ConnectionCounter(2)
    for _ in range(2):
        assert counter.has_room("a")
        counter.open("a")
    assert not counter.has_room("a")
    assert counter.has_room("b")
    counter.close("a")
    assert counter.has_room("a")
    counter.close("a")
    assert len(counter) == 0


# --- the guard ---------------------------------------------------------------------------


def test_the_guard_refuses_a_clients_connections_over_its_limit_and_frees_them() -> None:
    guard: Guard[object] = Guard("in", (), 100, ClientLimits(connections=2))
    a = [object() for _ in range(3)]
    assert [guard.connect(c, "192.0.2.7") for c in a] == [
        Admission.OK,
        Admission.OK,
        Admission.CLIENT_CONNECTIONS,
    ]
    assert guard.connect(object(), "192.0.2.8") is Admission.OK
    v6 = [object() for _ in range(3)]
    hosts = ["2001:db8::1", "2001:db8::2", "2001:db8::3"]  # one /64
    assert [guard.connect(c, h) for c, h in zip(v6, hosts, strict=True)][2] is (
        Admission.CLIENT_CONNECTIONS
    )
    guard.disconnect(a[2])  # a refused one frees nothing
    assert guard.connect(object(), "192.0.2.7") is Admission.CLIENT_CONNECTIONS
    guard.disconnect(a[0])
    assert guard.connect(object(), "192.0.2.7") is Admission.OK
    assert guard.refused[Admission.CLIENT_CONNECTIONS] == 3


def test_the_guard_refuses_a_client_connecting_too_fast_and_says_when_to_retry() -> None:
    clock = Clock()
    guard: Guard[object] = Guard(
        "in", (), 100, ClientLimits(connection_rate=Rate.parse("2/m")), clock
    )
    assert guard.connect(object(), "192.0.2.7") is Admission.OK
    assert guard.connect(object(), "192.0.2.7") is Admission.OK
    assert guard.connect(object(), "192.0.2.7") is Admission.CLIENT_RATE
    assert guard.retry_after == pytest.approx(30.0)
    assert retry_after(guard.retry_after) == 30
    assert guard.connect(object(), "192.0.2.9") is Admission.OK
    clock.now += 30
    assert guard.connect(object(), "192.0.2.7") is Admission.OK
    assert guard.throttled == {"connection_rate": 1}


def test_the_allow_list_comes_before_the_limits() -> None:
    from gateway.config import Network

    guard: Guard[object] = Guard(
        "in", (Network.parse("10.0.0.0/8"),), 100, ClientLimits(connection_rate=Rate.parse("1/h"))
    )
    for _ in range(3):
        assert guard.connect(object(), "192.0.2.7") is Admission.NOT_ALLOWED
    assert guard.connect(object(), "10.0.0.1") is Admission.OK


def test_a_reload_keeps_what_an_unchanged_rate_counted_and_counts_open_connections() -> None:
    clock = Clock()
    guard: Guard[object] = Guard("in", (), 100, SmtpLimits(message_rate=Rate.parse("1/h")), clock)
    held = [object(), object()]
    for c in held:
        assert guard.connect(c, "192.0.2.7") is Admission.OK
    assert guard.throttle("message_rate", "192.0.2.7") == 0.0
    guard.configure((), 100, SmtpLimits(message_rate=Rate.parse("1/h"), connections=2))
    assert guard.throttle("message_rate", "192.0.2.7") > 0  # still counted
    # The two connections open before the reload count against the new limit.
    assert guard.connect(object(), "192.0.2.7") is Admission.CLIENT_CONNECTIONS
    guard.configure((), 100, SmtpLimits(message_rate=Rate.parse("2/h")))
    assert guard.throttle("message_rate", "192.0.2.7") == 0.0  # a new rate starts afresh
    assert guard.connect(object(), "192.0.2.7") is Admission.OK  # connections: no limit now


def test_an_unset_rate_never_throttles() -> None:
    guard: Guard[object] = Guard("in", (), 100)
    assert guard.throttle("message_rate", "192.0.2.7") == 0.0
    assert guard.over("article_rate", "192.0.2.7") == 0.0


def test_limits_and_their_counts_are_in_the_metrics() -> None:
    guard: Guard[object] = Guard(
        "mail-in", (), 100, SmtpLimits(connections=5, message_rate=Rate.parse("60/m"))
    )
    guard.connect(object(), "192.0.2.7")
    for _ in range(61):
        guard.throttle("message_rate", "192.0.2.7")
    samples = {
        (metric.name, labels[1]): value
        for metric in guard.metrics()
        for labels, value in metric.samples
        if len(labels) == 2
    }
    assert samples[("gateway_listener_limit", "connections")] == 5
    assert samples[("gateway_listener_limit", "message_rate")] == 1.0
    assert samples[("gateway_listener_limit_clients", "connections")] == 1
    assert samples[("gateway_listener_limit_clients", "message_rate")] == 1
    assert samples[("gateway_listener_rate_limited", "message_rate")] == 1


# --- routes.yaml ---------------------------------------------------------------------------


def _listener(limits: str, protocol: str = "smtp") -> str:
    to = {"smtp": "box", "nntp": "box", "http": "box"}[protocol]
    extra = (
        ", transforms: [http_to_mail], options: {from: a@b.test, to: c@d.test}"
        if protocol == "http"
        else ""
    )
    return f"""
version: 1
listeners:
  in:
    protocol: {protocol}
    listen: "tcp:2525:interface=127.0.0.1"
    limits: {limits}
destinations:
  box: {{protocol: maildir, path: box}}
routes:
  - {{from: in, to: {to}{extra}}}
"""


def test_each_protocol_reads_its_own_limits() -> None:
    smtp = parse(_listener("{connections: 5, connection_rate: 30/m, recipient_rate: 5/s}"))
    assert smtp.listeners["in"].client_limits() == SmtpLimits(
        connections=5, connection_rate=Rate.parse("30/m"), recipient_rate=Rate.parse("5/s")
    )
    nntp = parse(_listener("{article_rate: 50/s}", "nntp"))
    assert nntp.listeners["in"].client_limits() == NntpLimits(article_rate=Rate.parse("50/s"))
    http = parse(_listener("{request_rate: 10/s}", "http"))
    assert http.listeners["in"].client_limits() == HttpLimits(request_rate=Rate.parse("10/s"))


@pytest.mark.parametrize(
    ("limits", "protocol", "message"),
    [
        (
            "{recipent_rate: 5/s}",
            "smtp",
            "unknown key 'recipent_rate'; did you mean 'recipient_rate'",
        ),
        ("{request_rate: 10/s}", "smtp", "unknown key 'request_rate'"),
        ("{request_rate: 10/x}", "http", "'request_rate': expected a rate such as 60/m"),
        ("{connections: -1}", "nntp", "'connections' must be 0 (no limit) or more, not -1"),
    ],
)
def test_a_wrong_limit_is_named_with_its_place(limits: str, protocol: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(_listener(limits, protocol))
    assert message in str(caught.value)
    assert "routes.yaml:7:" in str(caught.value)


# --- SMTP ------------------------------------------------------------------------------------


class _SmtpHandler:
    def on_connect(self, session: SmtpSession) -> None:
        return None

    def on_sender(self, session: SmtpSession, sender: str, params: Mapping[str, Any]) -> None:
        return None

    def on_recipient(
        self, session: SmtpSession, sender: str, recipient: str, params: Mapping[str, Any]
    ) -> None:
        return None

    async def on_message(
        self, session: SmtpSession, sender: str, recipients: tuple[str, ...], data: bytes
    ) -> Reply:
        return Reply(250, "2.0.0", "Ok")


def _smtp(limits: SmtpLimits, clock: MemoryReactorClock) -> SmtpServerFactory:
    guard: Guard[Any] = Guard("mail-in", (), 100, limits, clock.seconds)
    return SmtpServerFactory(
        _SmtpHandler(), reactor=clock, hostname="gw.test", max_size=0, guard=guard
    )


class Session(StringTransport):
    """A client connected to ``factory`` from ``host``, in memory."""

    def __init__(self, factory: Any, host: str = "192.0.2.7") -> None:
        peer = IPv4Address("TCP", host, 40000)
        super().__init__(peerAddress=peer)
        self.server = factory.buildProtocol(peer)
        self.server.makeConnection(self)

    def say(self, data: bytes) -> list[bytes]:
        """The reply lines to ``data``."""
        self.clear()
        self.server.dataReceived(data)
        return self.value().splitlines()

    def codes(self, data: bytes = b"") -> list[bytes]:
        self.clear()
        if data:
            self.server.dataReceived(data)
        return [line[:3] for line in self.value().split(b"\r\n") if line]


def test_smtp_refuses_a_clients_extra_connections_with_421_4_7_0() -> None:
    clock = MemoryReactorClock()
    factory = _smtp(SmtpLimits(connections=1), clock)
    assert Session(factory).value().startswith(b"220 ")
    second = Session(factory)
    assert second.value() == b"421 4.7.0 gw.test Too many connections from 192.0.2.7\r\n"
    assert second.disconnecting
    assert Session(factory, "192.0.2.8").value().startswith(b"220 ")


def test_smtp_refuses_a_client_connecting_too_often_with_421_and_when_to_retry() -> None:
    clock = MemoryReactorClock()
    factory = _smtp(SmtpLimits(connection_rate=Rate.parse("1/m")), clock)
    assert Session(factory).value().startswith(b"220 ")
    assert Session(factory).value() == (
        b"421 4.7.0 gw.test 192.0.2.7 connects too often, try again in 60 seconds\r\n"
    )


def test_smtp_answers_450_4_7_1_over_the_message_and_recipient_rates() -> None:
    clock = MemoryReactorClock()
    factory = _smtp(
        SmtpLimits(message_rate=Rate.parse("2/m"), recipient_rate=Rate.parse("3/m")), clock
    )
    t = Session(factory)
    t.say(b"EHLO c\r\n")
    assert t.say(b"MAIL FROM:<a@b.test>\r\n") == [b"250 2.1.0 Ok"]
    rcpts = t.say(b"RCPT TO:<x@y.test>\r\n" * 4)
    assert rcpts[:3] == [b"250 2.1.5 Ok"] * 3
    assert rcpts[3] == b"450 4.7.1 Too many recipients from 192.0.2.7, try again in 20 seconds"
    assert t.say(b"RSET\r\nMAIL FROM:<a@b.test>\r\n")[1] == b"250 2.1.0 Ok"
    assert t.say(b"RSET\r\nMAIL FROM:<a@b.test>\r\n")[1] == (
        b"450 4.7.1 Too much mail from 192.0.2.7, try again in 30 seconds"
    )
    # Another client is not held back by this one.
    other = Session(factory, "192.0.2.8")
    other.say(b"EHLO c\r\n")
    assert other.say(b"MAIL FROM:<a@b.test>\r\n") == [b"250 2.1.0 Ok"]
    clock.advance(30)
    assert t.say(b"RSET\r\nMAIL FROM:<a@b.test>\r\n")[1] == b"250 2.1.0 Ok"


def test_an_smtp_listener_takes_its_limits_from_routes_yaml_and_reloads_them() -> None:
    port = FakePort()
    config = SmtpListenerConfig(
        name="mail-in", listen=(), hostname="gw.test", limits=SmtpLimits(connections=1)
    )
    listener = SmtpListener(config, port, port.reactor)
    factory = listener.factory()
    held = Session(factory)
    assert held.value().startswith(b"220 ")
    assert Session(factory).value().startswith(b"421 4.7.0")
    listener.reconfigure(
        SmtpListenerConfig(name="mail-in", listen=(), hostname="gw.test", limits=SmtpLimits())
    )
    assert Session(factory).value().startswith(b"220 ")


# --- NNTP ------------------------------------------------------------------------------------


class _NntpHandler:
    def __init__(self) -> None:
        self.articles: list[str] = []

    def on_connect(self, session: NntpSession) -> None:
        return None

    def on_auth(self, session: NntpSession, user: str, password: str) -> Response:
        return Response(281, "ok") if password == "right" else Response(481, "no")

    def on_offer(self, session: NntpSession, command: str, message_id: str) -> Response:
        return Response(335 if command == "IHAVE" else 238, message_id)

    async def on_article(
        self, session: NntpSession, command: str, message_id: str, data: bytes
    ) -> Response:
        self.articles.append(message_id)
        return Response({"POST": 240, "IHAVE": 235, "TAKETHIS": 239}[command], message_id)


ARTICLE = b"From: a@b.test\r\nNewsgroups: x.y\r\nSubject: s\r\n\r\nbody\r\n.\r\n"


def _nntp(limits: NntpLimits) -> tuple[NntpServerFactory, _NntpHandler, MemoryReactorClock]:
    clock = MemoryReactorClock()
    handler = _NntpHandler()
    guard: Guard[Any] = Guard("news-in", (), 100, limits, clock.seconds)
    factory = NntpServerFactory(
        handler, reactor=clock, hostname="gw.test", max_size=1 << 20, guard=guard
    )
    return factory, handler, clock


def test_nntp_refuses_a_clients_extra_connections_with_400() -> None:
    factory, _, _ = _nntp(NntpLimits(connections=1))
    assert Session(factory).value()[:3] == b"200"
    refused = Session(factory)
    assert refused.value() == b"400 Too many connections from 192.0.2.7, try again later\r\n"
    assert refused.disconnecting
    assert Session(factory, "192.0.2.8").value()[:3] == b"200"


def test_nntp_refuses_a_client_connecting_too_often_with_400() -> None:
    factory, _, _ = _nntp(NntpLimits(connection_rate=Rate.parse("2/h")))
    assert [Session(factory).value()[:3] for _ in range(2)] == [b"200", b"200"]
    refused = Session(factory)
    assert refused.value() == b"400 192.0.2.7 connects too often, try again in 1800 seconds\r\n"


def test_nntp_offers_over_the_article_rate_are_put_off_and_counted_only_when_sent() -> None:
    factory, handler, clock = _nntp(NntpLimits(article_rate=Rate.parse("2/m")))
    t = Session(factory)
    # Offers count nothing: the articles do.
    assert t.codes(b"CHECK <a@x>\r\nCHECK <b@x>\r\nCHECK <c@x>\r\n") == [b"238"] * 3
    assert t.codes(b"IHAVE <d@x>\r\n") == [b"335"]
    assert t.codes(ARTICLE) == [b"235"]
    assert t.codes(b"IHAVE <e@x>\r\n") == [b"335"]
    assert t.codes(ARTICLE) == [b"235"]
    assert t.codes(b"IHAVE <f@x>\r\nCHECK <g@x>\r\n") == [b"436", b"431"]
    assert t.codes(b"POST\r\n") == [b"340"]
    lines = t.codes(ARTICLE)
    assert lines == [b"441"]
    assert handler.articles == ["<d@x>", "<e@x>"]
    clock.advance(30)
    assert t.codes(b"IHAVE <f@x>\r\n") == [b"335"]


def test_a_streamed_article_over_the_rate_waits_for_its_turn() -> None:
    factory, handler, clock = _nntp(NntpLimits(article_rate=Rate.parse("1/s")))
    t = Session(factory)
    t.clear()
    t.server.dataReceived(b"TAKETHIS <a@x>\r\n" + ARTICLE + b"TAKETHIS <b@x>\r\n" + ARTICLE)
    assert t.value() == b"239 <a@x>\r\n"  # the second waits, nothing refused
    clock.advance(1.0)
    assert t.value() == b"239 <a@x>\r\n239 <b@x>\r\n"
    assert handler.articles == ["<a@x>", "<b@x>"]
    assert factory.guard.throttled == {"article_rate": 1}


def test_a_streamed_article_that_would_wait_too_long_gets_400() -> None:
    factory, handler, _ = _nntp(NntpLimits(article_rate=Rate.parse("1/h")))
    t = Session(factory)
    t.clear()
    t.server.dataReceived(b"TAKETHIS <a@x>\r\n" + ARTICLE + b"TAKETHIS <b@x>\r\n" + ARTICLE)
    assert t.value().split(b"\r\n")[:2] == [
        b"239 <a@x>",
        b"400 Too many articles from 192.0.2.7, try again in 3600 seconds",
    ]
    assert t.disconnecting
    assert handler.articles == ["<a@x>"]


def test_a_peer_gone_while_its_article_waits_has_nothing_stored() -> None:
    factory, handler, clock = _nntp(NntpLimits(article_rate=Rate.parse("1/s")))
    t = Session(factory)
    t.server.dataReceived(b"TAKETHIS <a@x>\r\n" + ARTICLE + b"TAKETHIS <b@x>\r\n" + ARTICLE)
    t.server.connectionLost(Failure(ConnectionDone()))
    clock.advance(2.0)
    assert handler.articles == ["<a@x>"]


def test_ipv6_clients_of_one_slash_64_share_their_limits() -> None:
    factory, _, _ = _nntp(NntpLimits(connections=1))
    first = IPv6Address("TCP", "2001:db8::1", 40000)
    protocol = factory.buildProtocol(first)
    transport = StringTransport(peerAddress=first)
    protocol.makeConnection(transport)
    assert transport.value()[:3] == b"200"
    second = IPv6Address("TCP", "2001:db8::2", 40000)
    protocol = factory.buildProtocol(second)
    transport = StringTransport(peerAddress=second)
    protocol.makeConnection(transport)
    assert transport.value()[:3] == b"400"


# --- HTTP ------------------------------------------------------------------------------------


class _Answer:
    def handle(self, exchange: Exchange) -> None:
        exchange.respond(200, b"ok\n")


def _http(limits: HttpLimits) -> tuple[HttpServerFactory, MemoryReactorClock]:
    clock = MemoryReactorClock()
    guard: Guard[Any] = Guard("web", (), 100, limits, clock.seconds)
    return HttpServerFactory(_Answer(), clock, guard=guard), clock


def test_http_answers_429_and_retry_after_over_the_request_rate() -> None:
    factory, clock = _http(HttpLimits(request_rate=Rate.parse("2/s")))
    t = Session(factory)
    t.server.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" * 3)
    answers = t.value().split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"200", b"429"]
    assert b"Retry-After: 1\r\n" in answers[2]
    assert not t.disconnecting  # a throttled request costs the client its connection not
    assert Session(factory, "192.0.2.8").say(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")[0] == (
        b"HTTP/1.1 200 OK"
    )
    clock.advance(0.5)
    assert t.say(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")[0] == b"HTTP/1.1 200 OK"


def test_http_answers_429_to_a_clients_extra_connections() -> None:
    factory, _ = _http(HttpLimits(connections=1))
    assert Session(factory).say(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")[0] == b"HTTP/1.1 200 OK"
    refused = Session(factory).value()
    assert refused.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"Retry-After: 1\r\n" in refused and b"too many connections from you" in refused
    other = Session(factory, "192.0.2.8")
    assert other.say(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")[0] == b"HTTP/1.1 200 OK"


def test_http_answers_429_to_a_client_connecting_too_often() -> None:
    factory, _ = _http(HttpLimits(connection_rate=Rate.parse("3/m")))
    assert [Session(factory).value() for _ in range(3)] == [b""] * 3  # served, no request yet
    refused = Session(factory).value()
    assert refused.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"Retry-After: 20\r\n" in refused and b"you connect too often" in refused


def test_a_logged_in_news_client_is_counted_as_its_user_wherever_it_connects_from() -> None:
    factory, _, _ = _nntp(NntpLimits(article_rate=Rate.parse("1/h")))
    factory.auth_available = True
    for host, message_id in (("192.0.2.7", b"<a@x>"), ("192.0.2.8", b"<b@x>")):
        t = Session(factory, host)
        assert t.codes(b"AUTHINFO USER feeder\r\nAUTHINFO PASS right\r\n") == [b"381", b"281"]
        if host == "192.0.2.7":
            assert t.codes(b"IHAVE " + message_id + b"\r\n") == [b"335"]
            assert t.codes(ARTICLE) == [b"235"]
        else:  # the user's one article an hour is spent
            assert t.codes(b"IHAVE " + message_id + b"\r\n") == [b"436"]
    # Another address without a login has its own count.
    assert Session(factory, "192.0.2.8").codes(b"IHAVE <c@x>\r\n") == [b"335"]
