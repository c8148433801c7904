"""Tests for the pooled SMTP client, in memory: iosim pumps between it and a server."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import ISSLTransport, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import directlyProvides, implementer

from gateway.protocols.smtp.client import RecipientResult, SmtpClientPool
from gateway.protocols.smtp.server import Reply, SmtpServerFactory, SmtpSession


class FakeTlsContext:
    """What iosim's pretend TLS handshake needs from a context factory."""

    def iosimVerify(self, other: object) -> bool:
        return True


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects every client to a fresh server protocol through an iosim pump."""

    def __init__(self, server_factory: Factory, clock: MemoryReactorClock) -> None:
        self.server_factory = server_factory
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []
        self.servers: list[Any] = []
        self.connects = 0
        self.refuse = False
        self.hang = False
        self.implicit_tls = False
        self.hanging: list[Deferred[Protocol]] = []

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        self.connects += 1
        if self.refuse:
            return fail(ConnectionRefusedError("Connection refused"))
        if self.hang:
            pending: Deferred[Protocol] = Deferred()
            self.hanging.append(pending)
            return pending
        client = factory.buildProtocol(None)
        server = self.server_factory.buildProtocol(None)
        self.servers.append(server)
        client_transport = iosim.makeFakeClient(client)
        if self.implicit_tls:
            directlyProvides(client_transport, ISSLTransport)
        self.pumps.append(
            iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client,
                client_transport,
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


class Handler:
    """Accepts everything; on_message can be held back to keep connections busy."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, tuple[str, ...], bytes]] = []
        self.hold = False
        self.held: list[Deferred[Reply]] = []
        self.refuse: set[str] = set()

    def on_connect(self, session: SmtpSession) -> Reply | None:
        return None

    def on_sender(
        self, session: SmtpSession, sender: str, params: Mapping[str, str | None]
    ) -> None:
        return None

    def on_recipient(
        self, session: SmtpSession, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> Reply | None:
        if recipient in self.refuse:
            return Reply(550, "5.1.1", f"<{recipient}>: Recipient address rejected")
        return None

    def on_message(
        self, session: SmtpSession, sender: str, recipients: tuple[str, ...], data: bytes
    ) -> Deferred[Reply]:
        self.messages.append((sender, recipients, data))
        if self.hold:
            held: Deferred[Reply] = Deferred()
            self.held.append(held)
            return held
        return succeed(Reply(250, "2.0.0", "Ok: queued"))


class Script:
    """How a ScriptedServer answers; replies are raw bytes so tests control the wire."""

    def __init__(self, **overrides: Any) -> None:
        self.greeting = b"220 fake.example ESMTP\r\n"
        self.extensions = [b"PIPELINING", b"SIZE 100000", b"8BITMIME", b"ENHANCEDSTATUSCODES"]
        self.replies: dict[bytes, bytes | None] = {
            b"HELO": b"250 fake.example\r\n",
            b"MAIL": b"250 2.1.0 Ok\r\n",
            b"RCPT": b"250 2.1.5 Ok\r\n",
            b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
            b"RSET": b"250 2.0.0 Ok\r\n",
            b"NOOP": b"250 2.0.0 Ok\r\n",
            b"QUIT": b"221 2.0.0 Bye\r\n",
            b"STARTTLS": b"220 2.0.0 Ready to start TLS\r\n",
        }
        self.rcpt: Callable[[bytes], bytes] | None = None
        self.end_of_data: bytes | None = b"250 2.0.0 Ok: queued\r\n"
        self.drop_in_data = False
        self.tls_extra = b""
        for name, value in overrides.items():
            setattr(self, name, value)


class ScriptedServer(Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.buffer = b""
        self.chunks: list[bytes] = []
        self.lines: list[bytes] = []
        self.body: list[bytes] = []
        self.in_data = False

    def connectionMade(self) -> None:
        self.transport.write(self.script.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.line(line)

    def line(self, line: bytes) -> None:
        script = self.script
        if self.in_data:
            if line == b".":
                self.in_data = False
                if script.end_of_data is not None:
                    self.transport.write(script.end_of_data)
            elif script.drop_in_data:
                self.transport.loseConnection()
            else:
                self.body.append(line)
            return
        self.lines.append(line)
        verb = line.split(b" ")[0].upper()
        if verb == b"EHLO":
            reply = (
                script.replies.get(b"EHLO")
                or b"".join(
                    b"250-" + item + b"\r\n" for item in [b"fake.example", *script.extensions[:-1]]
                )
                + b"250 "
                + script.extensions[-1]
                + b"\r\n"
            )
        elif verb == b"RCPT" and script.rcpt is not None:
            reply = script.rcpt(line)
        else:
            reply = script.replies.get(verb, b"500 5.5.2 Error: command not recognized\r\n")
        if reply is None:
            return  # silence, for timeouts
        self.transport.write(reply)
        if verb == b"DATA" and reply.startswith(b"354"):
            self.in_data = True
        if verb == b"STARTTLS" and reply.startswith(b"220"):
            self.transport.write(script.tls_extra)
            self.transport.startTLS(FakeTlsContext())
        if reply.startswith(b"421") or verb == b"QUIT":
            self.transport.loseConnection()


class ScriptedFactory(Factory):
    def __init__(self, script: Script) -> None:
        self.script = script

    def buildProtocol(self, addr: Any) -> ScriptedServer:
        return ScriptedServer(self.script)


class Env:
    def __init__(self, server_factory: Factory | None = None, **options: Any) -> None:
        self.clock = MemoryReactorClock()
        self.handler = Handler()
        if server_factory is None:
            server_factory = SmtpServerFactory(
                self.handler, reactor=self.clock, hostname="mx.test", max_size=100_000
            )
        self.endpoint = MemoryEndpoint(server_factory, self.clock)
        options.setdefault("destination", "mx.test:25")
        options.setdefault("tls", "none")
        self.pool = SmtpClientPool(self.clock, self.endpoint, helo="gw.example", **options)

    def start(
        self,
        recipients: Sequence[str] = ("b@example.net",),
        data: bytes = b"Subject: hi\n\nbody\n",
        sender: str = "a@example.org",
    ) -> Deferred[list[RecipientResult]]:
        return Deferred.fromCoroutine(self.pool.send(sender, recipients, data))

    def send(self, *args: Any, **kwargs: Any) -> list[RecipientResult]:
        return self.wait(self.start(*args, **kwargs))

    def wait(self, deferred: Deferred[Any]) -> Any:
        self.endpoint.pump()
        outcome: list[Any] = []
        deferred.addBoth(outcome.append)
        assert outcome, "the send did not finish"
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    def server(self, index: int = -1) -> ScriptedServer:
        return self.endpoint.servers[index]  # type: ignore[no-any-return]


def codes(results: list[RecipientResult]) -> list[int]:
    return [result.code for result in results]


# ----------------------------------------------------------------------------- delivering


def test_delivers_through_our_server_unchanged() -> None:
    env = Env()
    data = b"Subject: dots\n\n.\n..two\n.leading\nlast line without newline"
    results = env.send(["b@example.net", "c@example.net"], data)
    assert results == [
        RecipientResult("b@example.net", 250, "2.0.0", "Ok: queued"),
        RecipientResult("c@example.net", 250, "2.0.0", "Ok: queued"),
    ]
    assert all(result.delivered and not result.temporary for result in results)
    assert env.handler.messages == [
        ("a@example.org", ("b@example.net", "c@example.net"), data + b"\n")
    ]


def test_null_sender_and_postmaster() -> None:
    env = Env()
    assert codes(env.send(["postmaster"], sender="")) == [250]
    assert env.handler.messages[0][:2] == ("", ("postmaster",))


def test_pipelined_transaction_is_one_write() -> None:
    env = Env(ScriptedFactory(Script()))
    results = env.send(["b@example.net", "c@example.net"], b"x\n")
    assert codes(results) == [250, 250]
    server = env.server()
    assert (
        b"MAIL FROM:<a@example.org> SIZE=3\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<c@example.net>\r\nDATA\r\n"
    ) in server.chunks
    assert server.body == [b"x"]


def test_without_pipelining_commands_go_one_at_a_time() -> None:
    env = Env(ScriptedFactory(Script(extensions=[b"SIZE 1000"])))
    assert codes(env.send(["b@example.net", "c@example.net"])) == [250, 250]
    chunks = env.server().chunks
    assert b"MAIL FROM:<a@example.org> SIZE=21\r\n" in chunks
    assert b"RCPT TO:<b@example.net>\r\n" in chunks
    assert b"RCPT TO:<c@example.net>\r\n" in chunks
    assert b"DATA\r\n" in chunks


def test_eight_bit_data_asks_for_8bitmime_only_when_offered() -> None:
    env = Env(ScriptedFactory(Script()))
    env.send(data=b"caf\xc3\xa9\n")
    assert env.server().lines[1] == b"MAIL FROM:<a@example.org> SIZE=7 BODY=8BITMIME"
    plain = Env(ScriptedFactory(Script(extensions=[b"PIPELINING"])))
    plain.send(data=b"caf\xc3\xa9\n")
    assert plain.server().lines[1] == b"MAIL FROM:<a@example.org>"


def test_ehlo_refused_falls_back_to_helo() -> None:
    script = Script()
    script.replies[b"EHLO"] = b"502 5.5.2 Error: command not recognized\r\n"
    env = Env(ScriptedFactory(script))
    assert codes(env.send()) == [250]
    assert [line.split(b" ")[0] for line in env.server().lines] == [
        b"EHLO",
        b"HELO",
        b"MAIL",
        b"RCPT",
        b"DATA",
    ]
    assert env.server().lines[2] == b"MAIL FROM:<a@example.org>"


def test_refused_recipient_gets_its_own_result() -> None:
    env = Env()
    env.handler.refuse.add("bad@example.net")
    results = env.send(["b@example.net", "bad@example.net"])
    assert results[0].delivered
    assert results[1] == RecipientResult(
        "bad@example.net", 550, "5.1.1", "<bad@example.net>: Recipient address rejected"
    )
    assert results[1].permanent
    assert env.handler.messages[0][1] == ("b@example.net",)


def test_refused_sender_applies_to_all() -> None:
    script = Script()
    script.replies[b"MAIL"] = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    script.replies[b"RCPT"] = b"503 5.5.1 Error: need MAIL command\r\n"
    script.replies[b"DATA"] = b"503 5.5.1 Error: need MAIL command\r\n"
    env = Env(ScriptedFactory(script))
    results = env.send(["b@example.net", "c@example.net"])
    assert [(r.code, r.status) for r in results] == [(552, "5.3.4"), (552, "5.3.4")]


@pytest.mark.parametrize("pipelining", [True, False])
def test_all_recipients_refused_then_rset_before_reuse(pipelining: bool) -> None:
    refusals = iter([b"550 5.1.1 no\r\n", b"550 5.1.1 no\r\n"])
    extensions = [b"PIPELINING", b"SIZE 1000"] if pipelining else [b"SIZE 1000"]
    script = Script(extensions=extensions, rcpt=lambda line: next(refusals, b"250 2.1.5 Ok\r\n"))
    script.replies[b"DATA"] = (
        b"554 5.5.1 Error: no valid recipients\r\n" if pipelining else b"503 5.5.1 not expected\r\n"
    )
    env = Env(ScriptedFactory(script))
    assert codes(env.send(["b@example.net", "c@example.net"])) == [550, 550]
    verbs = [line.split(b" ")[0] for line in env.server().lines]
    assert verbs[-1] == (b"DATA" if pipelining else b"RCPT")
    script.replies[b"DATA"] = b"354 go\r\n"
    assert codes(env.send()) == [250]
    assert env.endpoint.connects == 1
    assert [line.split(b" ")[0] for line in env.server().lines][len(verbs) :] == [
        b"RSET",
        b"MAIL",
        b"RCPT",
        b"DATA",
    ]


def test_no_rset_after_a_successful_transaction() -> None:
    env = Env(ScriptedFactory(Script()))
    env.send()
    env.send()
    verbs = [line.split(b" ")[0] for line in env.server().lines]
    assert verbs == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA"]


@pytest.mark.parametrize(
    ("where", "reply", "temporary"),
    [
        ("DATA", b"451 4.3.0 Local error in processing\r\n", True),
        ("DATA", b"554 5.7.1 No thanks\r\n", False),
        ("end", b"452 4.3.1 Insufficient system storage\r\n", True),
        ("end", b"550 5.7.1 Spam\r\n", False),
    ],
)
def test_failures_at_data_apply_to_accepted_recipients(
    where: str, reply: bytes, temporary: bool
) -> None:
    script = Script(
        rcpt=lambda line: b"550 5.1.1 no\r\n" if b"bad" in line else b"250 2.1.5 Ok\r\n"
    )
    if where == "DATA":
        script.replies[b"DATA"] = reply
    else:
        script.end_of_data = reply
    env = Env(ScriptedFactory(script))
    results = env.send(["b@example.net", "bad@example.net", "c@example.net"])
    code = int(reply[:3])
    assert codes(results) == [code, 550, code]
    assert results[0].temporary is temporary and results[0].permanent is not temporary
    assert results[0].text == reply[10:-2].decode()


# ----------------------------------------------------------------------------- failures


def test_connection_refused() -> None:
    clock = MemoryReactorClock()
    endpoint = TCP4ClientEndpoint(clock, "127.0.0.1", 2526)
    pool = SmtpClientPool(clock, endpoint, helo="gw.example", tls="none")
    sending = Deferred.fromCoroutine(pool.send("a@example.org", ["b@example.net", "c@x.org"], b""))
    iosim.ConnectionCompleter(clock).failOnce(Failure(ConnectionRefusedError()))
    results: list[RecipientResult] = []
    sending.addCallback(results.extend)
    assert results == [
        RecipientResult("b@example.net", 0, "", "connection refused by 127.0.0.1:2526"),
        RecipientResult("c@x.org", 0, "", "connection refused by 127.0.0.1:2526"),
    ]
    assert results[0].temporary and not results[0].permanent and not results[0].delivered
    assert pool.open_connections == 0


def test_connect_timeout() -> None:
    env = Env(connect_timeout=30)
    env.endpoint.hang = True
    sending = env.start()
    env.clock.advance(29)
    assert not sending.called
    env.clock.advance(1)
    (result,) = env.wait(sending)
    assert (result.code, result.text) == (0, "timed out after 30s connecting to mx.test:25")
    assert env.endpoint.hanging[0].called  # the attempt was cancelled
    assert env.pool.open_connections == 0


def test_command_timeout() -> None:
    script = Script()
    script.replies[b"DATA"] = None
    env = Env(ScriptedFactory(script), command_timeout=60)
    sending = env.start()
    env.endpoint.pump()
    env.clock.advance(60)
    (result,) = env.wait(sending)
    assert (result.code, result.text) == (0, "timed out after 60s waiting for the reply to DATA")
    assert env.pool.open_connections == 0  # the connection was dropped, not pooled


def test_connection_lost_mid_data() -> None:
    env = Env(ScriptedFactory(Script(drop_in_data=True)))
    results = env.send(["b@example.net", "c@example.net"])
    assert codes(results) == [0, 0]
    assert results[0].text == (
        "connection to mx.test:25 lost while waiting for the reply to the end of the message"
    )
    assert env.pool.open_connections == 0
    assert codes(env.send()) == [0]
    assert env.endpoint.connects == 2  # a failed connection is never reused


def test_421_ends_the_session_and_is_temporary_for_the_rest() -> None:
    replies = iter([b"550 5.1.1 no\r\n", b"421 4.7.0 mx Error: too many errors\r\n"])
    script = Script(extensions=[b"SIZE 1000"], rcpt=lambda line: next(replies, b"250 2.1.5 Ok\r\n"))
    env = Env(ScriptedFactory(script))
    results = env.send(["a1@example.net", "a2@example.net", "a3@example.net"])
    assert [(r.code, r.status) for r in results] == [(550, "5.1.1"), (421, "4.7.0"), (421, "4.7.0")]
    assert results[2].temporary
    assert codes(env.send()) == [250]
    assert env.endpoint.connects == 2


def test_greeting_refused() -> None:
    env = Env(ScriptedFactory(Script(greeting=b"554 5.7.1 No SMTP service here\r\n")))
    results = env.send(["b@example.net", "c@example.net"])
    assert [(r.code, r.status, r.text) for r in results] == [
        (554, "5.7.1", "No SMTP service here")
    ] * 2
    assert env.server().lines == [b"QUIT"]
    assert env.pool.open_connections == 0


def test_malformed_reply() -> None:
    script = Script()
    script.replies[b"MAIL"] = b"hello there\r\n"
    env = Env(ScriptedFactory(script))
    (result,) = env.send()
    assert result.code == 0 and "malformed reply" in result.text


def test_invalid_addresses_are_not_sent() -> None:
    env = Env(ScriptedFactory(Script()))
    results = env.send(["b@example.net", "evil@example.net>\r\nRSET"])
    assert codes(results) == [250, 553]
    assert results[1].permanent
    assert all(b"evil" not in line for line in env.server().lines)
    assert codes(env.send(sender="x\r\n@y")) == [553]
    assert env.send([]) == []


def test_a_single_string_recipient_is_one_recipient() -> None:
    env = Env()
    assert env.send("b@example.net") == [
        RecipientResult("b@example.net", 250, "2.0.0", "Ok: queued")
    ]


# ----------------------------------------------------------------------------- STARTTLS


def test_starttls_offered_but_tls_none_is_not_used() -> None:
    script = Script(extensions=[b"PIPELINING", b"STARTTLS"])
    env = Env(ScriptedFactory(script), tls="none")
    assert codes(env.send()) == [250]
    assert b"STARTTLS" not in env.server().lines


def test_starttls_used_when_offered() -> None:
    script = Script(extensions=[b"PIPELINING", b"STARTTLS"])
    env = Env(ScriptedFactory(script), tls="may")
    env.pool._tls_context = FakeTlsContext()
    assert codes(env.send()) == [250]
    verbs = [line.split(b" ")[0] for line in env.server().lines]
    assert verbs == [b"EHLO", b"STARTTLS", b"EHLO", b"MAIL", b"RCPT", b"DATA"]


def test_starttls_required_but_not_offered() -> None:
    env = Env(ScriptedFactory(Script()), tls="require")
    (result,) = env.send()
    assert result.code == 0 and result.temporary
    assert "does not offer STARTTLS" in result.text
    assert [line.split(b" ")[0] for line in env.server().lines] == [b"EHLO", b"QUIT"]


def test_data_injected_after_starttls_reply_drops_the_session() -> None:
    script = Script(extensions=[b"STARTTLS"], tls_extra=b"250 2.0.0 injected\r\n")
    env = Env(ScriptedFactory(script), tls="may")
    env.pool._tls_context = FakeTlsContext()
    (result,) = env.send()
    assert result.code == 0 and "after its reply to STARTTLS" in result.text


def test_implicit_tls_endpoint_needs_no_starttls() -> None:
    env = Env(ScriptedFactory(Script()), tls="require")
    env.endpoint.implicit_tls = True
    assert codes(env.send()) == [250]
    assert b"STARTTLS" not in env.server().lines


def test_tls_settings_are_checked_at_start() -> None:
    clock = MemoryReactorClock()
    endpoint = MemoryEndpoint(Factory(), clock)
    with pytest.raises(ValueError, match="tls must be"):
        SmtpClientPool(clock, endpoint, helo="gw", tls="sometimes")
    with pytest.raises(ValueError, match="server_name"):
        SmtpClientPool(clock, endpoint, helo="gw", tls="require", tls_verify=True)
    with pytest.raises(ValueError, match="cannot read the CA file"):
        SmtpClientPool(
            clock,
            endpoint,
            helo="gw",
            tls="may",
            tls_verify=True,
            server_name="mx.example",
            ca_file="/nonexistent/ca.pem",
        )


# ----------------------------------------------------------------------------- pooling


def test_connection_is_reused() -> None:
    env = Env()
    assert codes(env.send()) == [250]
    assert codes(env.send()) == [250]
    assert env.endpoint.connects == 1
    assert len(env.handler.messages) == 2
    assert env.pool.idle_connections == 1


def test_max_connections_is_respected_and_waiters_are_served_in_order() -> None:
    env = Env(max_connections=2)
    env.handler.hold = True
    sends = [env.start([f"r{i}@example.net"]) for i in range(5)]
    env.endpoint.pump()
    assert env.endpoint.connects == 2
    assert env.pool.open_connections == 2
    assert len(env.handler.held) == 2
    env.handler.hold = False
    finished: list[int] = []
    for index, sending in enumerate(sends):
        sending.addCallback(lambda results, index=index: finished.append(index))
    for held in list(env.handler.held):
        held.callback(Reply(250, "2.0.0", "Ok"))
    env.endpoint.pump()
    assert finished == [0, 1, 2, 3, 4]
    assert env.endpoint.connects == 2
    assert [m[1] for m in env.handler.messages] == [(f"r{i}@example.net",) for i in range(5)]


def test_idle_connections_quit_after_idle_timeout() -> None:
    env = Env(ScriptedFactory(Script()), idle_timeout=10)
    env.send()
    env.clock.advance(9.9)
    env.endpoint.pump()
    assert env.pool.open_connections == 1
    env.clock.advance(0.1)
    env.endpoint.pump()
    assert env.server().lines[-1] == b"QUIT"
    assert env.pool.open_connections == 0
    env.send()
    assert env.endpoint.connects == 2


def test_max_messages_per_connection() -> None:
    env = Env(max_messages_per_connection=2)
    for _ in range(3):
        assert codes(env.send()) == [250]
    assert env.endpoint.connects == 2


def test_server_closing_an_idle_connection_is_noticed() -> None:
    env = Env(ScriptedFactory(Script()))
    env.send()
    env.server().transport.loseConnection()
    env.endpoint.pump()
    assert env.pool.open_connections == 0
    assert codes(env.send()) == [250]
    assert env.endpoint.connects == 2


def test_close_quits_idle_connections_and_fails_waiting_sends() -> None:
    env = Env(max_connections=1)
    env.handler.hold = True
    first = env.start()
    second = env.start(["c@example.net"])
    env.endpoint.pump()
    closing = Deferred.fromCoroutine(env.pool.close())
    (result,) = env.wait(second)
    assert result.code == 0 and "closed" in result.text
    assert not first.called and not closing.called
    env.handler.held[0].callback(Reply(250, "2.0.0", "Ok"))
    assert codes(env.wait(first)) == [250]
    env.wait(closing)
    assert env.pool.open_connections == 0
    (late,) = env.send()
    assert late.code == 0 and "closed" in late.text


def test_close_with_idle_connection_sends_quit() -> None:
    env = Env(ScriptedFactory(Script()))
    env.send()
    env.wait(Deferred.fromCoroutine(env.pool.close()))
    assert env.server().lines[-1] == b"QUIT"
    assert env.pool.open_connections == 0
    assert not env.clock.getDelayedCalls()


def _one_outcome(result: object) -> int:
    flags = [getattr(result, name) for name in ("delivered", "temporary", "permanent")]
    return sum(bool(flag) for flag in flags)


def test_data_answered_250_is_not_delivered() -> None:
    """Defect: a 2xx reply to DATA (the message was never sent) was counted as delivered."""
    script = Script()
    script.replies[b"DATA"] = b"250 2.0.0 Ok\r\n"
    env = Env(ScriptedFactory(script))
    (result,) = env.send()
    assert not result.delivered and result.temporary
    assert env.server().body == []


def test_unexpected_reply_classes_are_temporary() -> None:
    """Defect: 1xx/3xx replies (RFC 5321 4.2.1: not valid there) counted as delivered."""
    for stage, reply in (
        ("greeting", b"120 2.0.0 come back later\r\n"),
        ("MAIL", b"354 go ahead\r\n"),
        ("RCPT", b"354 go ahead\r\n"),
        ("end", b"354 what\r\n"),
    ):
        script = Script(extensions=[b"SIZE 100000"])
        if stage == "greeting":
            script.greeting = reply
        elif stage == "end":
            script.end_of_data = reply
        else:
            script.replies[stage.encode()] = reply
        env = Env(ScriptedFactory(script))
        (result,) = env.send()
        assert _one_outcome(result) == 1, (stage, result)
        assert result.temporary and not result.delivered, (stage, result)


def test_inconsistent_multiline_reply_is_not_success() -> None:
    """Defect: "250-...\\r\\n550 ..." was read as 250 (first line); RFC 5321 4.2.1 needs one code."""
    env = Env(ScriptedFactory(Script(end_of_data=b"250-2.0.0 fine\r\n550 5.7.1 refused\r\n")))
    (result,) = env.send()
    assert not result.delivered and result.temporary


def _wire_body(env: Env) -> bytes:
    data = b"".join(env.server().chunks)
    return data.split(b"DATA\r\n", 1)[1]


def test_bare_cr_and_crlf_are_sent_as_crlf() -> None:
    """Defect: bare CR and CRLF line ends in a stored message went out as bare CR (RFC 5321 2.3.8)."""
    env = Env(ScriptedFactory(Script()))
    data = b"Subject: x\r\n\r\none\rtwo\r\n.dot\rthree\n"
    assert codes(env.send(data=data)) == [250]
    wire = _wire_body(env)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None, wire
    assert wire == b"Subject: x\r\n\r\none\r\ntwo\r\n..dot\r\nthree\r\n.\r\n"
    size = int(re.search(rb"SIZE=(\d+)", b"".join(env.server().chunks)).group(1))  # type: ignore[union-attr]
    assert size == len(b"Subject: x\r\n\r\none\r\ntwo\r\n.dot\r\nthree\r\n")


def test_long_lines_are_folded_like_postfix() -> None:
    """Defect: lines over 998 octets went out unchanged (RFC 5321 4.5.3.1.6); they are now folded."""
    env = Env(ScriptedFactory(Script()))
    long = b"x" * 2500
    assert codes(env.send(data=b"Subject: l\n\n" + long + b"\nend")) == [250]
    wire = _wire_body(env)
    lines = wire.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    assert b"".join(line.lstrip(b" ") for line in lines[2:-3]) == long
    assert lines[-3:] == [b"end", b".", b""]


def test_final_reply_waits_ten_minutes() -> None:
    """Defect: the reply after the data timed out with command_timeout (5 min), not 10 (RFC 5321 4.5.3.2.6)."""
    script = Script(end_of_data=None)
    env = Env(ScriptedFactory(script), command_timeout=300)
    sending = env.start()
    env.endpoint.pump()
    env.clock.advance(400)
    env.endpoint.pump()
    assert not sending.called
    env.server().transport.write(b"250 2.0.0 Ok: queued\r\n")
    assert codes(env.wait(sending)) == [250]


def test_reused_connection_closed_by_server_retries_on_a_new_one() -> None:
    """Defect: a pooled session that the server had timed out (421 to MAIL) failed the next message."""
    mail_replies = iter([b"250 2.1.0 Ok\r\n", b"421 4.4.2 timeout exceeded\r\n"])
    script = Script()

    class Replies(dict[bytes, bytes | None]):
        def get(self, key: bytes, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
            if key == b"MAIL":
                return next(mail_replies, b"250 2.1.0 Ok\r\n")
            return super().get(key, default)

    script.replies = Replies(script.replies)
    env = Env(ScriptedFactory(script))
    assert codes(env.send()) == [250]
    assert codes(env.send()) == [250]
    assert env.endpoint.connects == 2
    assert len(env.server().body) > 0


def test_reused_connection_lost_before_mail_reply_retries() -> None:
    """Defect: a pooled session closed by the server just as MAIL went out lost the message's try."""
    script = Script(extensions=[b"SIZE 100000"])
    env = Env(ScriptedFactory(script))
    assert codes(env.send()) == [250]
    script.replies[b"MAIL"] = None
    sending = env.start()
    env.endpoint.pump()
    script.replies[b"MAIL"] = b"250 2.1.0 Ok\r\n"
    env.server().transport.loseConnection()
    assert codes(env.wait(sending)) == [250]
    assert env.endpoint.connects == 2
