"""Regression tests for defects found reviewing the NNTP codec, server, listener and client.

Each test names the defect it pins down; the peers are the in-memory ones of
test_nntp_client.py (a scripted news server) and test_nntp_server.py (a
StringTransport connection and a stand-in gateway).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from gateway.ports import Status, Verdict
from gateway.protocols.nntp.client import NntpSessionError, Reply, _NntpClientProtocol
from gateway.protocols.nntp.codec import (
    ArticleReceived,
    Response,
    SendResponse,
    ServerCodec,
    StreamReader,
    decode_block,
    encode_block,
    normalise_block,
    response_has_block,
)
from gateway.protocols.nntp.destination import outcome_for
from gateway.protocols.nntp.server import NntpServerFactory
from tests.peers import make_tls_cert
from tests.unit._flow import SmallBufferTransport
from tests.unit.test_nntp_client import (
    ARTICLE,
    MemoryEndpoint,
    Script,
    make_pool,
    result,
    run,
    start,
)
from tests.unit.test_nntp_server import (
    PEER,
    SESSION,
    Conn,
    article,
    make_listener,
)
from tests.unit.test_nntp_server import Handler as ServerHandler
from tests.unit.test_nntp_server import run as run_handler


def _outcome(d: Deferred[Any]) -> object:
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "the operation has not finished"
    return out[0]


# --------------------------------------------------------------------------- codec edge cases


@pytest.mark.parametrize(
    "content",
    [
        b".\n",  # a line that is exactly "."
        b"..\n",  # a line that is exactly ".."
        b"a\n.\nb\n",
        b"a\n..\n.\n",
        b"no final line feed",
        b"ends in a dot .",
        b".",  # a body that is one dot without LF
        b"cr\rinside\n",
        b"cr before lf\r\n",
        b"\r",
        b"\n\n.\n\n",
        b"",
    ],
)
def test_block_edge_cases_round_trip_in_any_split(content: bytes) -> None:
    wire = encode_block(content)
    assert decode_block(wire) == normalise_block(content)
    # One byte at a time, with the next command right behind the terminator.
    reader = StreamReader()
    block = None
    for byte in wire + b"QUIT\r\n":
        reader.receive_data(bytes([byte]))
        if block is None:
            block = reader.read_block()
    assert block is not None and block.data == normalise_block(content)
    assert reader.read_line() == b"QUIT"


def test_a_lone_dot_inside_a_takethis_article_ends_it_and_the_rest_is_answered() -> None:
    # The peer forgot to dot-stuff: the article ends at the lone ".", the lines
    # after it are read as commands and get 500; nothing raises, the session goes on.
    codec = ServerCodec(hostname="gw.test")
    codec.receive_data(b"TAKETHIS <x@y>\r\nSubject: s\r\n\r\nbody\r\n.\r\nmore: text\r\n.\r\n")
    events = []
    while (event := codec.next_event()) is not None:
        events.append(event)
    assert isinstance(events[0], ArticleReceived)
    assert events[0].data == b"Subject: s\n\nbody\n"
    codec.answer(Response(239, "<x@y>"))
    codes = []
    while (event := codec.next_event()) is not None:
        assert isinstance(event, SendResponse)
        codes.append(event.response.code)
    assert codes == [239, 500, 500]
    assert not codec.closed


def test_block_follows_only_for_commands_that_have_one() -> None:
    """RFC 3977 3.2: whether a block follows depends on the command, not on the code alone."""
    for keyword in ("POST", "IHAVE", "CHECK", "TAKETHIS", "DATE", "QUIT", "MODE", "AUTHINFO"):
        for code in (100, 101, 220, 224, 230, 282):
            assert not response_has_block(code, keyword), (code, keyword)
    assert response_has_block(220, "ARTICLE") and response_has_block(221, "HEAD")
    assert response_has_block(221, "XHDR") and response_has_block(224, "XOVER")
    assert response_has_block(211, "LISTGROUP") and not response_has_block(211, "GROUP")
    assert response_has_block(101, "CAPABILITIES") and response_has_block(100, "HELP")
    assert response_has_block(224)  # a command the table does not know: by the code


def test_client_does_not_wait_for_a_block_after_a_single_line_command(
    clock: MemoryReactorClock,
) -> None:
    # A confused server answers CHECK with a multi-line code: that is the reply
    # (not wanted, not an endless wait for a block that never comes).
    endpoint = MemoryEndpoint(clock, Script(replies={"CHECK": b"224 <one@example.test>\r\n"}))
    pool = make_pool(endpoint, mode="stream")
    d = start(pool.stream("<one@example.test>", ARTICLE))
    endpoint.pump()
    assert result(d).code == 224


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


# --------------------------------------------------------------------------- client


def test_stream_fallback_to_ihave_carries_one_article_at_a_time(clock: MemoryReactorClock) -> None:
    """Defect: with MODE STREAM refused, articles were pipelined as IHAVE on one session,
    so the server read the second IHAVE command line as part of the first article."""
    endpoint = MemoryEndpoint(clock, Script(stream=False))
    pool = make_pool(endpoint, mode="stream", max_connections=1)
    ids = [f"<f{i}@example.test>" for i in range(3)]
    arts = {i: ARTICLE.replace(b"<one@example.test>", i.encode()) for i in ids}
    ds = [start(pool.stream(i, arts[i])) for i in ids]
    endpoint.pump()
    assert [result(d).code for d in ds] == [235] * 3
    assert endpoint.store.received == [("IHAVE", i, arts[i]) for i in ids]
    assert endpoint.connects == 1


def test_a_reply_for_a_cancelled_operation_stays_inside_the_client(
    clock: MemoryReactorClock,
) -> None:
    """The reply to a cancelled pipelined CHECK must not reach its caller or raise
    into Twisted (a guard: Twisted ignores one result given to a cancelled Deferred)."""
    endpoint = MemoryEndpoint(clock)
    pool = make_pool(endpoint, mode="stream", max_connections=1)
    assert run(endpoint, pool.stream("<first@x>", ARTICLE)).code == 239
    endpoint.script.hold = True
    d1 = start(pool.stream("<c1@x>", ARTICLE))
    d2 = start(pool.stream("<c2@x>", ARTICLE))
    endpoint.pump()
    d1.cancel()
    _outcome(d1)
    endpoint.script.hold = False
    endpoint.release()  # raised AlreadyCalledError out of dataReceived
    outcome = _outcome(d2)
    if isinstance(outcome, Failure):
        assert outcome.check(NntpSessionError)
    else:
        assert outcome.code == 239  # type: ignore[attr-defined]
    # The pool goes on with a session it can trust.
    assert run(endpoint, pool.stream("<c3@x>", ARTICLE)).code == 239


def test_unsolicited_lines_from_the_server_are_not_kept_without_bound() -> None:
    protocol = _NntpClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"200 hello\r\n")
    protocol.dataReceived(b"400 go away\r\n" * 10_000)
    assert len(protocol._early) <= 2
    assert protocol.unsolicited
    assert transport.disconnecting


def test_a_block_that_never_ends_fails_the_reply_and_stays_bounded() -> None:
    """Defect: a server that never sent the terminating "." line made the client buffer
    without limit; a block over the limit came back as an empty (truncated) reply."""
    protocol = _NntpClientProtocol(max_block_size=10_000)
    transport = StringTransport()
    protocol.makeConnection(transport)
    waiter = protocol.expect("ARTICLE")
    protocol.dataReceived(b"220 1 <a@b>\r\n")
    for _ in range(100):
        protocol.dataReceived(b"x" * 999 + b"\r\n")
    failure = _outcome(waiter)
    assert isinstance(failure, Failure) and "10000" in str(failure.value)
    assert transport.disconnecting
    assert protocol._reader.buffered < 20_000


def test_a_line_that_never_ends_inside_a_block_stays_bounded() -> None:
    protocol = _NntpClientProtocol(max_block_size=10_000)
    transport = StringTransport()
    protocol.makeConnection(transport)
    waiter = protocol.expect("OVER")
    protocol.dataReceived(b"224 overview\r\n")
    for _ in range(100):
        protocol.dataReceived(b"y" * 1000)
    assert isinstance(_outcome(waiter), Failure)
    assert protocol._reader.buffered < 20_000


def test_the_default_reply_limit_is_generous() -> None:
    protocol = _NntpClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    waiter = protocol.expect("ARTICLE")
    body = b"z" * 998 + b"\n"
    protocol.dataReceived(b"220 1 <a@b>\r\n" + encode_block(body * 5000))
    assert _outcome(waiter).block == body * 5000  # type: ignore[attr-defined]


@pytest.mark.parametrize("key", ["CHECK", "TAKETHIS-DONE"])
def test_a_streaming_reply_for_another_message_id_breaks_the_session(
    clock: MemoryReactorClock, key: str
) -> None:
    """Defect: 239 or 238 for another article was taken as the answer for this one, so
    an out-of-step server could have an article counted as delivered that it never took."""
    code = b"238" if key == "CHECK" else b"239"
    endpoint = MemoryEndpoint(clock, Script(replies={key: code + b" <other@x>\r\n"}))
    pool = make_pool(endpoint, mode="stream")
    d = start(pool.stream("<one@example.test>", ARTICLE))
    endpoint.pump()
    with pytest.raises(NntpSessionError, match="<other@x>"):
        result(d)
    assert pool.open_connections == 0


def test_streaming_replies_without_a_message_id_are_still_accepted(
    clock: MemoryReactorClock,
) -> None:
    endpoint = MemoryEndpoint(clock, Script(replies={"TAKETHIS-DONE": b"239\r\n"}))
    pool = make_pool(endpoint, mode="stream")
    assert run(endpoint, pool.stream("<one@example.test>", ARTICLE)).code == 239


# --------------------------------------------------------------------------- server


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


# --------------------------------------------------------------------------- listener


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
    response = run_handler(listener.on_article(SESSION, command, msgid, data))
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
    response = run_handler(
        listener.on_article(SESSION, command, "<nodomain>", article("<nodomain>"))
    )
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
    assert run_handler(listener.on_article(session, "POST", "", data)).code == 240
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
    factory = NntpServerFactory(
        ServerHandler(), reactor=clock, hostname="gw.test", max_size=1 << 20
    )
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


# --------------------------------------------------------------------------- destination


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        # INN answers an article that became a duplicate while it was sent with
        # "437 Duplicate" (IHAVE) / "439 <id> Duplicate" (TAKETHIS): the server has it.
        (437, "Duplicate", Status.DELIVERED),
        (437, "Duplicate article", Status.DELIVERED),
        (439, "<a@b> Duplicate", Status.DELIVERED),
        (437, 'Unapproved for "local.mod"', Status.PERMANENT),
        (437, "Article already expired", Status.PERMANENT),
    ],
)
def test_destination_counts_a_duplicate_refusal_as_delivered(
    code: int, text: str, status: Status
) -> None:
    assert outcome_for(Reply(code, text), "news:119").status is status


def test_timeouts_of_pipelined_articles_leave_no_session_behind(clock: MemoryReactorClock) -> None:
    endpoint = MemoryEndpoint(clock, Script(silent={"CHECK"}))
    pool = make_pool(endpoint, mode="stream", max_connections=1, command_timeout=5.0)
    ds = [start(pool.stream(f"<t{i}@x>", ARTICLE)) for i in range(3)]
    endpoint.pump()
    clock.advance(5.0)
    endpoint.pump()
    for d in ds:
        with pytest.raises(NntpSessionError):
            result(d)
    assert pool.open_connections == 0
    endpoint.script.silent = set()
    assert run(endpoint, pool.stream("<t9@x>", ARTICLE)).code == 239
    assert pool.open_connections == 1


@pytest.mark.parametrize(
    ("text", "status"),
    [
        # INN's nnrpd answers POST with 441 and the code innd gave inside the text.
        ("436 Can't write history", Status.TEMPORARY),
        ("400 Throttled: disk full", Status.TEMPORARY),
        ("436 Try again later: spool full", Status.TEMPORARY),
        ("437 Unwanted distribution", Status.PERMANENT),
        ("Header line too long", Status.PERMANENT),
        ("435 Duplicate", Status.DELIVERED),
    ],
)
def test_destination_reads_the_code_inside_a_441(text: str, status: Status) -> None:
    """Defect: "441 436 ..." (a temporary failure behind the posting server) was
    taken as permanent, and the article went to the dead letters."""
    assert outcome_for(Reply(441, text), "news:119").status is status


def test_listener_says_436_inside_the_441_of_a_temporary_post_failure() -> None:
    """So that a gateway posting to this listener retries instead of giving up."""
    listener, gw = make_listener()
    gw.verdict = Verdict(Status.TEMPORARY, "spool full")
    response = run_handler(listener.on_article(SESSION, "POST", "", article("<t1@example.org>")))
    assert response.code == 441 and response.text.startswith("436 ")
    assert outcome_for(Reply(response.code, response.text), "gw").status is Status.TEMPORARY
