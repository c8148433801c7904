"""The SMTP listener: the gateway's side of the SMTP server.

The protocol code in ``server.py`` parses the conversation; this module makes
the decisions: who may connect, which recipients some route takes (the gateway
is never an open relay), and what to answer once the message is handled.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger

from gateway.config import SmtpListenerConfig, client_allowed
from gateway.destination import Status
from gateway.message import MailMessage, new_message_id
from gateway.protocols._line_server import drain_sessions
from gateway.protocols.smtp.server import Reply, SmtpServerFactory, SmtpSession
from gateway.stats import Histogram

if TYPE_CHECKING:
    from gateway.service import GatewayService

log = Logger(namespace="gateway.smtp.listener")


def _received(
    config: SmtpListenerConfig, session: SmtpSession, qid: str, recipients: tuple[str, ...]
) -> bytes:
    helo = session.helo or "unknown"
    proto = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        proto += "S"
    lines = [
        f"Received: from {helo} ([{session.peer_host}])",
        f"\tby {config.hostname} (gateway) with {proto} id {qid}",
    ]
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>")
    lines[-1] += f"; {_date(int(time.time()))}"
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


_dates: dict[int, str] = {}


def _date(second: int) -> str:
    """The RFC 5322 local date of ``second``, made once per second."""
    date = _dates.get(second)
    if date is None:
        if len(_dates) > 16:
            _dates.clear()
        date = _dates[second] = email.utils.formatdate(second, localtime=True)
    return date


_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")


def _status(enhanced: str, klass: str, default: str) -> str:
    """``enhanced`` in the class of the reply code (RFC 3463 section 2), else ``default``."""
    if not _ENHANCED.match(enhanced):
        return default
    return klass + enhanced[1:] if enhanced[0] != "2" else default


class SmtpListener:
    """Implements the server's SmtpHandler for one configured listener."""

    def __init__(self, config: SmtpListenerConfig, gateway: GatewayService) -> None:
        self.config = config
        self.gateway = gateway
        # For /metrics: messages by the reply they got, and the time to that reply.
        self.accepted = 0
        self.rejected = 0
        self.tempfail = 0
        self.recipients_refused = 0
        self.duration = Histogram()

    def on_connect(self, session: SmtpSession) -> Reply | None:
        if self.gateway.stopping:
            return Reply(421, "4.3.2", f"{self.config.hostname} Service shutting down")
        if not client_allowed(self.config.allow, session.peer_host):
            log.info(
                "listener {listener} refused client {client}: not in allow",
                listener=self.config.name,
                client=session.peer_host,
            )
            return Reply(554, "5.7.1", f"Access denied for {session.peer_host}")
        return None

    def on_sender(
        self, session: SmtpSession, sender: str, params: Mapping[str, str | None]
    ) -> Reply | None:
        if self.gateway.stopping:
            # A 421 from the handler ends the session once it is sent.
            return Reply(421, "4.3.2", f"{self.config.hostname} Service shutting down")
        return None

    def on_recipient(
        self, session: SmtpSession, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> Reply | None:
        router = self.gateway.current().router
        if router.accepts_recipient(self.config.name, sender, recipient, session.peer_host):
            return None
        self.recipients_refused += 1
        log.info(
            "listener {listener} refused recipient {rcpt} from {client}: no route",
            listener=self.config.name,
            rcpt=recipient,
            client=session.peer_host,
        )
        return Reply(
            550, "5.1.1", f"<{recipient}>: Recipient address rejected: no route for it here"
        )

    async def on_message(
        self, session: SmtpSession, sender: str, recipients: tuple[str, ...], data: bytes
    ) -> Reply:
        qid = new_message_id()
        message = MailMessage.from_bytes(
            _received(self.config, session, qid, recipients) + data,
            sender=sender,
            recipients=recipients,
            id=qid,
            listener=self.config.name,
            client=session.peer_host,
        )
        clock = self.gateway.reactor.seconds
        started = clock()
        verdict = await self.gateway.submit(message)
        self.duration.observe(clock() - started)
        if verdict.status is Status.DELIVERED:
            self.accepted += 1
            return Reply(250, "2.0.0", f"Ok: queued as {qid}")
        if verdict.status is Status.TEMPORARY:
            self.tempfail += 1
            code = verdict.code if 400 <= verdict.code < 500 else 451
            status = _status(verdict.enhanced, "4", "4.3.0")
            return Reply(code, status, f"Try again later: {verdict.detail}")
        self.rejected += 1
        # The code comes from a destination or a transform's Reject: anything but a 5xx
        # would acknowledge (2xx, 3xx) or defer (4xx) a message that was not stored.
        code = verdict.code if 500 <= verdict.code < 600 else 554
        return Reply(code, _status(verdict.enhanced, "5", "5.0.0"), verdict.detail)


class ListenerFactory(SmtpServerFactory):
    """The server factory with the listener's settings, replaceable on reload."""

    listener: SmtpListener

    def reconfigure(self, config: SmtpListenerConfig) -> None:
        self.listener.config = config
        self.hostname = config.hostname
        self.max_size = config.max_size
        self.max_recipients = config.max_recipients
        self.idle_timeout = config.idle_timeout

    async def drain(self, timeout: float) -> None:
        """Close idle sessions now; give busy ones ``timeout`` seconds to finish their message."""
        reply = Reply(421, "4.3.2", f"{self.hostname} Service shutting down")
        await drain_sessions(
            self.connections, self.reactor, timeout, lambda session: session.close_with(reply)
        )


def build_factory(
    config: SmtpListenerConfig, gateway: GatewayService, reactor: IReactorCore
) -> ListenerFactory:
    listener = SmtpListener(config, gateway)
    reactor_time: IReactorTime = reactor
    factory = ListenerFactory(
        listener,
        reactor=reactor_time,
        hostname=config.hostname,
        max_size=config.max_size,
        max_recipients=config.max_recipients,
        idle_timeout=config.idle_timeout,
    )
    factory.listener = listener
    return factory
