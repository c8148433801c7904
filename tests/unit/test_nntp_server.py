"""The NNTP server in memory: the sans-io ServerCodec, the Twisted shell and the listener.

The shell runs on StringTransport and MemoryReactorClock; the listener is
given a stand-in for the gateway whose verdicts each test chooses (the real
gateway is exercised by tests/integration/news/test_nntp_listener.py).
"""

from __future__ import annotations

import dataclasses
import email.utils
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from gateway.config import ConfigError, Network, Rate, parse
from gateway.listening import Admission
from gateway.message import Article
from gateway.ports import Reason, Status, Verdict
from gateway.protocols.nntp.client import Reply
from gateway.protocols.nntp.codec import (
    ArticleReceived,
    AuthRequest,
    OfferRequest,
    Response,
    SendResponse,
    ServerCodec,
    ServerEvent,
    decode_block,
    encode_block,
    parse_capabilities,
)
from gateway.protocols.nntp.config import NntpLimits, NntpListenerConfig
from gateway.protocols.nntp.destination import outcome_for
from gateway.protocols.nntp.listener import (
    NntpListener,
    RecentIds,
    article_syntax_problem,
)
from gateway.protocols.nntp.server import (
    NntpServerFactory,
    NntpServerProtocol,
    NntpSession,
)
from gateway.users import FAILURE_DELAY, UsersError, read_users_file
from tests.peers import make_tls_cert
from tests.support.port import FakePort
from tests.support.transports import SmallBufferTransport
from tests.support.users import hashed

PEER = IPv4Address("TCP", "192.0.2.7", 40000)
ARTICLE = (
    b"Path: peer.example!not-for-mail\n"
    b"From: poster@example.org\n"
    b"Newsgroups: local.test\n"
    b"Subject: hello\n"
    b"Date: Wed, 25 Nov 2026 12:00:00 +0000\n"
    b"Message-ID: <a1@example.org>\n"
    b"\n"
    b"body line\n"
    b".starts with a dot\n"
)


def article(message_id: str = "<a1@example.org>", **replace: str) -> bytes:
    data = ARTICLE.replace(b"<a1@example.org>", message_id.encode())
    for name, value in replace.items():
        old = next(line for line in data.split(b"\n") if line.startswith(name.encode() + b":"))
        new = f"{name}: {value}".encode() if value else b""
        data = data.replace(old + b"\n", new + b"\n" if new else b"")
    return data


# --------------------------------------------------------------------------- the codec


def drain(codec: ServerCodec) -> list[ServerEvent]:
    events = []
    while (event := codec.next_event()) is not None:
        events.append(event)
    return events


def feed(codec: ServerCodec, data: bytes) -> list[ServerEvent]:
    codec.receive_data(data)
    return drain(codec)


def codes(events: list[ServerEvent]) -> list[int]:
    return [e.response.code for e in events if isinstance(e, SendResponse)]


def make_codec(**kw: Any) -> ServerCodec:
    kw.setdefault("hostname", "gw.test")
    kw.setdefault("clock", lambda: 1_764_072_000.0)
    return ServerCodec(**kw)


def test_greeting_says_whether_posting_is_allowed() -> None:
    assert make_codec().greeting().code == 200
    assert make_codec(posting=False).greeting().code == 201


def test_capabilities() -> None:
    codec = make_codec(auth_available=True)
    [event] = feed(codec, b"capabilities\r\n")
    assert isinstance(event, SendResponse) and event.response.code == 101
    caps = parse_capabilities(decode_block(event.block))
    assert next(iter(caps)) == "VERSION" and caps["VERSION"] == ("2",)
    assert {"IHAVE", "STREAMING", "POST"} <= set(caps)
    assert caps["AUTHINFO"] == ("USER",)
    [event] = feed(make_codec(posting=False), b"CAPABILITIES\r\n")
    assert isinstance(event, SendResponse)
    caps = parse_capabilities(decode_block(event.block))
    assert "POST" not in caps and "AUTHINFO" not in caps


def test_simple_commands() -> None:
    codec = make_codec()
    events = feed(
        codec,
        b"HELP\r\nDATE\r\nMODE READER\r\nMODE STREAM\r\nmode bogus\r\nFOO\r\nIHAVE nope\r\n"
        b"DATE x\r\n\r\nQUIT\r\nHELP\r\n",
    )
    assert codes(events) == [100, 111, 200, 203, 501, 500, 501, 501, 500, 205]
    date = events[1]
    assert isinstance(date, SendResponse) and date.response.text == "20251125120000"
    assert isinstance(events[-1], SendResponse) and events[-1].close
    assert codec.closed


def test_over_long_line_is_501_and_the_session_goes_on() -> None:
    codec = make_codec()
    events = feed(codec, b"IHAVE <" + b"x" * 600 + b"@y>\r\nDATE\r\n")
    assert codes(events) == [501, 111]
    # A line without end is answered once it is over the limit, and never buffered.
    assert codes(feed(codec, b"A" * 5000)) == [501]
    assert codes(feed(codec, b"B" * 5000)) == []
    assert codes(feed(codec, b"B" * 5000 + b"\r\nMODE READER\r\n")) == [200]


def test_authinfo_flow() -> None:
    codec = make_codec(auth_available=True, auth_required=True)
    assert codes(feed(codec, b"POST\r\nIHAVE <a@b>\r\nCHECK <a@b>\r\nMODE STREAM\r\n")) == [
        480,
        480,
        480,
        480,
    ]
    assert codes(feed(codec, b"AUTHINFO PASS x\r\n")) == [482]
    assert codes(feed(codec, b"AUTHINFO SASL PLAIN\r\nAUTHINFO\r\n")) == [503, 501]
    events = feed(codec, b"AUTHINFO USER fred\r\nAUTHINFO PASS two words\r\nDATE\r\n")
    assert codes(events) == [381]
    assert events[-1] == AuthRequest("fred", "two words")
    codec.answer(Response(481, "no"))
    assert codes(drain(codec)) == [481, 111]
    assert not codec.authenticated
    feed(codec, b"AUTHINFO USER fred\r\nAUTHINFO PASS secret\r\n")
    codec.answer(Response(281, "ok"))
    assert codes(drain(codec)) == [281]
    assert codec.user == "fred"
    assert codes(feed(codec, b"AUTHINFO USER x\r\nMODE STREAM\r\n")) == [502, 203]


def test_authinfo_when_no_users_exist() -> None:
    assert codes(feed(make_codec(), b"AUTHINFO USER fred\r\n")) == [502]
    with pytest.raises(ValueError, match="auth_required"):
        make_codec(auth_required=True)


def test_takethis_without_auth_still_reads_the_article() -> None:
    codec = make_codec(auth_available=True, auth_required=True)
    events = feed(codec, b"TAKETHIS <a1@example.org>\r\n" + encode_block(article()) + b"DATE\r\n")
    assert codes(events) == [480, 111]


def test_post_not_permitted() -> None:
    codec = make_codec(posting=False)
    assert codes(feed(codec, b"POST\r\n")) == [440]
    assert codes(feed(codec, b"POST extra\r\n")) == [501]


def test_post_flow() -> None:
    codec = make_codec()
    events = feed(codec, b"POST\r\n" + encode_block(article()) + b"DATE\r\n")
    assert codes(events) == [340]
    assert events[-1] == ArticleReceived("POST", "", article())
    assert codec.busy
    codec.answer(Response(240, "ok"))
    assert codes(drain(codec)) == [240, 111]


def test_ihave_flow() -> None:
    codec = make_codec()
    events = feed(codec, b"IHAVE <a1@example.org>\r\n")
    assert events == [OfferRequest("IHAVE", "<a1@example.org>")]
    codec.answer(Response(435, "dup"))
    assert codes(drain(codec)) == [435]
    feed(codec, b"IHAVE <a1@example.org>\r\n")
    codec.answer(Response(335, "send"))
    assert codes(drain(codec)) == [335]
    events = feed(codec, encode_block(article()))
    assert events == [ArticleReceived("IHAVE", "<a1@example.org>", article())]
    codec.answer(Response(235, "ok"))
    assert codes(drain(codec)) == [235]


def test_streaming_is_answered_in_order() -> None:
    codec = make_codec()
    stream = b"MODE STREAM\r\nCHECK <c1@x>\r\n"
    for n in range(3):
        stream += f"TAKETHIS <t{n}@x>\r\n".encode() + encode_block(article(f"<t{n}@x>"))
    stream += b"CHECK <c2@x>\r\n"
    events = feed(codec, stream)
    assert codes(events) == [203]
    assert events[-1] == OfferRequest("CHECK", "<c1@x>")
    answers: list[int] = []
    seen: list[object] = []
    for code in (238, 239, 439, 239, 438):
        codec.answer(Response(code, "x"))
        events = drain(codec)
        answers += codes(events)
        seen += [e for e in events if not isinstance(e, SendResponse)]
    assert answers == [238, 239, 439, 239, 438]
    assert [getattr(e, "message_id", None) for e in seen] == [
        "<t0@x>",
        "<t1@x>",
        "<t2@x>",
        "<c2@x>",
    ]


def test_takethis_with_bad_message_id_reads_the_article() -> None:
    codec = make_codec()
    events = feed(codec, b"TAKETHIS bad-id\r\n" + encode_block(article()) + b"DATE\r\n")
    assert codes(events) == [439, 111]
    first = events[0]
    assert isinstance(first, SendResponse) and first.response.text.startswith("bad-id ")
    assert codes(feed(codec, b"TAKETHIS\r\n")) == [501]


@pytest.mark.parametrize(("command", "code"), [("POST", 441), ("IHAVE", 437), ("TAKETHIS", 439)])
def test_article_over_max_size(command: str, code: int) -> None:
    codec = make_codec(max_size=100)
    big = article() + b"x" * 200 + b"\n"
    line = b"POST\r\n" if command == "POST" else f"{command} <a1@example.org>\r\n".encode()
    events = feed(codec, line)
    if command == "IHAVE":
        codec.answer(Response(335, "send"))
        events = drain(codec)
    events += feed(codec, encode_block(big) + b"DATE\r\n")
    assert codes(events)[-2:] == [code, 111]
    assert not any(isinstance(e, ArticleReceived) for e in events)
    if command == "TAKETHIS":
        refusal = [e for e in events if isinstance(e, SendResponse)][-2]
        assert refusal.response.text.startswith("<a1@example.org> ")


def test_a_400_answer_closes() -> None:
    codec = make_codec()
    feed(codec, b"TAKETHIS <a1@example.org>\r\n" + encode_block(article()) + b"DATE\r\n")
    codec.answer(Response(400, "spool full"))
    events = drain(codec)
    assert codes(events) == [400]
    assert isinstance(events[0], SendResponse) and events[0].close
    assert codec.closed


def test_answer_without_request_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        make_codec().answer(Response(240))


# --------------------------------------------------------------------------- the shell


class Handler:
    """An NntpHandler whose answers each test sets; it records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.connect: Callable[[NntpSession], Response | None] = lambda session: None
        self.offer: Callable[[str, str], Any] = lambda cmd, mid: Response(
            335 if cmd == "IHAVE" else 238, mid
        )
        self.article: Callable[[str, str, bytes], Awaitable[Response]] = self._accept

    @staticmethod
    async def _accept(command: str, message_id: str, data: bytes) -> Response:
        code = {"POST": 240, "IHAVE": 235, "TAKETHIS": 239}[command]
        return Response(code, message_id)

    def on_connect(self, session: NntpSession) -> Response | None:
        self.calls.append(("connect", session))
        return self.connect(session)

    def on_auth(self, session: NntpSession, user: str, password: str) -> Response:
        self.calls.append(("auth", user, password))
        return Response(281 if password == "pw" else 481, "")

    def on_offer(self, session: NntpSession, command: str, message_id: str) -> Any:
        self.calls.append(("offer", command, message_id))
        return self.offer(command, message_id)

    def on_article(
        self, session: NntpSession, command: str, message_id: str, data: bytes
    ) -> Awaitable[Response]:
        self.calls.append(("article", command, message_id, data, session))
        return self.article(command, message_id, data)


class Conn:
    def __init__(self, handler: Handler | None = None, **kw: Any) -> None:
        self.handler = handler or Handler()
        self.clock = MemoryReactorClock()
        kw.setdefault("hostname", "gw.test")
        kw.setdefault("max_size", 1 << 20)
        kw.setdefault("idle_timeout", 60)
        self.factory = NntpServerFactory(self.handler, reactor=self.clock, **kw)
        self.protocol: NntpServerProtocol = self.factory.buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lines(self) -> list[bytes]:
        out = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return [line for line in out if line]

    def codes(self) -> list[int]:
        return [int(line[:3]) for line in self.lines() if line[:3].isdigit()]


@pytest.fixture
def quiet_log() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_shell_greets_and_refuses() -> None:
    conn = Conn()
    assert conn.codes() == [200]
    handler = Handler()
    handler.connect = lambda session: Response(502, f"Access denied for {session.peer_host}")
    refused = Conn(handler)
    assert refused.lines() == [b"502 Access denied for 192.0.2.7"]
    assert refused.transport.disconnecting


def test_shell_idle_timeout() -> None:
    conn = Conn(idle_timeout=30)
    conn.lines()
    conn.clock.advance(20)
    conn.send(b"DATE\r\n")
    conn.clock.advance(20)
    assert not conn.transport.disconnecting
    conn.clock.advance(11)
    assert conn.codes() == [111, 400]
    assert conn.transport.disconnecting


def test_shell_pipelined_takethis_answered_in_order_with_slow_handler() -> None:
    handler = Handler()
    pending: list[Deferred[Response]] = []

    def slow(command: str, message_id: str, data: bytes) -> Awaitable[Response]:
        d: Deferred[Response] = Deferred()
        pending.append(d)
        return d

    handler.article = slow
    conn = Conn(handler)
    conn.lines()
    stream = b"".join(
        f"TAKETHIS <t{n}@x>\r\n".encode() + encode_block(article(f"<t{n}@x>")) for n in range(3)
    )
    conn.send(stream + b"QUIT\r\n")
    assert conn.lines() == []
    assert conn.transport.producerState == "paused"
    assert len(pending) == 1
    conn.clock.advance(3600)  # a slow spool is not an idle client
    assert not conn.transport.disconnecting
    for n in range(3):
        pending[n].callback(Response(239, f"<t{n}@x>"))
    assert conn.lines() == [b"239 <t0@x>", b"239 <t1@x>", b"239 <t2@x>", b"205 Bye"]
    assert conn.transport.disconnecting


def test_shell_handler_failures_answer_try_later(quiet_log: Any) -> None:
    handler = Handler()

    async def broken(command: str, message_id: str, data: bytes) -> Response:
        raise RuntimeError("spool exploded")

    handler.article = broken
    handler.offer = lambda cmd, mid: 1 / 0
    conn = Conn(handler)
    conn.lines()
    conn.send(b"CHECK <a@b>\r\nIHAVE <a@b>\r\nPOST\r\n" + encode_block(article()))
    assert conn.codes() == [431, 436, 340, 441]
    conn.send(b"TAKETHIS <a1@example.org>\r\n" + encode_block(article()) + b"DATE\r\n")
    assert conn.codes() == [400]
    assert conn.transport.disconnecting
    assert any("spool exploded" in str(e.get("log_failure", "")) for e in quiet_log)


def test_shell_auth_and_session_user() -> None:
    conn = Conn(auth_available=True, auth_required=True)
    conn.lines()
    conn.send(b"POST\r\nAUTHINFO USER fred\r\nAUTHINFO PASS nope\r\n")
    assert conn.codes() == [480, 381, 481]
    conn.send(b"AUTHINFO USER fred\r\nAUTHINFO PASS pw\r\nPOST\r\n" + encode_block(article()))
    assert conn.codes() == [381, 281, 340, 240]
    session = conn.handler.calls[-1][-1]
    assert session.user == "fred" and session.peer_host == "192.0.2.7"


def test_shell_ignores_answers_after_the_client_left() -> None:
    handler = Handler()
    pending: list[Deferred[Response]] = []
    handler.article = lambda c, m, d: pending.append(Deferred()) or pending[-1]
    conn = Conn(handler)
    conn.lines()
    conn.send(b"POST\r\n" + encode_block(article()))
    conn.protocol.connectionLost()
    pending[0].callback(Response(240, "late"))
    assert conn.codes() == [340]


# --------------------------------------------------------------------------- the listener


def clock() -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.advance(1_764_072_000)
    return reactor


def listener_config(**kw: Any) -> NntpListenerConfig:
    kw.setdefault("name", "news-in")
    kw.setdefault("listen", ())
    kw.setdefault("hostname", "gw.test")
    return NntpListenerConfig(**kw)


def make_listener(gateway: FakePort | None = None, **kw: Any) -> tuple[NntpListener, FakePort]:
    gw = gateway or FakePort(reactor=clock())
    return NntpListener(listener_config(**kw), gw, gw.reactor), gw


SESSION = NntpSession("192.0.2.7", 40000, None, False)


def run(coro: Awaitable[Response]) -> Response:
    result: list[Response] = []
    ensureDeferred(coro).addBoth(result.append)  # type: ignore[arg-type]
    assert result, "the handler did not finish"
    assert isinstance(result[0], Response), result[0]
    return result[0]


def test_listener_relays_ihave_and_records_duplicates() -> None:
    listener, gw = make_listener()
    assert listener.on_offer(SESSION, "IHAVE", "<a1@example.org>").code == 335
    answer = run(listener.on_article(SESSION, "IHAVE", "<a1@example.org>", article()))
    assert answer.code == 235
    [submitted] = gw.submitted
    assert isinstance(submitted, Article)
    assert submitted.listener == "news-in" and submitted.client == "192.0.2.7"
    assert submitted.headers.get("Path") == "gw.test!peer.example!not-for-mail"
    assert submitted.body == b"body line\n.starts with a dot\n"
    assert listener.on_offer(SESSION, "IHAVE", "<a1@example.org>").code == 435
    check = listener.on_offer(SESSION, "CHECK", "<a1@example.org>")
    assert check.code == 438 and check.text.startswith("<a1@example.org> ")
    again = run(listener.on_article(SESSION, "TAKETHIS", "<a1@example.org>", article()))
    assert again.code == 439 and again.text.startswith("<a1@example.org> ")
    assert len(gw.submitted) == 1


@pytest.mark.parametrize(
    ("status", "command", "code"),
    [
        (Status.TEMPORARY, "IHAVE", 436),
        (Status.PERMANENT, "IHAVE", 437),
        (Status.TEMPORARY, "TAKETHIS", 400),
        (Status.PERMANENT, "TAKETHIS", 439),
        (Status.TEMPORARY, "POST", 441),
        (Status.PERMANENT, "POST", 441),
    ],
)
def test_listener_verdicts(status: Status, command: str, code: int) -> None:
    listener, gw = make_listener()
    gw.verdict = Verdict(status, Reason.NO_ROUTE, "no route for local.test")
    mid = "" if command == "POST" else "<a1@example.org>"
    answer = run(listener.on_article(SESSION, command, mid, article()))
    assert answer.code == code
    assert "no route for local.test" in answer.text
    # Not accepted, so not remembered: the peer may offer it again.
    assert listener.on_offer(SESSION, "CHECK", "<a1@example.org>").code == 238


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (article("<other@example.org>"), "does not match"),
        (article(**{"Message-ID": ""}), "no Message-ID"),
        (article(Newsgroups=""), "no Newsgroups"),
        (article(Newsgroups="bad group!"), "Bad Newsgroups"),
        (article(Path=""), "no Path"),
        (article(Path="x!gw.test!y"), "Loop"),
    ],
)
def test_listener_refuses_bad_relayed_articles(data: bytes, reason: str) -> None:
    listener, gw = make_listener()
    answer = run(listener.on_article(SESSION, "IHAVE", "<a1@example.org>", data))
    assert answer.code == 437 and reason in answer.text
    assert gw.submitted == []


def test_listener_post_injects() -> None:
    listener, gw = make_listener()
    data = article(**{"Message-ID": "", "Date": "", "Path": ""})
    answer = run(listener.on_article(dataclasses.replace(SESSION, user="fred"), "POST", "", data))
    assert answer.code == 240
    [posted] = gw.submitted
    assert isinstance(posted, Article)
    headers = posted.headers
    mid = headers.get("Message-ID")
    assert mid is not None and mid.endswith("@gw.test>") and mid in answer.text
    assert headers.fields[0][0] == "Path"
    assert headers.get("Path") == "gw.test!.POSTED.192.0.2.7!not-for-mail"
    assert email.utils.parsedate_to_datetime(headers.get("Date") or "").year == 2025
    assert headers.get("Injection-Date") == headers.get("Date")
    assert headers.get("Injection-Info") == (
        'gw.test; posting-host="192.0.2.7"; posting-account="fred"'
    )


def test_listener_post_keeps_a_good_message_id_and_path() -> None:
    listener, gw = make_listener()
    answer = run(listener.on_article(SESSION, "POST", "", article()))
    assert answer.code == 240
    posted = gw.submitted[0]
    assert isinstance(posted, Article)
    assert posted.message_id == "<a1@example.org>"
    assert posted.headers.get("Path") == "gw.test!.POSTED.192.0.2.7!peer.example!not-for-mail"
    assert posted.headers.get("Date") == "Wed, 25 Nov 2026 12:00:00 +0000"
    dup = run(listener.on_article(SESSION, "POST", "", article()))
    assert dup.code == 441 and "Duplicate" in dup.text


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (article() + b"", ""),
        (b"Injection-Info: other.example\n" + article(), "injected already"),
        (b"Injection-Date: Wed, 25 Nov 2026 12:00:00 +0000\n" + article(), "injected already"),
        (article("<no-at-sign>"), "Bad Message-ID"),
        (article(From=""), "no From"),
        (article(Subject=""), "no Subject"),
    ],
)
def test_listener_post_refusals(data: bytes, reason: str) -> None:
    listener, gw = make_listener()
    answer = run(listener.on_article(SESSION, "POST", "", data))
    if not reason:
        assert answer.code == 240
        return
    assert answer.code == 441 and reason in answer.text
    assert gw.submitted == []


def test_listener_same_article_on_two_connections_goes_in_once() -> None:
    listener, gw = make_listener()
    gw.hold = Deferred()
    first: list[Response] = []
    second: list[Response] = []
    ensureDeferred(
        listener.on_article(SESSION, "TAKETHIS", "<a1@example.org>", article())
    ).addCallback(first.append)
    assert listener.on_offer(SESSION, "CHECK", "<a1@example.org>").code == 431
    assert listener.on_offer(SESSION, "IHAVE", "<a1@example.org>").code == 436
    ensureDeferred(
        listener.on_article(SESSION, "IHAVE", "<a1@example.org>", article())
    ).addCallback(second.append)
    assert first == [] and second == []
    gw.hold.callback(None)
    assert [r.code for r in first] == [239]
    assert [r.code for r in second] == [437]
    assert len(gw.submitted) == 1


def test_listener_second_copy_goes_in_when_the_first_failed() -> None:
    listener, gw = make_listener()
    gw.hold = Deferred()
    gw.verdict = Verdict(Status.TEMPORARY, Reason.UNAVAILABLE, "spool full")
    first: list[Response] = []
    second: list[Response] = []
    ensureDeferred(
        listener.on_article(SESSION, "TAKETHIS", "<a1@example.org>", article())
    ).addCallback(first.append)
    ensureDeferred(
        listener.on_article(SESSION, "TAKETHIS", "<a1@example.org>", article())
    ).addCallback(second.append)
    hold, gw.hold = gw.hold, None
    gw.verdict = Verdict(Status.DELIVERED, Reason.NONE, "queued")
    hold.callback(None)
    assert [r.code for r in first] == [400]
    assert [r.code for r in second] == [239]
    assert len(gw.submitted) == 2


def greeting(listener: NntpListener, host: str) -> list[bytes]:
    """What a client from ``host`` reads on connecting to the listener's factory."""
    peer = IPv4Address("TCP", host, 40000)
    protocol = listener.factory().buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return transport.value().split(b"\r\n")[:-1]


def test_listener_connect_and_shutdown() -> None:
    listener, gw = make_listener(allow=(Network.parse("10.0.0.0/8"),))
    [refusal] = greeting(listener, "192.0.2.7")
    assert refusal.startswith(b"502 ")
    assert greeting(listener, "10.1.2.3")[0][:3] in (b"200", b"201")
    assert listener.on_connect(NntpSession("10.1.2.3", 1, None, False)) is None
    assert listener.guard.refused[Admission.NOT_ALLOWED] == 1
    gw.stopping = True
    refusal = listener.on_connect(NntpSession("10.1.2.3", 1, None, False))
    assert refusal is not None and refusal.code == 400
    assert listener.on_offer(SESSION, "IHAVE", "<x@y>").code == 436
    assert listener.on_offer(SESSION, "CHECK", "<x@y>").code == 431


def test_listener_refuses_connections_over_max_connections() -> None:
    listener, _ = make_listener(max_connections=2)
    assert greeting(listener, "10.1.2.3")[0][:3] in (b"200", b"201")
    assert greeting(listener, "10.1.2.4")[0][:3] in (b"200", b"201")
    [refusal] = greeting(listener, "10.1.2.5")
    assert refusal.startswith(b"400 ")
    assert listener.guard.refused[Admission.TOO_MANY] == 1
    assert len(listener.guard.connections) == 3  # until the refused one is closed


def login(listener: NntpListener, user: str, password: str, host: str = "192.0.2.7") -> int:
    """The code AUTHINFO gets (a failure is answered FAILURE_DELAY later)."""
    result: list[Response] = []
    ensureDeferred(listener.on_auth(NntpSession(host, 4000, None, False), user, password)).addBoth(
        result.append  # type: ignore[arg-type]
    )
    listener.reactor.advance(FAILURE_DELAY)
    assert result and isinstance(result[0], Response), result
    return result[0].code


def test_listener_auth(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(
        f"# news peers\nfeeder:{hashed('s3cret:with colon')}\n\nreader:{hashed('pw')}\n"
    )
    listener, _gw = make_listener(users={"admin": hashed("adminpw")}, users_file=str(users))
    assert login(listener, "feeder", "s3cret:with colon") == 281
    assert login(listener, "reader", "pw") == 281
    assert login(listener, "admin", "adminpw") == 281
    assert login(listener, "reader", "wrong") == 481
    assert login(listener, "nobody", "pw") == 481
    assert listener.guard.auth_failures == 2


def test_failed_logins_are_limited_per_client(tmp_path: Path) -> None:
    listener, _gw = make_listener(
        users={"reader": hashed("pw")},
        limits=NntpLimits(auth_failure_rate=Rate.parse("2/h")),
    )
    assert login(listener, "reader", "guess1") == 481
    assert login(listener, "reader", "guess2") == 481
    # Past the rate even the right password is not tried: 400, and the client goes.
    assert login(listener, "reader", "pw") == 400
    assert login(listener, "reader", "pw", host="192.0.2.8") == 281


def test_users_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "users"
    bad.write_text(f"ok:{hashed('pw')}\nno password here\n")
    with pytest.raises(UsersError, match=r"users:2: expected 'name:hash'"):
        read_users_file(bad)
    bad.write_text(f"ok:{hashed('pw')}\nclear:text\n")
    with pytest.raises(UsersError, match=r"users:2: the password of 'clear' is not an Argon2"):
        read_users_file(bad)
    with pytest.raises(ValueError, match="cannot read the users file"):
        read_users_file(tmp_path / "missing")
    with pytest.raises(ValueError, match="require_auth needs 'users' or 'users_file'"):
        make_listener(require_auth=True)


def test_recent_ids_are_bounded() -> None:
    recent = RecentIds(3)
    for n in range(5):
        recent.add(f"<{n}@x>")
    assert len(recent) == 3
    assert "<0@x>" not in recent and "<4@x>" in recent
    recent.resize(1)
    assert len(recent) == 1 and "<4@x>" in recent


def test_config_parses_an_nntp_listener(tmp_path: Path) -> None:
    config = parse(
        """
version: 1
listeners:
  news-in:
    protocol: nntp
    listen: tcp:1119:interface=127.0.0.1
    hostname: gw.test
    max_size: 1MiB
    posting: false
    users: {feeder: '$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo'}
    require_auth: true
    idle_timeout: 2m
destinations:
  box: {protocol: maildir, path: news}
routes:
  - {from: news-in, to: box, match: {header: {Newsgroups: 'local\\.'}}}
""",
        base=tmp_path,
    )
    listener = config.listeners["news-in"]
    assert isinstance(listener, NntpListenerConfig)
    assert listener.max_size == 1024 * 1024 and listener.idle_timeout == 120
    assert listener.users == {
        "feeder": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
    }
    assert listener.require_auth and not listener.posting
    with pytest.raises(ConfigError, match="the password of user 'feeder' is not an Argon2 hash"):
        parse(
            "version: 1\nlisteners:\n  n: {protocol: nntp, listen: 'tcp:1', users: {feeder: pw}}\n"
            "destinations: {}\nroutes: []\n",
            base=tmp_path,
        )
    with pytest.raises(ConfigError, match="unknown key 'user'"):
        parse(
            "version: 1\nlisteners:\n  n: {protocol: nntp, listen: 'tcp:1', user: x}\n"
            "destinations: {}\nroutes: []\n",
            base=tmp_path,
        )


def test_the_factory_follows_the_config() -> None:
    listener, _ = make_listener(
        users={"a": hashed("b")}, require_auth=True, posting=False, max_size=5000
    )
    factory = listener.factory()
    assert factory.auth_available and factory.auth_required and not factory.posting
    assert factory.max_size == 5000
    listener.reconfigure(listener_config(posting=True))
    assert not factory.auth_available and not factory.auth_required and factory.posting


def test_users_file_edits_apply_at_the_next_login(tmp_path: Path, quiet_log: Any) -> None:
    users = tmp_path / "users"
    users.write_text("")
    listener, _ = make_listener(users_file=str(users), require_auth=True)
    factory = listener.factory()
    assert factory.auth_available and factory.auth_required
    assert login(listener, "feeder", "pw") == 481
    users.write_text(f"feeder:{hashed('pw')}\n")
    assert login(listener, "feeder", "pw") == 281
    # A broken edit is reported and the users known before stay in force.
    users.write_text(f"feeder:{hashed('pw')}\nbroken line\n")
    assert login(listener, "feeder", "pw") == 281
    assert any("users:2" in str(e.get("error", "")) for e in quiet_log)


def test_config_refuses_require_auth_without_users(tmp_path: Path) -> None:
    text = (
        "version: 1\nlisteners:\n  n: {protocol: nntp, listen: 'tcp:1', require_auth: true}\n"
        "destinations: {}\nroutes: []\n"
    )
    with pytest.raises(ConfigError, match="require_auth needs 'users' or 'users_file'"):
        parse(text, base=tmp_path)


_SESSION_STREAM = (
    b"CAPABILITIES\r\nMODE STREAM\r\nCHECK <c@x>\r\n"
    + b"TAKETHIS <t@x>\r\n"
    + encode_block(b".dot\n\n\xff\n")
    + b"IHAVE <i@x>\r\n"
    + encode_block(b"ihave body\n")
    + b"BOGUS\r\n"
    + b"X" * 700
    + b"\r\nPOST\r\n"
    + encode_block(b"posted\n")
    + b"QUIT\r\n"
)


def _run_session(pieces: list[bytes]) -> list[object]:
    codec = make_codec()
    out: list[object] = []
    for piece in pieces:
        codec.receive_data(piece)
        while (event := codec.next_event()) is not None:
            out.append(event)
            if isinstance(event, OfferRequest):
                codec.answer(Response(335 if event.command == "IHAVE" else 238, event.message_id))
            elif isinstance(event, ArticleReceived):
                codec.answer(Response(239, event.message_id))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(_SESSION_STREAM)), max_size=12))
def test_server_codec_any_split_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    ends = [*points, len(_SESSION_STREAM)]
    pieces = [_SESSION_STREAM[a:b] for a, b in zip([0, *points], ends, strict=True)]
    assert _run_session(pieces) == _run_session([_SESSION_STREAM])


def test_server_codec_session_events() -> None:
    events = _run_session([_SESSION_STREAM])
    received = [e for e in events if isinstance(e, ArticleReceived)]
    assert received == [
        ArticleReceived("TAKETHIS", "<t@x>", b".dot\n\n\xff\n"),
        ArticleReceived("IHAVE", "<i@x>", b"ihave body\n"),
        ArticleReceived("POST", "", b"posted\n"),
    ]
    assert codes(events) == [101, 203, 238, 239, 335, 239, 500, 501, 340, 239, 205]  # type: ignore[arg-type]


def test_codec_imports_without_twisted() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gateway.protocols.nntp, gateway.protocols.nntp.codec;"
        "assert not any(m.startswith('twisted') for m in sys.modules), 'twisted was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_server_stops_answering_and_reading_while_the_client_reads_no_replies() -> None:
    """Defect: the server answered every pipelined command at once, whatever the
    client read, so its write buffer grew without bound."""
    conn = Conn()
    transport = SmallBufferTransport(PEER)
    conn.transport = transport
    conn.protocol = conn.factory.buildProtocol(PEER)
    conn.protocol.makeConnection(transport)
    assert transport.producer is conn.protocol and transport.streaming
    transport.drain()
    conn.send(b"DATE\r\n" * 100)  # a little is read on (a TLS handshake needs that)
    assert len(transport.value()) < 2000
    assert transport.producerState == "producing"
    conn.send(b"DATE\r\n" * 19_900)
    assert len(transport.value()) < 2000
    assert transport.producerState == "paused"  # much more: no more reading either
    answered = 0
    for _ in range(5000):
        answered += transport.drain().count(b"111 ")
        if answered == 20_000:
            break
    assert answered == 20_000
    assert transport.producerState == "producing"


def test_idle_timeout_aborts_a_client_that_reads_nothing() -> None:
    conn = Conn(idle_timeout=30)
    transport = SmallBufferTransport(PEER)
    conn.transport = transport
    conn.protocol = conn.factory.buildProtocol(PEER)
    conn.protocol.makeConnection(transport)
    conn.send(b"HELP\r\n" * 100)
    assert transport.full
    conn.clock.advance(31)
    # loseConnection would wait for a write buffer that never drains.
    assert transport.disconnecting and transport.disconnected


@pytest.mark.parametrize(("command", "code"), [("POST", 441), ("IHAVE", 437), ("TAKETHIS", 439)])
@pytest.mark.parametrize("name", ["Message-ID", "Subject", "Newsgroups", "From", "Date"])
def test_listener_refuses_a_header_field_that_appears_twice(
    command: str, code: int, name: str
) -> None:
    """Defect: two Message-ID (or Subject, ...) fields were accepted; INN answers
    "441 Duplicate Subject header field", and which Message-ID counts was unclear."""
    listener, gw = make_listener()
    data = article("<d1@example.org>")
    value = "<d2@example.org>" if name == "Message-ID" else "second"
    data = data.replace(b"\n\n", f"\n{name}: {value}\n\n".encode(), 1)
    msgid = "" if command == "POST" else "<d1@example.org>"
    response = run(listener.on_article(SESSION, command, msgid, data))
    assert response.code == code
    assert f"Duplicate {name}" in response.text
    assert gw.submitted == []


@pytest.mark.parametrize(("command", "code"), [("IHAVE", 437), ("TAKETHIS", 439)])
def test_listener_refuses_a_relayed_message_id_without_left_and_right_parts(
    command: str, code: int
) -> None:
    """Defect: a relayed article whose Message-ID is not <left@right> (RFC 5536 3.1.3)
    was acknowledged, and the news server it went to refused it later."""
    listener, gw = make_listener()
    response = run(listener.on_article(SESSION, command, "<nodomain>", article("<nodomain>")))
    assert response.code == code and "Message-ID" in response.text
    assert gw.submitted == []


def test_listener_does_not_want_offers_of_malformed_message_ids() -> None:
    listener, _ = make_listener()
    assert listener.on_offer(SESSION, "IHAVE", "<nodomain>").code == 435
    check = listener.on_offer(SESSION, "CHECK", "<nodomain>")
    assert check.code == 438 and check.text.startswith("<nodomain> ")
    assert listener.on_offer(SESSION, "CHECK", "<a@b>").code == 238


def test_quit_after_a_pipelined_batch_keeps_every_reply_for_a_slow_reader() -> None:
    conn = Conn()
    transport = SmallBufferTransport(PEER)
    conn.transport = transport
    conn.protocol = conn.factory.buildProtocol(PEER)
    conn.protocol.makeConnection(transport)
    conn.send(b"DATE\r\n" * 500 + b"QUIT\r\n")
    received = b""
    for _ in range(1000):
        received += transport.drain()
        if transport.disconnecting:
            received += transport.drain()
            break
    assert received.count(b"111 ") == 500 and received.endswith(b"205 Bye\r\n")
    assert not transport.disconnected  # closed gently, the replies written first


def test_listener_quotes_the_posting_account_in_injection_info() -> None:
    """Defect: a user name with a quote or backslash broke the Injection-Info
    quoted-string (RFC 5536 3.2.8)."""
    listener, gw = make_listener()
    session = dataclasses.replace(SESSION, user='we"ird\\one')
    data = article("<q1@example.org>", Path="")
    assert run(listener.on_article(session, "POST", "", data)).code == 240
    info = gw.submitted[0].headers.get("Injection-Info")  # type: ignore[attr-defined]
    assert info.endswith('; posting-account="we\\"ird\\\\one"')


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyOpenSSL objects inside Twisted
def test_quit_over_tls_closes_the_connection(tmp_path: Path) -> None:
    """Defect (of the producer registration above, caught before it shipped): a
    TLS transport shuts down only once its producer is unregistered, so QUIT
    left the connection open."""
    cert, key = make_tls_cert(tmp_path)
    server_options = ssl.PrivateCertificate.loadPEM(cert.read_text() + key.read_text()).options()
    client_options = ssl.optionsForClientTLS(
        "localhost", trustRoot=ssl.Certificate.loadPEM(cert.read_text())
    )
    clock = MemoryReactorClock()
    factory = NntpServerFactory(Handler(), reactor=clock, hostname="gw.test", max_size=1 << 20)
    server = TLSMemoryBIOFactory(server_options, False, factory, clock).buildProtocol(PEER)

    class Client(Protocol):
        received = b""
        lost = False

        def dataReceived(self, data: bytes) -> None:
            self.received += data

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            self.lost = True

    client = Client()
    client_factory = TLSMemoryBIOFactory(
        client_options, True, Factory.forProtocol(lambda: client), clock
    )
    client_tls = client_factory.buildProtocol(None)
    pump = iosim.connect(
        server,
        iosim.makeFakeServer(server),
        client_tls,
        iosim.makeFakeClient(client_tls),
        greet=False,
        clock=clock,
    )
    for _ in range(20):
        pump.pump()
        clock.advance(0.01)
    assert client.received.startswith(b"200 ")
    client.transport.write(b"DATE\r\nQUIT\r\n")  # type: ignore[union-attr]
    for _ in range(50):
        pump.pump()
        clock.advance(0.01)
        if client.lost:
            break
    assert b"\r\n111 " in client.received and client.received.endswith(b"205 Bye\r\n")
    assert client.lost


def test_listener_says_436_inside_the_441_of_a_temporary_post_failure() -> None:
    """So that a gateway posting to this listener retries instead of giving up."""
    listener, gw = make_listener()
    gw.verdict = Verdict(Status.TEMPORARY, Reason.UNAVAILABLE, "spool full")
    response = run(listener.on_article(SESSION, "POST", "", article("<t1@example.org>")))
    assert response.code == 441 and response.text.startswith("436 ")
    assert outcome_for(Reply(response.code, response.text), "gw").status is Status.TEMPORARY


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"Subject: s\nNo colon here\n\nbody\n", 'No colon-space in "No colon here" header field'),
        (b"Subject: s\n: no name\n\nbody\n", 'No colon-space in ": no name" header field'),
        (b"Subject:s\n\nbody\n", 'No colon-space in "Subject:s" header field'),
        (b"Subject : s\n\nbody\n", 'Space before colon in "Subject" header field'),
        (b"Subject: a\x00b\n\nbody\n", "Nul character in header"),
        (b"Subject: s\n\nbo\x00dy\n", "Nul character in body"),
        (b"Subject: s\nFrom: a@b\n", "No body"),
        (b"Subject: s\n folded on\nX-Empty:\n\n", ""),
        (b"Subject:\ttab\n\n", ""),
    ],
)
def test_article_syntax_is_checked_as_innd_checks_it(data: bytes, problem: str) -> None:
    assert article_syntax_problem(data) == problem


def test_nntp_a_trickled_command_is_cut_at_the_idle_timeout_and_an_article_at_its_deadline() -> (
    None
):
    trickle = Conn(idle_timeout=5)
    trickle.lines()
    for byte in b"MODE READER":
        trickle.send(bytes([byte]))
        trickle.clock.advance(1)
    assert trickle.codes() == [400]
    assert trickle.transport.disconnecting
    slow = Conn(idle_timeout=5, transfer_timeout=30)
    slow.lines()
    slow.send(b"IHAVE <slow@example.org>\r\n")
    assert slow.codes() == [335]
    for _ in range(29):
        slow.send(b"x")
        slow.clock.advance(1)
    assert not slow.transport.disconnecting
    slow.clock.advance(1)
    assert slow.codes() == [400] and slow.transport.disconnecting
