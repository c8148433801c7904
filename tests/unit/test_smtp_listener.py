"""The SMTP listener's decisions: what it answers once the gateway has handled a message."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from gateway.listening import Admission
from gateway.ports import Reason, Status, Verdict
from gateway.protocols.smtp.codec import RcptRequest, Reply, ServerCodec
from gateway.protocols.smtp.config import SmtpListenerConfig
from gateway.protocols.smtp.listener import SmtpListener
from gateway.protocols.smtp.server import SmtpSession
from tests.support.port import FakePort, runtime_of


def _answer(verdict: Verdict) -> Reply:
    config = SmtpListenerConfig(name="mail-in", listen=(), hostname="gw.test")
    gateway = FakePort(verdict=verdict)
    listener = SmtpListener(config, gateway, gateway.reactor)
    session = SmtpSession("192.0.2.7", 40000, "c.test", True, False)
    coroutine = listener.on_message(session, "a@example.org", ("b@example.net",), b"x\n")
    reply = asyncio.run(coroutine)  # type: ignore[arg-type]
    assert len(gateway.submitted) == 1
    return reply


@pytest.mark.parametrize("reason", list(Reason))
@pytest.mark.parametrize("status", [Status.PERMANENT, Status.TEMPORARY])
def test_every_refusal_is_answered_in_the_class_of_its_status(
    status: Status, reason: Reason
) -> None:
    """A message that was not stored is never acknowledged (2xx, 3xx), a permanent
    refusal is a 5xx and a temporary one a 4xx, and the enhanced status is of the same
    class as the reply code (RFC 3463 section 2), whatever the reason."""
    reply = _answer(Verdict(status, reason, "why"))
    klass = "5" if status is Status.PERMANENT else "4"
    assert str(reply.code).startswith(klass) and reply.status.startswith(klass + ".")
    assert b"why" in reply.to_bytes()


@pytest.mark.parametrize(
    ("reason", "code", "enhanced"),
    [
        (Reason.NO_ROUTE, 550, "5.1.1"),
        (Reason.POLICY, 550, "5.7.1"),
        (Reason.TOO_BIG, 552, "5.3.4"),
        (Reason.BAD_ADDRESS, 553, "5.1.3"),
        (Reason.MISCONFIGURED, 554, "5.3.5"),
    ],
)
def test_permanent_reasons_get_their_smtp_codes(reason: Reason, code: int, enhanced: str) -> None:
    reply = _answer(Verdict(Status.PERMANENT, reason, "why"))
    assert (reply.code, reply.status) == (code, enhanced)


def test_a_full_spool_is_452_and_other_temporary_failures_451() -> None:
    full = _answer(Verdict(Status.TEMPORARY, Reason.UNAVAILABLE, "disk full"))
    assert (full.code, full.status) == (452, "4.3.1")
    broken = _answer(Verdict(Status.TEMPORARY, Reason.FAILED, "a transform failed"))
    assert (broken.code, broken.status) == (451, "4.3.0")


RELAY = """
version: 1
listeners:
  mail-in: {protocol: smtp, listen: "tcp:2525", hostname: gw.test}
destinations:
  smarthost: {protocol: smtp, connect: "tcp:127.0.0.1:2526"}
routes:
  - {from: mail-in, match: {rcpt: '@partner\\.test$'}, to: smarthost}
"""


@pytest.mark.parametrize(
    "recipient",
    ["user%evil.test@partner.test", '"user@evil.test"@partner.test', "evil.test!user@partner.test"],
)
def test_sender_specified_routing_is_refused(recipient: str) -> None:
    """Defect: these were accepted for the relay domain and passed to the smarthost as
    they were, which then sent the mail where the sender chose (evil.test)."""
    port = FakePort(runtime_of(RELAY))
    config = port.current().config.listeners["mail-in"]  # type: ignore[attr-defined]
    listener = SmtpListener(config, port, port.reactor)
    session = SmtpSession("192.0.2.7", 40000, "c.test", True, False)
    assert listener.on_recipient(session, "a@b.test", "user@partner.test", {}) is None
    reply = listener.on_recipient(session, "a@b.test", recipient, {})
    assert reply is not None and (reply.code, reply.status) == (550, "5.7.1")
    assert "sender-specified routing" in reply.text
    taken = SmtpListener(dataclasses.replace(config, allow_sender_routing=True), port, port.reactor)
    assert taken.on_recipient(session, "a@b.test", recipient, {}) is None


def test_the_codec_hands_quoted_local_parts_to_the_listener_as_written() -> None:
    codec = ServerCodec(hostname="gw.test", max_size=0)
    codec.receive_data(
        b'EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<"user@evil.test"@partner.test>\r\n'
    )
    assert codec.next_event() is not None  # EHLO's reply
    assert codec.next_event() is not None  # MAIL
    codec.answer(None)
    assert codec.next_event() is not None  # MAIL's 250
    request = codec.next_event()
    assert isinstance(request, RcptRequest)
    assert request.recipient == '"user@evil.test"@partner.test'


def test_clients_over_max_connections_get_421_4_7_0() -> None:
    """Defect: SMTP listeners had no connection limit ('max_connections' was an unknown
    key): 2,000 connections could be held for as long as the client liked."""
    port = FakePort()
    config = SmtpListenerConfig(name="mail-in", listen=(), hostname="gw.test", max_connections=2)
    listener = SmtpListener(config, port, port.reactor)
    greetings = []
    for n in range(3):
        peer = IPv4Address("TCP", "192.0.2.7", 40000 + n)
        protocol = listener.factory().buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        greetings.append(transport.value())
    assert [g[:3] for g in greetings] == [b"220", b"220", b"421"]
    assert greetings[2].startswith(b"421 4.7.0 gw.test Too many connections")
    assert listener.guard.refused[Admission.TOO_MANY] == 1
