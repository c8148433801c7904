"""Twisted NNTP server: a thin shell that moves bytes between a transport and ServerCodec.

Decisions (who may connect, which credentials are good, which articles are
wanted and what becomes of them) belong to an NntpHandler.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IPushProducer, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from .._line_server import Clock, IdleTimer, await_, describe_peer
from .codec import (
    ArticleReceived,
    AuthRequest,
    OfferRequest,
    Response,
    SendResponse,
    ServerCodec,
)

__all__ = [
    "LOCAL_ERROR",
    "NntpHandler",
    "NntpServerFactory",
    "NntpServerProtocol",
    "NntpSession",
    "Response",
]

log = Logger()

# Input kept while the client reads no replies, before reading from it stops too.
# Reading goes on below it: a TLS transport buffers writes (and pauses its
# producer) until its handshake is done, and the handshake needs reading.
_READ_AHEAD = 64 * 1024

# A handler failed: answer "try again later" in the terms of each command.
LOCAL_ERROR = {
    "AUTHINFO": Response(403, "Internal fault while checking the credentials"),
    "IHAVE": Response(436, "Internal fault, try again later"),
    "CHECK": Response(431, "Internal fault, try again later"),
    # 441 is all POST has; "436" inside tells a posting program to retry.
    "POST": Response(441, "436 Internal fault, posting failed; try again later"),
    # TAKETHIS has no "try later" code: 400 closes the connection and the
    # peer keeps every article it has not seen acknowledged.
    "TAKETHIS": Response(400, "Internal fault, closing the connection"),
}


@dataclass(frozen=True, slots=True)
class NntpSession:
    """What a handler knows about the client it is deciding for."""

    peer_host: str
    peer_port: int
    user: str | None
    tls: bool


class NntpHandler(TypingProtocol):
    """The decisions behind an NNTP listener. Methods may return plain values or awaitables."""

    def on_connect(self, session: NntpSession) -> Response | None:
        """None accepts the connection; a Response refuses it (sent, then the link closes)."""

    def on_auth(
        self, session: NntpSession, user: str, password: str
    ) -> Response | Awaitable[Response]:
        """281 accepts the credentials, 481 refuses them."""

    def on_offer(
        self, session: NntpSession, command: str, message_id: str
    ) -> Response | Awaitable[Response]:
        """IHAVE: 335, 435 or 436; CHECK: 238, 431 or 438."""

    def on_article(
        self, session: NntpSession, command: str, message_id: str, data: bytes
    ) -> Awaitable[Response]:
        """data is un-stuffed with LF line endings; the response is sent as is."""


class _Clock(Clock, TypingProtocol):
    def seconds(self) -> float: ...


class _Transport(TypingProtocol):
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def getPeer(self) -> object: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


def _command_of(request: AuthRequest | OfferRequest | ArticleReceived) -> str:
    return "AUTHINFO" if isinstance(request, AuthRequest) else request.command


@implementer(IPushProducer)
class NntpServerProtocol(Protocol):
    """One NNTP server connection.

    It is the push producer of its own transport: when the client stops
    reading replies and the transport's write buffer fills, the transport
    pauses it, and it stops answering until the buffer drains, and stops
    reading once ``_READ_AHEAD`` octets of commands wait; so a client that
    pipelines commands without reading the answers costs a bounded amount of
    memory.
    """

    def __init__(self, factory: NntpServerFactory) -> None:
        self._factory = factory
        self._codec = ServerCodec(
            hostname=factory.hostname,
            posting=factory.posting,
            auth_available=factory.auth_available,
            auth_required=factory.auth_required,
            max_size=factory.max_size,
            clock=factory.clock.seconds,
        )
        self._open = False  # connected and not closing: the only state in which we write
        self._waiting = False  # a handler call is outstanding
        self._pumping = False
        self._paused = False  # reading from the transport is paused
        self._write_blocked = False  # the transport's write buffer is full
        self._idle = IdleTimer(factory.clock, self._timed_out)
        self._peer_host = ""
        self._peer_port = 0
        self._tls = False

    @property
    def session(self) -> NntpSession:
        return NntpSession(
            peer_host=self._peer_host,
            peer_port=self._peer_port,
            user=self._codec.user,
            tls=self._tls,
        )

    @property
    def peer(self) -> str:
        return describe_peer(self._peer_host, self._peer_port)

    @property
    def busy(self) -> bool:
        """An article is being received or handled."""
        return self._open and (self._codec.busy or self._waiting)

    def _transport(self) -> _Transport:
        return cast(_Transport, self.transport)

    def connectionMade(self) -> None:
        self._open = True
        self._transport().registerProducer(self, True)
        address = self._transport().getPeer()
        if isinstance(address, (IPv4Address, IPv6Address)):
            self._peer_host, self._peer_port = address.host, address.port
        self._tls = bool(ISSLTransport.providedBy(self.transport))
        try:
            refusal = self._factory.handler.on_connect(self.session)
        except Exception:
            log.failure(
                "NNTP handler on_connect failed for {peer}", peer=self.peer, level=LogLevel.error
            )
            refusal = self._codec.abort()
        if refusal is not None:
            self._codec.close()
            self._write(refusal.to_bytes())
            self._close()
            return
        self._write(self._codec.greeting().to_bytes())
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if not self._open:
            return
        self._codec.receive_data(data)
        if not self._waiting:
            self._arm_timer()
        self._pump()

    def close_with(self, response: Response) -> None:
        """Send ``response`` (a 400, say) and close, whatever the session is doing."""
        self._write(response.to_bytes())
        self._close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._factory.connections.discard(self)
        if self._codec.busy or self._waiting:
            log.debug(
                "NNTP connection from {peer} lost during a transfer: {reason}",
                peer=self.peer,
                reason=reason.getErrorMessage(),
            )
        self._open = False
        self._idle.stop()
        self._codec.close()

    # ----------------------------------------------------------------- IPushProducer

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: answer nothing more until it drains."""
        self._write_blocked = True
        self._update_flow()

    def resumeProducing(self) -> None:
        """The client read what was written: go on with the commands buffered meanwhile."""
        if not self._write_blocked:
            return
        self._write_blocked = False
        if not self._waiting:
            self._arm_timer()  # the client is reading: that is activity
        self._pump()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the rest."""

    # ----------------------------------------------------------------- the loop

    def _pump(self) -> None:
        # Re-entered when a handler's Deferred has already fired inside _call_handler;
        # the outer loop then picks up the answer, which keeps responses in order.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._open and not self._waiting and not self._write_blocked:
                event = self._codec.next_event()
                if event is None:
                    break
                if isinstance(event, SendResponse):
                    self._write(event.to_bytes())
                    if event.close:
                        self._close()
                else:
                    self._call_handler(event)
            self._update_flow()
        except Exception:
            self._crash()
        finally:
            self._pumping = False

    def _crash(self) -> None:
        log.failure("NNTP server error on the connection from {peer}", peer=self.peer)
        self._write(self._codec.abort().to_bytes())
        self._close()

    def _call_handler(self, event: AuthRequest | OfferRequest | ArticleReceived) -> None:
        handler = self._factory.handler
        session = self.session
        result: object
        try:
            if isinstance(event, AuthRequest):
                result = handler.on_auth(session, event.user, event.password)
            elif isinstance(event, OfferRequest):
                result = handler.on_offer(session, event.command, event.message_id)
            else:
                result = handler.on_article(session, event.command, event.message_id, event.data)
        except Exception:
            log.failure(
                "NNTP handler failed on {command} for {peer}",
                command=_command_of(event),
                peer=self.peer,
                level=LogLevel.error,
            )
            self._codec.answer(LOCAL_ERROR[_command_of(event)])
            return
        if inspect.isawaitable(result):
            self._waiting = True
            deferred: Deferred[Any] = Deferred.fromCoroutine(await_(result))
            deferred.addCallbacks(
                self._handler_done,
                self._handler_failed,
                callbackArgs=(event,),
                errbackArgs=(event,),
            )
            return
        self._answer(result, event)

    def _answer(self, result: object, event: AuthRequest | OfferRequest | ArticleReceived) -> None:
        if isinstance(result, Response):
            self._codec.answer(result)
            return
        log.error(
            "NNTP handler returned {result!r} for {command}, which is not a Response",
            result=result,
            command=_command_of(event),
        )
        self._codec.answer(LOCAL_ERROR[_command_of(event)])

    def _handler_done(
        self, result: object, event: AuthRequest | OfferRequest | ArticleReceived
    ) -> None:
        self._waiting = False
        if not self._open or self._codec.pending is None:
            return  # the client went away; nothing may be written for it
        try:
            self._answer(result, event)
        except Exception:
            self._crash()
            return
        self._pump()

    def _handler_failed(
        self, failure: Failure, event: AuthRequest | OfferRequest | ArticleReceived
    ) -> None:
        log.failure(
            "NNTP handler failed on {command} for {peer}",
            failure=failure,
            command=_command_of(event),
            peer=self.peer,
            level=LogLevel.error,
        )
        self._waiting = False
        if not self._open or self._codec.pending is None:
            return
        try:
            self._codec.answer(LOCAL_ERROR[_command_of(event)])
        except Exception:
            self._crash()
            return
        self._pump()

    # ----------------------------------------------------------------- transport and time

    def _write(self, data: bytes) -> None:
        if self._open:
            self._transport().write(data)

    def _close(self, *, abort: bool = False) -> None:
        """Close after what was written is sent; ``abort`` drops it and closes now."""
        if not self._open:
            return
        self._open = False
        self._idle.stop()
        self._codec.close()
        # A transport closes only once its producer is gone (TLS waits for that,
        # TCP when the producer is paused as its buffer drains).
        self._transport().unregisterProducer()
        if abort:
            self._transport().abortConnection()
        else:
            self._transport().loseConnection()

    def _update_flow(self) -> None:
        """Stop reading while the handler is slow or the client reads no replies;
        stop the idle clock only while the handler, not the client, is slow."""
        if not self._open:
            return
        if self._waiting:
            self._idle.stop()
        elif not self._idle.running:
            self._arm_timer()
        pause = self._waiting or (self._write_blocked and self._codec.buffered >= _READ_AHEAD)
        if pause and not self._paused:
            self._paused = True
            self._transport().pauseProducing()
        elif not pause and self._paused:
            self._paused = False
            self._transport().resumeProducing()

    def _arm_timer(self) -> None:
        # The factory's timeout is read each time: a reconfigured listener changes it.
        if self._open:
            self._idle.restart(self._factory.idle_timeout)

    def _timed_out(self) -> None:
        if not self._open or self._waiting:
            return
        log.info(
            "NNTP client {peer} sent nothing for {timeout}s; closing the connection",
            peer=self.peer,
            timeout=self._factory.idle_timeout,
        )
        self._write(self._codec.timeout().to_bytes())
        # A client that reads nothing would keep the connection open until the
        # write buffer drains, that is forever.
        self._close(abort=self._write_blocked)


class NntpServerFactory(Factory):
    """Builds NntpServerProtocol instances that share one handler and one set of limits.

    max_size is the largest article accepted, in octets with LF line endings
    (0: no limit).  auth_available offers AUTHINFO USER/PASS; auth_required
    answers 480 to every transfer command until the client authenticated.
    """

    noisy = False

    def __init__(
        self,
        handler: NntpHandler,
        *,
        reactor: IReactorTime,
        hostname: str,
        max_size: int,
        idle_timeout: float = 300.0,
        posting: bool = True,
        auth_available: bool = False,
        auth_required: bool = False,
    ) -> None:
        if max_size < 0:
            raise ValueError(f"max_size must be 0 (no limit) or a positive size, not {max_size}")
        if idle_timeout <= 0:
            raise ValueError(
                f"idle_timeout must be a positive number of seconds, not {idle_timeout}"
            )
        if not hostname or any(not 33 <= ord(c) <= 126 for c in hostname):
            raise ValueError(f"hostname must be a non-empty ASCII host name, not {hostname!r}")
        if auth_required and not auth_available:
            raise ValueError("require_auth needs at least one user to authenticate")
        self.handler = handler
        self.reactor = reactor
        self.clock = cast(_Clock, reactor)
        self.hostname = hostname
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.posting = posting
        self.auth_available = auth_available
        self.auth_required = auth_required
        # Open connections, so a shutdown can tell idle sessions to go away.
        self.connections: set[NntpServerProtocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> NntpServerProtocol:
        protocol = NntpServerProtocol(self)
        protocol.factory = self
        self.connections.add(protocol)
        return protocol
