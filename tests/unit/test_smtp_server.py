"""Tests for the Twisted SMTP server shell, in memory with StringTransport and MemoryReactorClock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from gateway.protocols.smtp.server import (
    Reply,
    SmtpServerFactory,
    SmtpServerProtocol,
    SmtpSession,
)
from tests.support.transports import SmallBufferTransport

PEER = IPv4Address("TCP", "192.0.2.7", 40000)
Result = Reply | None | Awaitable[Reply | None]


class Handler:
    """An SmtpHandler whose answers each test sets; it records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.connect: Callable[[SmtpSession], Reply | None] = lambda session: None
        self.sender: Callable[[str], Result] = lambda sender: None
        self.recipient: Callable[[str], Result] = lambda recipient: None
        self.message: Callable[[bytes], Any] = self._queued

    @staticmethod
    async def _queued(data: bytes) -> Reply:
        return Reply(250, "2.0.0", f"Ok: queued {len(data)} octets")

    def on_connect(self, session: SmtpSession) -> Reply | None:
        self.calls.append(("connect", session))
        return self.connect(session)

    def on_sender(
        self, session: SmtpSession, sender: str, params: Mapping[str, str | None]
    ) -> Result:
        self.calls.append(("sender", session, sender, dict(params)))
        return self.sender(sender)

    def on_recipient(
        self, session: SmtpSession, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> Result:
        self.calls.append(("recipient", session, sender, recipient, dict(params)))
        return self.recipient(recipient)

    def on_message(
        self, session: SmtpSession, sender: str, recipients: tuple[str, ...], data: bytes
    ) -> Awaitable[Reply]:
        self.calls.append(("message", session, sender, recipients, data))
        return self.message(data)  # type: ignore[no-any-return]

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


class Conn:
    def __init__(
        self, handler: Handler, transport: StringTransport | None = None, **options: Any
    ) -> None:
        self.clock = MemoryReactorClock()
        options.setdefault("max_size", 10_000)
        self.factory = SmtpServerFactory(
            handler, reactor=self.clock, hostname="mx.example", **options
        )
        self.protocol = self.factory.buildProtocol(PEER)
        self.transport = transport or StringTransport(peerAddress=PEER)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def read(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def lines(self, data: bytes | None = None) -> list[bytes]:
        if data is not None:
            self.send(data)
        return self.read().splitlines()

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def failures(events: list[dict[str, Any]], kind: type[BaseException]) -> list[Failure]:
    return [e["log_failure"] for e in events if "log_failure" in e and e["log_failure"].check(kind)]


@pytest.fixture
def handler() -> Handler:
    return Handler()


TRANSACTION = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


# ----------------------------------------------------------------------------- connect


def test_greeting_and_session(handler: Handler) -> None:
    conn = Conn(handler)
    assert conn.read() == b"220 mx.example ESMTP\r\n"
    assert handler.calls == [("connect", SmtpSession("192.0.2.7", 40000, "", False, False))]


def test_ipv6_peer_and_tls_transport(handler: Handler) -> None:
    transport = StringTransport(peerAddress=IPv6Address("TCP", "2001:db8::5", 2525))
    directlyProvides(transport, ISSLTransport)
    Conn(handler, transport)
    assert handler.calls[0][1] == SmtpSession("2001:db8::5", 2525, "", False, True)


def test_connect_refused_by_handler_waits_for_quit(handler: Handler) -> None:
    """RFC 5321 3.1: after a 554 greeting the server waits for QUIT and answers 503 to
    anything else (closing at once made some clients retry the connection at once)."""
    handler.connect = lambda session: Reply(554, "5.7.1", "Access denied for 192.0.2.7")
    conn = Conn(handler, idle_timeout=30)
    assert conn.read() == b"554 5.7.1 Access denied for 192.0.2.7\r\n"
    assert not conn.closing
    assert [line[:9] for line in conn.lines(b"EHLO c.example\r\n" + TRANSACTION)] == [
        b"503 5.5.1"
    ] * 4
    assert conn.lines(b"QUIT\r\n") == [b"221 2.0.0 Bye"]
    assert conn.closing
    assert handler.names() == ["connect"]


def test_a_refused_client_that_never_quits_is_closed(handler: Handler) -> None:
    handler.connect = lambda session: Reply(554, "5.7.1", "Access denied")
    conn = Conn(handler, idle_timeout=30, max_errors=3)
    conn.read()
    conn.send(b"HELO a\r\nHELO b\r\nHELO c\r\n")
    assert conn.lines()[-1].startswith(b"421 ") and conn.closing
    idle = Conn(handler, idle_timeout=30)
    idle.read()
    idle.clock.advance(31)
    assert idle.lines() == [b"421 4.4.2 mx.example Error: timeout exceeded"]
    assert idle.closing


def test_on_connect_exception_is_logged_and_answered_421(
    handler: Handler, log_events: list[dict[str, Any]]
) -> None:
    def boom(session: SmtpSession) -> Reply | None:
        raise ZeroDivisionError("bug")

    handler.connect = boom
    conn = Conn(handler)
    assert conn.read() == b"421 4.3.0 mx.example Error: local error in processing\r\n"
    assert conn.closing
    assert len(failures(log_events, ZeroDivisionError)) == 1


# ----------------------------------------------------------------------------- conversation


def test_session_reaches_handler_after_ehlo(handler: Handler) -> None:
    conn = Conn(handler)
    conn.read()
    lines = conn.lines(b"EHLO client.example\r\nMAIL FROM:<> SIZE=10 BODY=8BITMIME\r\n")
    assert lines == [
        b"250-mx.example",
        b"250-PIPELINING",
        b"250-SIZE 10000",
        b"250-8BITMIME",
        b"250 ENHANCEDSTATUSCODES",
        b"250 2.1.0 Ok",
    ]
    _, session, sender, params = handler.calls[-1]
    assert session == SmtpSession("192.0.2.7", 40000, "client.example", True, False)
    assert sender == ""
    assert params == {"SIZE": "10", "BODY": "8BITMIME"}


def test_full_transaction_with_coroutine_handler(handler: Handler) -> None:
    conn = Conn(handler)
    conn.read()
    lines = conn.lines(TRANSACTION + b"Subject: t\r\n\r\n..x\r\n.\r\nQUIT\r\n")
    assert lines == [
        b"250 2.1.0 Ok",
        b"250 2.1.5 Ok",
        b"354 End data with <CR><LF>.<CR><LF>",
        b"250 2.0.0 Ok: queued 15 octets",
        b"221 2.0.0 Bye",
    ]
    assert handler.calls[-1][2:] == ("a@example.org", ("b@example.net",), b"Subject: t\n\n.x\n")
    assert conn.closing


def test_handler_reply_is_sent_as_is(handler: Handler) -> None:
    handler.recipient = lambda recipient: Reply(550, "5.1.1", "<b@example.net>: unknown\nsorry")
    conn = Conn(handler)
    conn.read()
    assert conn.lines(TRANSACTION) == [
        b"250 2.1.0 Ok",
        b"550-5.1.1 <b@example.net>: unknown",
        b"550 5.1.1 sorry",
        b"554 5.5.1 Error: no valid recipients",
    ]


def test_eight_bit_command_bytes_never_break_the_session(handler: Handler) -> None:
    conn = Conn(handler)
    conn.read()
    lines = conn.lines(b"\xc3\xa9HLO x\r\nMAIL FROM:<\xc3\xa9@example.org>\r\n\x00\r\nNOOP\r\n")
    assert [line[:3] for line in lines] == [b"500", b"501", b"500", b"250"]
    assert not conn.closing


# ----------------------------------------------------------------------------- pipelining


def test_pipelined_replies_stay_in_order_while_handler_is_pending(handler: Handler) -> None:
    pending: Deferred[Reply | None] = Deferred()
    handler.recipient = lambda recipient: pending
    conn = Conn(handler)
    conn.read()
    conn.send(TRANSACTION)
    assert conn.lines() == [b"250 2.1.0 Ok"]
    assert conn.transport.producerState == "paused"
    conn.send(b"body\r\n.\r\n")  # sent early by a sloppy client: must wait its turn too
    assert conn.lines() == []
    assert handler.names() == ["connect", "sender", "recipient"]
    pending.callback(None)
    assert conn.lines() == [
        b"250 2.1.5 Ok",
        b"354 End data with <CR><LF>.<CR><LF>",
        b"250 2.0.0 Ok: queued 5 octets",
    ]
    assert conn.transport.producerState == "producing"


def test_pending_message_holds_back_the_next_command(handler: Handler) -> None:
    pending: Deferred[Reply] = Deferred()
    handler.message = lambda data: pending
    conn = Conn(handler)
    conn.read()
    conn.send(TRANSACTION)
    conn.read()
    conn.send(b"x\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert conn.lines() == []
    pending.callback(Reply(250, "2.0.0", "Ok: queued as 1"))
    assert conn.lines() == [b"250 2.0.0 Ok: queued as 1", b"250 2.0.0 Ok", b"221 2.0.0 Bye"]


def test_reading_stops_only_when_input_waits_behind_the_handler(handler: Handler) -> None:
    """A client that waits for each reply is never paused (two system calls a message saved);
    one that sends more while the handler works is paused until the answer, then resumed."""
    pending: Deferred[Reply] = Deferred()
    handler.message = lambda data: pending
    conn = Conn(handler)
    conn.read()
    conn.send(TRANSACTION)
    conn.read()
    conn.send(b"x\r\n.\r\n")
    assert handler.names()[-1] == "message"
    assert conn.transport.producerState == "producing"
    # No idle clock while the gateway is the slow one (the session's limit stays).
    assert [c.getTime() for c in conn.clock.getDelayedCalls()] == [3600.0]
    conn.send(b"NOOP\r\n")
    assert conn.transport.producerState == "paused"
    assert conn.lines() == []
    pending.callback(Reply(250, "2.0.0", "Ok: queued as 1"))
    assert conn.lines() == [b"250 2.0.0 Ok: queued as 1", b"250 2.0.0 Ok"]
    assert conn.transport.producerState == "producing"
    assert len(conn.clock.getDelayedCalls()) == 2  # the idle clock runs again


def test_already_fired_deferreds_and_coroutines_are_handled_inline(handler: Handler) -> None:
    async def sender(address: str) -> Reply | None:
        return None

    handler.sender = sender
    handler.recipient = lambda recipient: succeed(None)
    conn = Conn(handler, max_junk=1000)  # 500 RSETs without mail would be junk otherwise
    conn.read()
    many = b"".join(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRSET\r\n" for _ in range(500)
    )
    lines = conn.lines(many)
    assert lines == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.0.0 Ok"] * 500


# ----------------------------------------------------------------------------- handler failures


def test_handler_exception_gives_451_and_session_goes_on(
    handler: Handler, log_events: list[dict[str, Any]]
) -> None:
    def boom(sender: str) -> Reply | None:
        raise KeyError("broken")

    handler.sender = boom
    conn = Conn(handler)
    conn.read()
    assert conn.lines(b"MAIL FROM:<a@example.org>\r\nNOOP\r\n") == [
        b"451 4.3.0 Local error in processing",
        b"250 2.0.0 Ok",
    ]
    assert not conn.closing
    assert len(failures(log_events, KeyError)) == 1


def test_failed_deferred_gives_451(handler: Handler, log_events: list[dict[str, Any]]) -> None:
    pending: Deferred[Reply | None] = Deferred()
    handler.recipient = lambda recipient: pending
    conn = Conn(handler)
    conn.read()
    conn.send(TRANSACTION)
    conn.read()
    pending.errback(RuntimeError("database down"))
    assert conn.lines() == [
        b"451 4.3.0 Local error in processing",
        b"554 5.5.1 Error: no valid recipients",
    ]
    assert len(failures(log_events, RuntimeError)) == 1


def test_failing_coroutine_on_message_gives_451(
    handler: Handler, log_events: list[dict[str, Any]]
) -> None:
    async def message(data: bytes) -> Reply:
        await fail(ValueError("spool full"))
        raise AssertionError("not reached")

    handler.message = message
    conn = Conn(handler)
    conn.read()
    assert conn.lines(TRANSACTION + b"x\r\n.\r\n")[-1] == b"451 4.3.0 Local error in processing"
    assert len(failures(log_events, ValueError)) == 1


def test_handler_returning_a_non_reply_gives_451(
    handler: Handler, log_events: list[dict[str, Any]]
) -> None:
    handler.message = lambda data: succeed(None)
    conn = Conn(handler)
    conn.read()
    assert conn.lines(TRANSACTION + b"x\r\n.\r\n")[-1] == b"451 4.3.0 Local error in processing"
    assert any("not a Reply" in e.get("log_format", "") for e in log_events)


def test_unexpected_internal_error_closes_with_421(
    handler: Handler, log_events: list[dict[str, Any]]
) -> None:
    conn = Conn(handler)
    conn.read()

    def broken() -> None:
        raise MemoryError("simulated")

    conn.protocol._codec.next_event = broken  # type: ignore[method-assign,assignment]
    conn.send(b"NOOP\r\n")
    assert conn.lines() == [b"421 4.3.0 mx.example Error: local error in processing"]
    assert conn.closing
    assert len(failures(log_events, MemoryError)) == 1


# ----------------------------------------------------------------------------- limits and time


def test_message_over_max_size_is_refused_without_handler_call(handler: Handler) -> None:
    conn = Conn(handler, max_size=1000)
    conn.read()
    conn.send(TRANSACTION)
    conn.read()
    for _ in range(100):
        conn.send(b"z" * 98 + b"\r\n")
    assert conn.read() == b""
    assert conn.lines(b".\r\n") == [b"552 5.3.4 Message size exceeds fixed maximum message size"]
    assert "message" not in handler.names()


def test_size_parameter_over_limit(handler: Handler) -> None:
    conn = Conn(handler, max_size=1000)
    conn.read()
    assert conn.lines(b"MAIL FROM:<a@example.org> SIZE=1001\r\n") == [
        b"552 5.3.4 Message size exceeds fixed maximum message size"
    ]
    assert handler.names() == ["connect"]


def test_too_many_recipients(handler: Handler) -> None:
    conn = Conn(handler, max_recipients=1)
    conn.read()
    lines = conn.lines(TRANSACTION.replace(b"DATA", b"RCPT TO:<c@example.net>"))
    assert lines[-1] == b"452 4.5.3 Too many recipients"


def test_too_many_errors(handler: Handler, log_events: list[dict[str, Any]]) -> None:
    conn = Conn(handler, max_errors=2)
    conn.read()
    assert conn.lines(b"BOGUS\r\nRCPT TO:<x@y.z>\r\nNOOP\r\n") == [
        b"500 5.5.2 Error: command not recognized",
        b"503 5.5.1 Error: need MAIL command",
        b"421 4.7.0 mx.example Error: too many errors",
    ]
    assert conn.closing
    assert any(
        e.get("log_format", "").startswith("SMTP session with {peer} closed") and e["code"] == 421
        for e in log_events
    )


def test_command_line_too_long(handler: Handler) -> None:
    conn = Conn(handler)
    conn.read()
    assert conn.lines(b"MAIL FROM:<" + b"a" * 3000 + b"@example.org>\r\nNOOP\r\n") == [
        b"500 5.5.2 Error: line too long",
        b"250 2.0.0 Ok",
    ]


def test_idle_timeout(handler: Handler) -> None:
    conn = Conn(handler, idle_timeout=300)
    conn.read()
    conn.clock.advance(200)
    conn.send(b"NOOP\r\n")
    conn.clock.advance(200)
    assert conn.lines() == [b"250 2.0.0 Ok"]
    assert not conn.closing
    conn.clock.advance(100)
    assert conn.lines() == [b"421 4.4.2 mx.example Error: timeout exceeded"]
    assert conn.closing
    assert not conn.clock.getDelayedCalls()


def test_idle_timer_stops_while_the_handler_works(handler: Handler) -> None:
    pending: Deferred[Reply] = Deferred()
    handler.message = lambda data: pending
    conn = Conn(handler, idle_timeout=300)
    conn.read()
    conn.send(TRANSACTION + b"x\r\n.\r\n")
    conn.read()
    conn.clock.advance(1000)
    assert conn.read() == b""
    pending.callback(Reply(250, "2.0.0", "Ok"))
    assert conn.lines() == [b"250 2.0.0 Ok"]
    conn.clock.advance(299)
    assert not conn.closing
    conn.clock.advance(1)
    assert conn.lines() == [b"421 4.4.2 mx.example Error: timeout exceeded"]


def test_a_client_that_reads_no_replies_stops_being_answered_and_read(handler: Handler) -> None:
    """Defect: every pipelined command was answered at once, whatever the client read,
    so 28 MB of NOOPs from a client that read nothing grew the gateway by 220 MB."""
    transport = SmallBufferTransport(PEER)
    conn = Conn(handler, transport)
    assert transport.producer is conn.protocol and transport.streaming
    transport.drain()
    # HELP: not a junk command, so only the flow control can stop it.
    conn.send(b"EHLO client.example\r\n" + b"HELP\r\n" * 100)  # a little is read on
    assert len(transport.value()) < 2000
    assert transport.producerState == "producing"
    conn.send(b"HELP\r\n" * 19_900)
    assert len(transport.value()) < 2000
    assert transport.producerState == "paused"  # much more: no more reading either
    answered = 0
    for _ in range(5000):
        answered += transport.drain().count(b"214 2.0.0 Commands")
        if answered == 20_000:
            break
    assert answered == 20_000
    assert transport.producerState == "producing"
    # The session goes on as usual.
    assert conn.lines(TRANSACTION + b"x\r\n.\r\n")[-1].startswith(b"250 2.0.0 Ok")


def test_idle_timeout_aborts_a_client_that_reads_nothing(handler: Handler) -> None:
    transport = SmallBufferTransport(PEER)
    conn = Conn(handler, transport, idle_timeout=30)
    conn.send(b"HELP\r\n" * 100)
    assert transport.full
    conn.clock.advance(31)
    # loseConnection would wait for a write buffer that never drains.
    assert transport.disconnecting and transport.disconnected


def test_connection_lost_mid_data_delivers_nothing(handler: Handler) -> None:
    conn = Conn(handler)
    conn.read()
    conn.send(TRANSACTION + b"partial message\r\n")
    conn.protocol.connectionLost(Failure(ConnectionResetError()))
    conn.send(b".\r\n")
    assert "message" not in handler.names()
    assert not conn.clock.getDelayedCalls()


def test_connection_lost_while_handler_pending_writes_nothing(handler: Handler) -> None:
    pending: Deferred[Reply] = Deferred()
    handler.message = lambda data: pending
    conn = Conn(handler)
    conn.read()
    conn.send(TRANSACTION + b"x\r\n.\r\nQUIT\r\n")
    conn.read()
    conn.protocol.connectionLost(Failure(ConnectionResetError()))
    pending.callback(Reply(250, "2.0.0", "Ok"))
    assert conn.read() == b""
    assert conn.transport.producerState == "paused"  # never resumed after the loss


def test_factory_validates_its_settings(handler: Handler) -> None:
    clock = MemoryReactorClock()
    with pytest.raises(ValueError, match="max_size"):
        SmtpServerFactory(handler, reactor=clock, hostname="mx", max_size=-1)
    with pytest.raises(ValueError, match="hostname"):
        SmtpServerFactory(handler, reactor=clock, hostname="bad host", max_size=1)
    with pytest.raises(ValueError, match="idle_timeout"):
        SmtpServerFactory(handler, reactor=clock, hostname="mx", max_size=1, idle_timeout=0)


def test_factory_builds_server_protocols(handler: Handler) -> None:
    factory = SmtpServerFactory(handler, reactor=MemoryReactorClock(), hostname="mx", max_size=1)
    protocol = factory.buildProtocol(PEER)
    assert isinstance(protocol, SmtpServerProtocol)
    assert protocol.factory is factory


def test_server_does_not_end_data_at_bare_lf_dot() -> None:
    """Defect: the server shell took "\\n.\\n" as the end of the data and asked the handler
    about the smuggled sender."""
    handler = Handler()
    conn = Conn(handler)
    conn.read()
    smuggled = b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nforged\r\n"
    conn.send(TRANSACTION + b"Subject: hi\r\n\r\nbody\n.\n" + smuggled)
    assert handler.names() == ["connect", "sender", "recipient"]
    conn.send(b".\r\n")
    assert handler.names() == ["connect", "sender", "recipient", "message"]
    assert b"ceo@bank.example" in handler.calls[-1][4]


# ----------------------------------------------------------------------------- slow clients


def test_a_command_trickled_a_byte_a_second_is_cut_at_the_idle_timeout(handler: Handler) -> None:
    """Defect: every byte restarted the idle timer, so a client sending one byte a second
    held its session for ever (10 of 10 still open after 40 s on a 5 s timeout)."""
    conn = Conn(handler, idle_timeout=5)
    conn.read()
    for byte in b"EHLO slow.client.test":
        conn.send(bytes([byte]))
        conn.clock.advance(1)
        if conn.closing:
            break
    assert conn.closing
    assert conn.lines() == [b"421 4.4.2 mx.example Error: timeout exceeded"]
    assert conn.clock.seconds() <= 6


def test_commands_that_come_whole_keep_the_session(handler: Handler) -> None:
    conn = Conn(handler, idle_timeout=5)
    conn.read()
    for _ in range(10):
        conn.clock.advance(4)
        assert conn.lines(b"NOOP\r\n") == [b"250 2.0.0 Ok"]
    assert not conn.closing


def test_content_keeps_the_session_until_the_transfer_deadline(handler: Handler) -> None:
    """Each read of DATA counts as activity (Postfix's smtpd_timeout is per read), but
    the whole message must arrive within transfer_timeout."""
    conn = Conn(handler, idle_timeout=5, transfer_timeout=60, max_size=0)
    conn.read()
    conn.send(TRANSACTION)
    assert conn.lines()[-1].startswith(b"354")
    for _ in range(59):
        conn.send(b"x")
        conn.clock.advance(1)
    assert not conn.closing
    conn.send(b"x")
    conn.clock.advance(1)
    assert conn.closing
    assert conn.lines() == [b"421 4.4.2 mx.example Error: timeout exceeded"]
    assert handler.names()[-1] == "recipient"  # nothing was handed on


def test_the_session_ends_at_its_deadline_but_not_in_the_middle_of_a_message(
    handler: Handler,
) -> None:
    pending: Deferred[Reply] = Deferred()
    handler.message = lambda data: pending
    conn = Conn(handler, idle_timeout=30, session_timeout=100)
    conn.read()
    for _ in range(4):
        conn.clock.advance(20)
        conn.lines(b"NOOP\r\n")
    conn.send(TRANSACTION + b"x\r\n.\r\n")
    conn.read()
    conn.clock.advance(25)  # past the deadline while the gateway handles the message
    assert not conn.closing
    pending.callback(Reply(250, "2.0.0", "Ok: queued as 1"))
    assert conn.lines() == [b"250 2.0.0 Ok: queued as 1"]
    conn.clock.advance(1)
    assert conn.closing
    assert conn.lines() == [b"421 4.4.2 mx.example Error: timeout exceeded"]
