"""Twisted SMTP server: a thin shell that moves bytes between a transport and ServerCodec.

Decisions (accept a sender, a recipient, a message) belong to an SmtpHandler.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from .._line_server import Clock, IdleTimer, await_, describe_peer
from .codec import (
    MailRequest,
    MessageReceived,
    RcptRequest,
    Reply,
    SendReply,
    ServerCodec,
)

__all__ = [
    "LOCAL_ERROR",
    "Reply",
    "SmtpHandler",
    "SmtpServerFactory",
    "SmtpServerProtocol",
    "SmtpSession",
]

log = Logger()

LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing")


@dataclass(frozen=True, slots=True)
class SmtpSession:
    """What a handler knows about the client it is deciding for."""

    peer_host: str
    peer_port: int
    helo: str
    esmtp: bool
    tls: bool


class SmtpHandler(TypingProtocol):
    """The decisions behind an SMTP listener. Methods may return plain values or awaitables."""

    def on_connect(self, session: SmtpSession) -> Reply | None:
        """None accepts the connection; a Reply refuses it (it is sent, then the link closes)."""

    def on_sender(
        self, session: SmtpSession, sender: str, params: Mapping[str, str | None]
    ) -> Reply | Awaitable[Reply | None] | None:
        """sender is "" for the null reverse-path; None means "250 2.1.0 Ok"."""

    def on_recipient(
        self, session: SmtpSession, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> Reply | Awaitable[Reply | None] | None:
        """None means "250 2.1.5 Ok"."""

    def on_message(
        self, session: SmtpSession, sender: str, recipients: tuple[str, ...], data: bytes
    ) -> Awaitable[Reply]:
        """data is dot-unstuffed with LF line endings; the reply is sent as is."""


class _Transport(TypingProtocol):
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def getPeer(self) -> object: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class SmtpServerProtocol(Protocol):
    """One SMTP server connection."""

    def __init__(self, factory: SmtpServerFactory) -> None:
        self._factory = factory
        self._codec = ServerCodec(
            hostname=factory.hostname,
            max_size=factory.max_size,
            max_recipients=factory.max_recipients,
            max_errors=factory.max_errors,
        )
        self._open = False  # connected and not closing: the only state in which we write
        self._waiting = False  # a handler call is outstanding
        self._pumping = False
        self._paused = False
        self._idle = IdleTimer(factory.clock, self._timed_out)
        self._peer_host = ""
        self._peer_port = 0
        self._tls = False
        self._session: SmtpSession | None = None

    @property
    def session(self) -> SmtpSession:
        session = self._session
        codec = self._codec
        if (
            session is None
            or session.helo != codec.helo
            or session.esmtp != codec.esmtp
            or session.tls != self._tls
        ):
            # Made again only when the client said EHLO/HELO again or started TLS.
            session = self._session = SmtpSession(
                peer_host=self._peer_host,
                peer_port=self._peer_port,
                helo=codec.helo,
                esmtp=codec.esmtp,
                tls=self._tls,
            )
        return session

    @property
    def peer(self) -> str:
        return describe_peer(self._peer_host, self._peer_port)

    def _transport(self) -> _Transport:
        return cast(_Transport, self.transport)

    def connectionMade(self) -> None:
        self._open = True
        address = self._transport().getPeer()
        if isinstance(address, (IPv4Address, IPv6Address)):
            self._peer_host, self._peer_port = address.host, address.port
        self._tls = bool(ISSLTransport.providedBy(self.transport))
        try:
            refusal = self._factory.handler.on_connect(self.session)
        except Exception:
            log.failure(
                "SMTP handler on_connect failed for {peer}", peer=self.peer, level=LogLevel.error
            )
            self._send(self._codec.abort())
            self._close()
            return
        if refusal is not None:
            if not isinstance(refusal, Reply):
                log.error(
                    "SMTP handler on_connect returned {result!r} instead of a Reply or None",
                    result=refusal,
                )
                refusal = self._codec.abort()
            self._codec.close()
            self._send(refusal)
            self._close()
            return
        self._send(self._codec.greeting())
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if not self._open:
            return
        try:
            self._codec.receive_data(data)
        except Exception:
            self._crash()
            return
        if not self._waiting:
            self._arm_timer()
        self._pump()

    @property
    def busy(self) -> bool:
        """A transaction or a handler call is in progress."""
        return self._open and (self._codec.in_transaction or self._waiting)

    def close_with(self, reply: Reply) -> None:
        """Send ``reply`` (a 421, say) and close, whatever the session is doing."""
        self._send(reply)
        self._close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._factory.connections.discard(self)
        if self._codec.in_transaction or self._waiting:
            log.debug(
                "SMTP connection from {peer} lost during a transaction: {reason}",
                peer=self.peer,
                reason=reason.getErrorMessage(),
            )
        self._open = False
        self._idle.stop()
        self._codec.close()

    # ----------------------------------------------------------------- the loop

    def _pump(self) -> None:
        # Re-entered when a handler's Deferred has already fired inside _call_handler;
        # the outer loop then picks up the answer, which keeps replies in order.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._open and not self._waiting:
                event = self._codec.next_event()
                if event is None:
                    break
                if isinstance(event, SendReply):
                    self._send(event.reply)
                    if event.close:
                        self._closing_reply(event.reply)
                else:
                    self._call_handler(event)
            self._update_flow()
        except Exception:
            self._crash()
        finally:
            self._pumping = False

    def _closing_reply(self, reply: Reply) -> None:
        if reply.code == 421:
            log.info(
                "SMTP session with {peer} closed: {code} {status} {text}",
                peer=self.peer,
                code=reply.code,
                status=reply.status,
                text=reply.text,
            )
        self._close()

    def _crash(self) -> None:
        log.failure("SMTP server error on the connection from {peer}", peer=self.peer)
        self._send(self._codec.abort())
        self._close()

    def _call_handler(self, event: MailRequest | RcptRequest | MessageReceived) -> None:
        handler = self._factory.handler
        session = self.session
        result: object
        try:
            if isinstance(event, MailRequest):
                name = "on_sender"
                result = handler.on_sender(session, event.sender, event.params)
            elif isinstance(event, RcptRequest):
                name = "on_recipient"
                result = handler.on_recipient(session, event.sender, event.recipient, event.params)
            else:
                name = "on_message"
                result = handler.on_message(session, event.sender, event.recipients, event.data)
        except Exception:
            log.failure(
                "SMTP handler {handler} failed for {peer}",
                handler=name,
                peer=self.peer,
                level=LogLevel.error,
            )
            self._codec.answer(LOCAL_ERROR)
            return
        if inspect.isawaitable(result):
            self._waiting = True
            deferred: Deferred[Any] = Deferred.fromCoroutine(await_(result))
            deferred.addCallbacks(
                self._handler_done,
                self._handler_failed,
                callbackArgs=(name,),
                errbackArgs=(name,),
            )
            return
        self._answer(result, name)

    def _answer(self, result: object, name: str) -> None:
        if isinstance(result, Reply) or (result is None and name != "on_message"):
            self._codec.answer(result)
            return
        log.error(
            "SMTP handler {handler} returned {result!r}, which is not a Reply",
            handler=name,
            result=result,
        )
        self._codec.answer(LOCAL_ERROR)

    def _handler_done(self, result: object, name: str) -> None:
        self._waiting = False
        if not self._open or self._codec.pending is None:
            return  # the client went away; nothing may be written or delivered for it
        try:
            self._answer(result, name)
        except Exception:
            self._crash()
            return
        self._pump()

    def _handler_failed(self, failure: Failure, name: str) -> None:
        log.failure(
            "SMTP handler {handler} failed for {peer}",
            failure=failure,
            handler=name,
            peer=self.peer,
            level=LogLevel.error,
        )
        self._waiting = False
        if not self._open or self._codec.pending is None:
            return
        try:
            self._codec.answer(LOCAL_ERROR)
        except Exception:
            self._crash()
            return
        self._pump()

    # ----------------------------------------------------------------- transport and time

    def _send(self, reply: Reply) -> None:
        if self._open:
            self._transport().write(reply.to_bytes())

    def _close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._idle.stop()
        self._codec.close()
        self._transport().loseConnection()

    def _update_flow(self) -> None:
        """Stop reading and stop the idle clock while the handler, not the client, is slow.

        Reading stops once input waits behind the handler's answer; a client that
        waits for each reply (most do) is never paused and resumed, which would
        cost two system calls per message.
        """
        if not self._open:
            return
        if self._waiting:
            self._idle.stop()
            if not self._paused and self._codec.buffered:
                self._paused = True
                self._transport().pauseProducing()
        else:
            if self._paused:
                self._paused = False
                self._transport().resumeProducing()
            if not self._idle.running:
                self._arm_timer()

    def _arm_timer(self) -> None:
        # The factory's timeout is read each time: a reconfigured listener changes it.
        if self._open:
            self._idle.restart(self._factory.idle_timeout)

    def _timed_out(self) -> None:
        if not self._open or self._waiting:
            return
        log.info(
            "SMTP client {peer} sent nothing for {timeout}s; closing the connection",
            peer=self.peer,
            timeout=self._factory.idle_timeout,
        )
        self._send(self._codec.timeout())
        self._close()


class SmtpServerFactory(Factory):
    """Builds SmtpServerProtocol instances that share one handler and one set of limits.

    max_size is the largest message accepted, in octets as RFC 1870 counts them (0: no
    limit); max_errors protocol errors end a session with 421.
    """

    noisy = False

    def __init__(
        self,
        handler: SmtpHandler,
        *,
        reactor: IReactorTime,
        hostname: str,
        max_size: int,
        max_recipients: int = 1000,
        idle_timeout: float = 300.0,
        max_errors: int = 20,
    ) -> None:
        if max_size < 0:
            raise ValueError(f"max_size must be 0 (no limit) or a positive size, not {max_size}")
        if max_recipients < 1:
            raise ValueError(f"max_recipients must be at least 1, not {max_recipients}")
        if idle_timeout <= 0:
            raise ValueError(
                f"idle_timeout must be a positive number of seconds, not {idle_timeout}"
            )
        if max_errors < 1:
            raise ValueError(f"max_errors must be at least 1, not {max_errors}")
        if not hostname or any(not 33 <= ord(c) <= 126 for c in hostname):
            raise ValueError(f"hostname must be a non-empty ASCII host name, not {hostname!r}")
        self.handler = handler
        self.reactor = reactor
        self.clock = cast(Clock, reactor)
        self.hostname = hostname
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.idle_timeout = idle_timeout
        self.max_errors = max_errors
        # Open connections, so a shutdown can tell idle sessions to go away.
        self.connections: set[SmtpServerProtocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> SmtpServerProtocol:
        protocol = SmtpServerProtocol(self)
        protocol.factory = self
        self.connections.add(protocol)
        return protocol
