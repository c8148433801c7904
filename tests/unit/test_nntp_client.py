"""Tests for the NNTP client sessions and pool, in memory: iosim pumps to a scripted server.

The scripted server is ``tests.support.news_server``.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from gateway.protocols.nntp.client import (
    NntpClientPool,
    NntpSession,
    NntpSessionError,
    Reply,
    _NntpClientProtocol,
    open_session,
)
from gateway.protocols.nntp.codec import (
    encode_block,
)
from tests.support.deferreds import result, start
from tests.support.news_server import MemoryEndpoint, Script

T = TypeVar("T")


# ----------------------------------------------------------------------------- the fake server


def run(endpoint: MemoryEndpoint, coro: Coroutine[Any, Any, T]) -> T:
    d = start(coro)
    endpoint.pump()
    return result(d)


def make_pool(endpoint: MemoryEndpoint, **kw: Any) -> NntpClientPool:
    kw.setdefault("command_timeout", 10.0)
    return NntpClientPool(endpoint.clock, endpoint, destination="fake:119", **kw)


ARTICLE = (
    b"From: a@example.test\nNewsgroups: local.test\nSubject: hi\n"
    b"Message-ID: <one@example.test>\n\n.leading dot\n..two dots\n.\nend\n"
)


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def endpoint(clock: MemoryReactorClock) -> MemoryEndpoint:
    return MemoryEndpoint(clock)


# ----------------------------------------------------------------------------- posting


def test_post_sends_mode_reader_and_the_article_dot_stuffed(endpoint: MemoryEndpoint) -> None:
    pool = make_pool(endpoint, mode="post")
    reply = run(endpoint, pool.post(ARTICLE))
    assert reply == Reply(240, "Article received <one@example.test>")
    assert endpoint.commands == ["MODE READER", "POST"]
    # What the server un-stuffed is exactly what was sent.
    assert endpoint.store.received == [("POST", "", ARTICLE)]


def test_a_second_post_reuses_the_session(endpoint: MemoryEndpoint) -> None:
    pool = make_pool(endpoint, mode="post")
    run(endpoint, pool.post(ARTICLE))
    reply = run(endpoint, pool.post(ARTICLE))
    assert reply.code == 441 and "435" in reply.text
    assert endpoint.connects == 1
    assert endpoint.commands == ["MODE READER", "POST", "POST"]


def test_idle_session_is_closed_with_quit(endpoint: MemoryEndpoint) -> None:
    pool = make_pool(endpoint, mode="post", idle_timeout=5.0)
    run(endpoint, pool.post(ARTICLE))
    endpoint.clock.advance(5.0)
    endpoint.pump()
    assert endpoint.commands[-1] == "QUIT"
    assert pool.open_connections == 0


def test_greeting_201_still_tries_and_returns_440(clock: MemoryReactorClock) -> None:
    script = Script(
        greeting=b"201 no posting\r\n", replies={"POST": b"440 Posting not permitted\r\n"}
    )
    endpoint = MemoryEndpoint(clock, script)
    reply = run(endpoint, make_pool(endpoint).post(ARTICLE))
    assert reply.code == 440


@pytest.mark.parametrize(
    "greeting", [b"400 Service temporarily unavailable\r\n", b"502 go away\r\n"]
)
def test_refusing_greeting_is_a_session_error_and_backs_off(
    clock: MemoryReactorClock, greeting: bytes
) -> None:
    endpoint = MemoryEndpoint(clock, Script(greeting=greeting))
    pool = make_pool(endpoint, backoff_min=2.0, backoff_max=8.0)
    with pytest.raises(
        NntpSessionError,
        match=f"(refused the connection|closed the session): {greeting[:3].decode()}",
    ):
        run(endpoint, pool.post(ARTICLE))
    assert pool.open_connections == 0
    # Within the back-off no new connection is tried.
    with pytest.raises(NntpSessionError, match="not trying fake:119 again"):
        run(endpoint, pool.post(ARTICLE))
    assert endpoint.connects == 1
    clock.advance(2.0)
    with pytest.raises(NntpSessionError):
        run(endpoint, pool.post(ARTICLE))
    assert endpoint.connects == 2
    # The back-off doubled: 2 s later is still too early, 4 s is not.
    clock.advance(2.0)
    with pytest.raises(NntpSessionError, match="not trying"):
        run(endpoint, pool.post(ARTICLE))
    assert endpoint.connects == 2
    clock.advance(2.0)
    endpoint.script.greeting = b"200 ok\r\n"
    assert run(endpoint, pool.post(ARTICLE)).code == 240
    assert endpoint.connects == 3


def test_connection_refused_is_a_session_error(endpoint: MemoryEndpoint) -> None:
    endpoint.refuse = True
    pool = make_pool(endpoint)
    with pytest.raises(NntpSessionError, match="connection refused by fake:119"):
        run(endpoint, pool.post(ARTICLE))
    assert pool.open_connections == 0


def test_connection_lost_while_sending(endpoint: MemoryEndpoint) -> None:
    endpoint.script.drop = {"POST"}
    pool = make_pool(endpoint)
    with pytest.raises(NntpSessionError, match="lost while waiting for the reply to POST"):
        run(endpoint, pool.post(ARTICLE))
    assert pool.open_connections == 0
    endpoint.script.drop = set()
    assert run(endpoint, pool.post(ARTICLE)).code == 240  # a new session, no back-off


def test_reply_timeout_aborts_the_session(endpoint: MemoryEndpoint) -> None:
    endpoint.script.silent = {"POST"}
    pool = make_pool(endpoint, command_timeout=7.0)
    d = start(pool.post(ARTICLE))
    endpoint.pump()
    assert not d.called
    endpoint.clock.advance(7.0)
    endpoint.pump()
    with pytest.raises(NntpSessionError, match="timed out after 7s waiting for the reply to POST"):
        result(d)
    assert pool.open_connections == 0


def test_malformed_reply_is_a_session_error(endpoint: MemoryEndpoint) -> None:
    endpoint.script.replies = {"POST": b"hello there\r\n"}
    pool = make_pool(endpoint)
    with pytest.raises(NntpSessionError, match="malformed reply"):
        run(endpoint, pool.post(ARTICLE))


def test_unsolicited_400_on_an_idle_session_makes_the_next_use_reconnect(
    endpoint: MemoryEndpoint,
) -> None:
    pool = make_pool(endpoint)
    run(endpoint, pool.post(ARTICLE))
    endpoint.servers[0].transport.write(b"400 idle timeout\r\n")  # type: ignore[union-attr]
    endpoint.pump()
    other = ARTICLE.replace(b"<one@", b"<two@")
    assert run(endpoint, pool.post(other)).code == 240
    assert endpoint.connects == 2


# ----------------------------------------------------------------------------- AUTHINFO


def test_authinfo_after_mode_reader(clock: MemoryReactorClock) -> None:
    endpoint = MemoryEndpoint(clock, Script(user="gw", password="pass word"))
    pool = make_pool(endpoint, user="gw", password="pass word")
    assert run(endpoint, pool.post(ARTICLE)).code == 240
    assert endpoint.commands == [
        "MODE READER",
        "AUTHINFO USER gw",
        "AUTHINFO PASS pass word",
        "POST",
    ]


def test_authinfo_rejected(clock: MemoryReactorClock) -> None:
    endpoint = MemoryEndpoint(clock, Script(user="gw", password="right"))
    pool = make_pool(endpoint, user="gw", password="wrong")
    with pytest.raises(NntpSessionError, match="refused AUTHINFO for 'gw': 481"):
        run(endpoint, pool.post(ARTICLE))
    assert pool.open_connections == 0


@pytest.mark.parametrize(
    "answer", [b"482 out of sequence\r\n", b"502 not for you\r\n", b"281 welcome\r\n"]
)
def test_authinfo_user_answers(clock: MemoryReactorClock, answer: bytes) -> None:
    endpoint = MemoryEndpoint(clock, Script(replies={"AUTHINFO USER": answer}))
    pool = make_pool(endpoint, user="gw", password="x")
    d = start(pool.post(ARTICLE))
    endpoint.pump()
    if answer.startswith(b"281"):
        assert result(d).code == 240
        assert "AUTHINFO PASS x" not in endpoint.commands
    else:
        with pytest.raises(NntpSessionError, match=answer[:3].decode()):
            result(d)


def test_authentication_required_without_credentials_is_returned(clock: MemoryReactorClock) -> None:
    endpoint = MemoryEndpoint(clock, Script(user="gw"))
    reply = run(endpoint, make_pool(endpoint).post(ARTICLE))
    assert reply.code == 480


def test_password_with_line_break_is_refused_before_sending(clock: MemoryReactorClock) -> None:
    endpoint = MemoryEndpoint(clock, Script(user="gw"))
    pool = make_pool(endpoint, user="gw", password="a\r\nQUIT")
    with pytest.raises(NntpSessionError, match="line break"):
        run(endpoint, pool.post(ARTICLE))
    assert not any(c.startswith("AUTHINFO PASS") for c in endpoint.commands)


# ----------------------------------------------------------------------------- IHAVE and streaming


def test_ihave_sends_and_duplicate_is_refused_early(endpoint: MemoryEndpoint) -> None:
    pool = make_pool(endpoint, mode="ihave")
    assert run(endpoint, pool.ihave("<one@example.test>", ARTICLE)).code == 235
    assert run(endpoint, pool.ihave("<one@example.test>", ARTICLE)).code == 435
    assert [c for c, _, _ in endpoint.store.received] == ["IHAVE"]
    assert "MODE READER" not in endpoint.commands


def test_send_refuses_a_bad_message_id_for_ihave(endpoint: MemoryEndpoint) -> None:
    pool = make_pool(endpoint, mode="ihave")
    with pytest.raises(ValueError, match="not a message-id"):
        run(endpoint, pool.send("no angle brackets", ARTICLE))
    assert endpoint.connects == 0


def test_stream_pipelines_check_and_takethis_on_one_connection(endpoint: MemoryEndpoint) -> None:
    pool = make_pool(endpoint, mode="stream", max_connections=1)
    endpoint.store.seen.add("<dup@example.test>")
    ids = [f"<s{i}@example.test>" for i in range(5)] + ["<dup@example.test>"]
    assert run(endpoint, pool.stream("<first@example.test>", ARTICLE)).code == 239
    endpoint.script.hold = True
    ds = [start(pool.stream(i, ARTICLE.replace(b"<one@example.test>", i.encode()))) for i in ids]
    endpoint.pump()
    # Every CHECK reached the server before it answered any: they were pipelined.
    checks = [c for c in endpoint.commands if c.startswith("CHECK")]
    assert checks == ["CHECK <first@example.test>"] + [f"CHECK {i}" for i in ids]
    endpoint.script.hold = False
    for _ in range(5):
        endpoint.release()
    assert [result(d).code for d in ds] == [239] * 5 + [438]
    assert endpoint.connects == 1
    taken = [m for c, m, _ in endpoint.store.received if c == "TAKETHIS"]
    assert taken == ["<first@example.test>", *ids[:5]]


def test_stream_articles_waiting_for_the_first_session_share_it(endpoint: MemoryEndpoint) -> None:
    pool = make_pool(endpoint, mode="stream", max_connections=1)
    ds = [start(pool.stream(f"<w{i}@x>", ARTICLE)) for i in range(4)]
    endpoint.pump()
    assert [result(d).code for d in ds] == [239] * 4
    assert endpoint.connects == 1


def test_stream_falls_back_to_ihave_when_mode_stream_is_refused(clock: MemoryReactorClock) -> None:
    endpoint = MemoryEndpoint(clock, Script(stream=False))
    pool = make_pool(endpoint, mode="stream")
    assert run(endpoint, pool.stream("<one@example.test>", ARTICLE)).code == 235
    assert endpoint.commands == ["MODE STREAM", "IHAVE <one@example.test>"]


def test_takethis_rejected(clock: MemoryReactorClock) -> None:
    endpoint = MemoryEndpoint(
        clock, Script(replies={"TAKETHIS-DONE": b"439 <one@example.test> bad\r\n"})
    )
    pool = make_pool(endpoint, mode="stream")
    assert run(endpoint, pool.stream("<one@example.test>", ARTICLE)) == Reply(
        439, "<one@example.test> bad"
    )


# ----------------------------------------------------------------------------- the pool


def test_pool_never_opens_more_than_max_connections(endpoint: MemoryEndpoint) -> None:
    pool = make_pool(endpoint, mode="ihave", max_connections=2)
    endpoint.script.hold = True
    ds = [start(pool.ihave(f"<p{i}@x>", ARTICLE)) for i in range(5)]
    endpoint.pump()
    assert endpoint.connects == 2
    assert pool.open_connections == 2
    endpoint.script.hold = False
    for _ in range(10):
        endpoint.release()
    assert [result(d).code for d in ds] == [235] * 5
    assert endpoint.connects == 2


def test_close_quits_idle_sessions_and_fails_waiters(endpoint: MemoryEndpoint) -> None:
    pool = make_pool(endpoint, mode="ihave", max_connections=1)
    run(endpoint, pool.ihave("<a@x>", ARTICLE))
    endpoint.script.hold = True
    busy = start(pool.ihave("<b@x>", ARTICLE))
    waiting = start(pool.ihave("<c@x>", ARTICLE))
    endpoint.pump()
    closing = start(pool.close())
    with pytest.raises(NntpSessionError, match="was closed"):
        result(waiting)
    assert not closing.called
    endpoint.script.hold = False
    for _ in range(5):
        endpoint.release()
    assert result(busy).code == 235
    assert result(closing) is None
    assert endpoint.commands[-1] == "QUIT"
    with pytest.raises(NntpSessionError, match="is closed"):
        run(endpoint, pool.ihave("<d@x>", ARTICLE))


def test_pool_rejects_bad_settings(endpoint: MemoryEndpoint) -> None:
    with pytest.raises(ValueError, match="mode"):
        make_pool(endpoint, mode="carrier-pigeon")
    with pytest.raises(ValueError, match="max_connections"):
        make_pool(endpoint, max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        make_pool(endpoint, idle_timeout=0)


# ----------------------------------------------------------------------------- reading


def reader_session(endpoint: MemoryEndpoint) -> NntpSession:
    return run(endpoint, open_session(endpoint.clock, endpoint, timeout=10.0, mode="reader"))


def test_reading_commands(endpoint: MemoryEndpoint) -> None:
    endpoint.store.add("local.test", "<r1@x>", b".dot\nline\n")
    endpoint.store.add("local.test", "<r2@x>")
    session = reader_session(endpoint)
    assert run(endpoint, session.group("local.test")) == Reply(211, "2 1 2 local.test")
    assert run(endpoint, session.group("no.such")).code == 411
    run(endpoint, session.group("local.test"))
    over = run(endpoint, session.over(1, 2))
    assert over.code == 224 and over.block is not None
    assert [line.split(b"\t")[4] for line in over.block.splitlines()] == [b"<r1@x>", b"<r2@x>"]
    art = run(endpoint, session.article(1))
    assert art.code == 220 and art.text == "1 <r1@x>"
    assert art.block == endpoint.store.groups["local.test"][1].data
    assert art.block is not None and art.block.endswith(b"\n\n.dot\nline\n")
    assert run(endpoint, session.article(9)).code == 423
    assert run(endpoint, session.stat(2)) == Reply(223, "2 <r2@x>")
    assert run(endpoint, session.date()) == Reply(111, "20261125120000")
    run(endpoint, session.quit())
    assert endpoint.commands[-1] == "QUIT"
    assert session.protocol.lost


def test_over_falls_back_to_xover(clock: MemoryReactorClock) -> None:
    endpoint = MemoryEndpoint(clock, Script(over=False))
    endpoint.store.add("local.test", "<r1@x>")
    session = reader_session(endpoint)
    run(endpoint, session.group("local.test"))
    reply = run(endpoint, session.over(1))
    assert reply.code == 224
    assert endpoint.commands[-2:] == ["OVER 1-", "XOVER 1-"]


def test_capabilities(clock: MemoryReactorClock) -> None:
    caps = b"101 Capability list:\r\nVERSION 2\r\nREADER\r\nSTREAMING\r\nSASL PLAIN\r\n.\r\n"
    endpoint = MemoryEndpoint(clock, Script(replies={"CAPABILITIES": caps}))
    session = reader_session(endpoint)
    found = run(endpoint, session.fetch_capabilities())
    assert found["STREAMING"] == () and found["SASL"] == ("PLAIN",)


def test_bad_command_argument_is_refused_before_sending(endpoint: MemoryEndpoint) -> None:
    session = reader_session(endpoint)
    with pytest.raises(NntpSessionError, match="cannot send GROUP"):
        run(endpoint, session.group("two words"))
    assert endpoint.commands == ["MODE READER"]


# ----------------------------------------------------------------------------- properties

_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=60).map(
    str.strip
)
_BLOCK = st.binary(max_size=300).map(lambda b: b.replace(b"\r", b""))


_COMMANDS = [
    ("ARTICLE", 220), ("OVER", 224), ("CAPABILITIES", 101), ("GROUP", 211),
    ("LISTGROUP", 211), ("STAT", 223), ("POST", 340), ("IHAVE", 435),
    ("DATE", 111), ("CHECK", 438), ("ARTICLE", 423),
]  # fmt: skip


@st.composite
def _exchanges(draw: st.DrawFn) -> list[tuple[str, int, str, bytes | None]]:
    """(command keyword, code, text, block) with a block exactly where NNTP has one."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        keyword, code = draw(st.sampled_from(_COMMANDS))
        has_block = code in (220, 224, 101) or keyword == "LISTGROUP"
        block = draw(_BLOCK) if has_block else None
        if block is not None and block and not block.endswith(b"\n"):
            block += b"\n"
        out.append((keyword, code, draw(_TEXT), block))
    return out


@settings(max_examples=200, deadline=None)
@given(_exchanges(), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_replies_survive_any_chunking(
    exchanges: list[tuple[str, int, str, bytes | None]], cuts: list[int]
) -> None:
    protocol = _NntpClientProtocol()
    protocol.makeConnection(StringTransport())
    waiters = [protocol.expect(keyword) for keyword, _, _, _ in exchanges]
    wire = b"".join(
        f"{code} {text}".rstrip().encode()
        + b"\r\n"
        + (b"" if block is None else encode_block(block))
        for _, code, text, block in exchanges
    )
    pos = 0
    for cut in cuts * (len(wire) // max(1, sum(cuts)) + 1):
        if pos >= len(wire):
            break
        protocol.dataReceived(wire[pos : pos + cut])
        pos += cut
    replies = [result(w) for w in waiters]
    assert replies == [Reply(code, text, block) for _, code, text, block in exchanges]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 4))
def test_garbage_from_the_server_never_escapes(data: bytes, pending: int) -> None:
    protocol = _NntpClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    waiters = [protocol.expect("ARTICLE") for _ in range(pending)]
    protocol.dataReceived(data)  # must not raise
    for waiter in waiters:
        outcome: list[object] = []
        waiter.addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            # Only the protocol's own "malformed" error, and the connection is dropped.
            assert "Malformed" in type(outcome[0].value).__name__
            assert transport.disconnecting or transport.disconnected


def _outcome(d: Deferred[Any]) -> object:
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "the operation has not finished"
    return out[0]


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
