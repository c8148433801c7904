"""Tests for the NNTP client sessions and pool, in memory: iosim pumps to a scripted server.

``FakeNewsServer`` (also used by the destination and poller tests) is a small
news server that keeps articles per group and answers the way INN does; a
``Script`` changes single answers, holds replies back or stays silent.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from gateway.protocols.nntp.client import (
    NntpClientPool,
    NntpSession,
    NntpSessionError,
    Reply,
    _NntpClientProtocol,
    open_session,
)
from gateway.protocols.nntp.codec import StreamReader, encode_block, parse_command

T = TypeVar("T")


# ----------------------------------------------------------------------------- the fake server


@dataclass
class Script:
    """How the fake server answers. ``replies`` maps a keyword (or "POST-DONE",
    "IHAVE-DONE", "TAKETHIS-DONE" for the reply after an article) to raw bytes."""

    greeting: bytes = b"200 fake.example InterNetNews server ready (transit mode)\r\n"
    replies: dict[str, bytes] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)  # never answer these
    drop: set[str] = field(default_factory=set)  # close the connection instead
    user: str | None = None  # AUTHINFO needed before anything but MODE/QUIT
    password: str = "secret"
    hold: bool = False  # keep replies until release()
    stream: bool = True  # MODE STREAM allowed
    over: bool = True  # OVER known (else 500)
    xover: bool = True


@dataclass
class StoredArticle:
    msgid: str
    data: bytes


class NewsStore:
    """Articles by group and number, and Message-IDs the server has (for duplicates)."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[int, StoredArticle]] = {}
        self.low: dict[str, int] = {}
        self.next: dict[str, int] = {}
        self.seen: set[str] = set()
        self.received: list[tuple[str, str, bytes]] = []  # (command, msgid, data)

    def add_group(self, name: str, first: int = 1) -> None:
        self.groups.setdefault(name, {})
        self.low.setdefault(name, first)
        self.next.setdefault(name, first)

    def add(self, group: str, msgid: str, body: bytes = b"body\n") -> int:
        self.add_group(group)
        number = self.next[group]
        self.next[group] = number + 1
        data = (
            f"Path: fake!not-for-mail\nFrom: a@example.test\nNewsgroups: {group}\n"
            f"Subject: article {number}\nMessage-ID: {msgid}\n\n"
        ).encode() + body
        self.groups[group][number] = StoredArticle(msgid, data)
        self.seen.add(msgid)
        return number

    def renumber(self, group: str, first: int) -> None:
        """Give the group's articles new numbers from ``first`` (like a re-created group)."""
        old = [self.groups[group][n] for n in sorted(self.groups[group])]
        self.groups[group] = {first + i: a for i, a in enumerate(old)}
        self.low[group] = first
        self.next[group] = first + len(old)


class FakeNewsServer(Protocol):
    def __init__(self, script: Script, store: NewsStore) -> None:
        self.script = script
        self.store = store
        self.reader = StreamReader(max_line_length=2048)
        self.commands: list[str] = []
        self.block_for: tuple[str, str] | None = None  # (command, msgid) awaiting an article
        self.held: list[bytes] = []
        self.group: str | None = None
        self.authed = False
        self.pending_user: str | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.script.greeting)  # type: ignore[union-attr]
        if self.script.greeting[:3] in (b"400", b"502"):
            self.transport.loseConnection()  # type: ignore[union-attr]

    def send(self, data: bytes) -> None:
        if self.script.hold:
            self.held.append(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def release(self) -> None:
        held, self.held = self.held, []
        for data in held:
            self.transport.write(data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.reader.receive_data(data)
        while True:
            if self.block_for is not None:
                block = self.reader.read_block()
                if block is None:
                    return
                command, msgid = self.block_for
                self.block_for = None
                self.article_done(command, msgid, block.data)
                continue
            line = self.reader.read_line()
            if line is None:
                return
            self.command(line)

    def command(self, line: bytes) -> None:
        cmd = parse_command(line)
        key = cmd.keyword
        if key == "MODE" and cmd.args:
            key = f"MODE {cmd.args[0].upper()}"
        if key == "AUTHINFO" and cmd.args:
            key = f"AUTHINFO {cmd.args[0].upper()}"
        self.commands.append(" ".join((cmd.keyword, *cmd.args)))
        script = self.script
        if key in script.drop:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if key in script.silent:
            if key == "TAKETHIS":
                self.block_for = ("SILENT", "")
            return
        if key in script.replies and key != "TAKETHIS":
            self.send(script.replies[key])
            if script.replies[key].startswith(b"335"):
                self.block_for = ("IHAVE", cmd.args[0])
            if script.replies[key].startswith(b"340"):
                self.block_for = ("POST", "")
            return
        handler: Callable[[Any], None] = getattr(self, "do_" + key.replace(" ", "_"), self.unknown)
        if (
            script.user is not None
            and not self.authed
            and key not in ("MODE READER", "MODE STREAM", "QUIT")
            and not key.startswith("AUTHINFO")
        ):
            self.send(b"480 Authentication required\r\n")
            if key == "TAKETHIS":
                self.block_for = ("SILENT", "")
            return
        handler(cmd)

    def unknown(self, cmd: Any) -> None:
        self.send(b"500 What?\r\n")

    def do_QUIT(self, cmd: Any) -> None:
        self.send(b"205 Bye!\r\n")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def do_MODE_READER(self, cmd: Any) -> None:
        self.send(b"200 fake.example ready (posting ok)\r\n")

    def do_MODE_STREAM(self, cmd: Any) -> None:
        self.send(b"203 Streaming permitted\r\n" if self.script.stream else b"500 What?\r\n")

    def do_AUTHINFO_USER(self, cmd: Any) -> None:
        self.pending_user = cmd.args[1]
        self.send(b"381 Enter password\r\n")

    def do_AUTHINFO_PASS(self, cmd: Any) -> None:
        password = cmd.rest.split(None, 1)[1] if " " in cmd.rest else ""
        if self.pending_user is None:
            self.send(b"482 Authentication commands issued out of sequence\r\n")
        elif self.pending_user == self.script.user and password == self.script.password:
            self.authed = True
            self.send(b"281 Authentication accepted\r\n")
        else:
            self.send(b"481 Authentication failed\r\n")

    def do_DATE(self, cmd: Any) -> None:
        self.send(b"111 20261125120000\r\n")

    def do_POST(self, cmd: Any) -> None:
        self.send(b"340 Ok, recommended message-ID <x@fake>\r\n")
        self.block_for = ("POST", "")

    def do_IHAVE(self, cmd: Any) -> None:
        msgid = cmd.args[0]
        if msgid in self.store.seen:
            self.send(b"435 Duplicate\r\n")
            return
        self.send(b"335 Send it\r\n")
        self.block_for = ("IHAVE", msgid)

    def do_CHECK(self, cmd: Any) -> None:
        msgid = cmd.args[0]
        if msgid in self.store.seen:
            self.send(f"438 {msgid}\r\n".encode())
        else:
            self.send(f"238 {msgid}\r\n".encode())

    def do_TAKETHIS(self, cmd: Any) -> None:
        self.block_for = ("TAKETHIS", cmd.args[0])

    def article_done(self, command: str, msgid: str, data: bytes) -> None:
        if command == "SILENT":
            return
        self.store.received.append((command, msgid, data))
        override = self.script.replies.get(f"{command}-DONE")
        if override is not None:
            self.send(override)
            return
        if command == "POST":
            for line in data.split(b"\n"):
                if line.lower().startswith(b"message-id:"):
                    msgid = line.split(b":", 1)[1].strip().decode()
            if msgid in self.store.seen:
                self.send(b"441 435 Duplicate\r\n")
                return
            self.store.seen.add(msgid)
            self.send(f"240 Article received {msgid}\r\n".encode())
        elif command == "IHAVE":
            self.store.seen.add(msgid)
            self.send(f"235 {msgid}\r\n".encode())
        else:
            if msgid in self.store.seen:
                self.send(f"439 {msgid} Duplicate\r\n".encode())
                return
            self.store.seen.add(msgid)
            self.send(f"239 {msgid}\r\n".encode())

    def do_GROUP(self, cmd: Any) -> None:
        name = cmd.args[0]
        if name not in self.store.groups:
            self.send(b"411 No such group " + name.encode() + b"\r\n")
            return
        self.group = name
        numbers = sorted(self.store.groups[name])
        low = numbers[0] if numbers else self.store.low[name]
        high = numbers[-1] if numbers else low - 1
        self.send(f"211 {len(numbers)} {low} {high} {name}\r\n".encode())

    def _range(self, spec: str) -> list[int]:
        assert self.group is not None
        first_text, _, last_text = spec.partition("-")
        first = int(first_text)
        last = int(last_text) if last_text else (1 << 62) if "-" in spec else first
        return [n for n in sorted(self.store.groups[self.group]) if first <= n <= last]

    def do_OVER(self, cmd: Any) -> None:
        if not self.script.over:
            self.unknown(cmd)
            return
        self._overview(cmd)

    def do_XOVER(self, cmd: Any) -> None:
        if not self.script.xover:
            self.unknown(cmd)
            return
        self._overview(cmd)

    def _overview(self, cmd: Any) -> None:
        if self.group is None:
            self.send(b"412 No newsgroup selected\r\n")
            return
        numbers = self._range(cmd.args[0])
        if not numbers:
            self.send(b"423 No articles in that range\r\n")
            return
        lines = []
        for n in numbers:
            art = self.store.groups[self.group][n]
            lines.append(f"{n}\tarticle {n}\ta@example.test\tdate\t{art.msgid}\t\t10\t1\n")
        self.send(b"224 Overview information follows\r\n" + encode_block("".join(lines).encode()))

    def _lookup(self, spec: str) -> tuple[int, StoredArticle] | None:
        if self.group is None:
            return None
        art = self.store.groups[self.group].get(int(spec))
        return None if art is None else (int(spec), art)

    def do_ARTICLE(self, cmd: Any) -> None:
        found = self._lookup(cmd.args[0])
        if found is None:
            self.send(b"423 No such article number in this group\r\n")
            return
        number, art = found
        self.send(f"220 {number} {art.msgid}\r\n".encode() + encode_block(art.data))

    def do_STAT(self, cmd: Any) -> None:
        found = self._lookup(cmd.args[0])
        if found is None:
            self.send(b"423 No such article number in this group\r\n")
            return
        number, art = found
        self.send(f"223 {number} {art.msgid}\r\n".encode())


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects every client to a fresh FakeNewsServer through an iosim pump."""

    def __init__(self, clock: MemoryReactorClock, script: Script | None = None) -> None:
        self.clock = clock
        self.script = script or Script()
        self.store = NewsStore()
        self.pumps: list[iosim.IOPump] = []
        self.servers: list[FakeNewsServer] = []
        self.connects = 0
        self.refuse = False

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        self.connects += 1
        if self.refuse:
            return fail(ConnectionRefusedError("Connection refused"))
        client = factory.buildProtocol(None)
        assert client is not None
        server = FakeNewsServer(self.script, self.store)
        self.servers.append(server)
        self.pumps.append(
            iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client,
                iosim.makeFakeClient(client),
                greet=False,
                clock=self.clock,
            )
        )
        return succeed(client)

    def pump(self) -> None:
        for _ in range(10_000):
            if not any([pump.pump() for pump in self.pumps]):
                return
        raise AssertionError("the conversation never went quiet")

    def release(self) -> None:
        for server in self.servers:
            server.release()
        self.pump()

    @property
    def commands(self) -> list[str]:
        return [c for server in self.servers for c in server.commands]


def start(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coro)


def result(d: Deferred[T]) -> T:
    """The result of a fired Deferred; raises its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the operation has not finished"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


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
