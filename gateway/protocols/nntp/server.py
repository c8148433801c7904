"""Twisted NNTP server: a thin shell that moves bytes between a transport and ServerCodec.

Decisions (who may connect, which credentials are good, which articles are
wanted and what becomes of them) belong to an NntpHandler.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol as TypingProtocol
from typing import cast

from twisted.internet import task
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel

from gateway.listening import Admission, Guard, retry_after
from gateway.protocols._sink import DataSink, SpillingSink
from gateway.tls import ServerTls

from .._line_server import Clock, LineServerProtocol
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


# A TAKETHIS over the client's article_rate waits for its turn (the peer's stream slows
# to the rate, nothing is refused) unless that would take longer than this; then 400.
MAX_DELAY = 30.0


def _throttled(command: str, host: str, wait: float) -> Response:
    """The answer to an article or offer over the client's article_rate."""
    text = f"Too many articles from {host}, try again in {retry_after(wait)} seconds"
    if command == "CHECK":
        return Response(431, text)
    if command == "POST":
        return Response(441, f"436 {text}")
    if command == "TAKETHIS":
        return Response(400, text)
    return Response(436, text)  # IHAVE


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


def _command_of(request: AuthRequest | OfferRequest | ArticleReceived) -> str:
    return "AUTHINFO" if isinstance(request, AuthRequest) else request.command


class NntpServerProtocol(LineServerProtocol):
    """One NNTP server connection (the flow rules are LineServerProtocol's)."""

    kind = "NNTP"

    def __init__(self, factory: NntpServerFactory) -> None:
        super().__init__(
            factory,
            ServerCodec(
                hostname=factory.hostname,
                posting=factory.posting,
                auth_available=factory.auth_available,
                auth_required=factory.auth_required,
                max_size=factory.max_size,
                clock=factory.clock.seconds,
                sink=factory.sink,
                starttls=factory.tls is not None,
                require_tls=factory.tls is not None and factory.tls.require,
            ),
        )
        self._nntp_factory = factory
        self._nntp_codec = cast(ServerCodec, self._codec)

    @property
    def session(self) -> NntpSession:
        return NntpSession(
            peer_host=self._peer_host,
            peer_port=self._peer_port,
            user=self._nntp_codec.user,
            tls=self._tls,
        )

    def _in_progress(self) -> bool:
        return self._nntp_codec.busy

    def _refusal(self, admission: Admission) -> tuple[bytes, bool] | None:
        if admission is Admission.NOT_ALLOWED:
            return Response(502, f"Access denied for {self._peer_host}").to_bytes(), True
        if admission is Admission.TOO_MANY:
            # RFC 3977 5.1.1: 400 is "service temporarily unavailable".
            return Response(400, "Too many connections, try again later").to_bytes(), True
        if admission is Admission.CLIENT_CONNECTIONS:
            text = f"Too many connections from {self._peer_host}, try again later"
            return Response(400, text).to_bytes(), True
        if admission is Admission.CLIENT_RATE:
            wait = retry_after(self._nntp_factory.guard.retry_after)
            text = f"{self._peer_host} connects too often, try again in {wait} seconds"
            return Response(400, text).to_bytes(), True
        try:
            refusal = self._nntp_factory.handler.on_connect(self.session)
        except Exception:
            log.failure(
                "NNTP handler on_connect failed for {peer}", peer=self.peer, level=LogLevel.error
            )
            refusal = self._nntp_codec.abort()
        # RFC 3977 5.1.1: after 502 (or 400) at connection the server closes the connection.
        return None if refusal is None else (refusal.to_bytes(), True)

    def _handle_event(self, event: object) -> None:
        if isinstance(event, SendResponse):
            self._write(event.to_bytes())
            if event.start_tls:
                self._start_tls()
            elif event.close:
                self._close()
        else:
            self._call_handler(event)

    def _describe(self, event: AuthRequest | OfferRequest | ArticleReceived) -> str:
        return _command_of(event)

    def _ask(self, event: AuthRequest | OfferRequest | ArticleReceived) -> object:
        handler = self._nntp_factory.handler
        session = self.session
        if isinstance(event, AuthRequest):
            return handler.on_auth(session, event.user, event.password)
        guard = self._nntp_factory.guard
        if isinstance(event, OfferRequest):
            # An offer only looks at the rate: the article is counted when it arrives.
            wait = guard.over("article_rate", self._peer_host, session.user or "")
            if wait:
                return _throttled(event.command, self._peer_host, wait)
            return handler.on_offer(session, event.command, event.message_id)
        # A client that logged in is counted as its user, wherever it connects from.
        wait = guard.throttle("article_rate", self._peer_host, session.user or "")
        if not wait:
            return handler.on_article(session, event.command, event.message_id, event.data)
        if event.command == "TAKETHIS" and wait <= MAX_DELAY:
            return self._in_turn(event, wait)
        return _throttled(event.command, self._peer_host, wait)

    async def _in_turn(self, event: ArticleReceived, wait: float) -> object:
        """Take a streamed article once the client's article_rate lets it in."""
        waited = 0.0
        while wait and waited + wait <= MAX_DELAY:
            await task.deferLater(self._nntp_factory.reactor, wait, lambda: None)
            if not self._open:
                return LOCAL_ERROR[event.command]  # the peer went away; it keeps the article
            waited += wait
            wait = self._nntp_factory.guard.throttle(
                "article_rate", self._peer_host, self.session.user or ""
            )
        if wait:
            return _throttled(event.command, self._peer_host, wait)
        result = self._nntp_factory.handler.on_article(
            self.session, event.command, event.message_id, event.data
        )
        return await result if inspect.isawaitable(result) else result

    def _answer(self, result: object, event: AuthRequest | OfferRequest | ArticleReceived) -> None:
        if isinstance(result, Response):
            self._nntp_codec.answer(result)
            return
        log.error(
            "NNTP handler returned {result!r} for {command}, which is not a Response",
            result=result,
            command=_command_of(event),
        )
        self._nntp_codec.answer(LOCAL_ERROR[_command_of(event)])

    def _local_error(self, event: AuthRequest | OfferRequest | ArticleReceived) -> Response:
        return LOCAL_ERROR[_command_of(event)]


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
        transfer_timeout: float = 600.0,
        session_timeout: float = 0.0,
        posting: bool = True,
        auth_available: bool = False,
        auth_required: bool = False,
        guard: Guard[NntpServerProtocol] | None = None,
        sink: Callable[[], DataSink] = SpillingSink,
        tls: ServerTls | None = None,
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
        # A whole message must arrive within transfer_timeout, the whole session last at most
        # session_timeout (0: no limit); see LineServerProtocol.
        self.transfer_timeout = transfer_timeout
        self.session_timeout = session_timeout
        self.posting = posting
        self.auth_available = auth_available
        self.auth_required = auth_required
        # The listener's connection rules; its open connections let a shutdown tell idle
        # sessions to go away.
        self.guard: Guard[NntpServerProtocol] = guard or Guard(hostname, (), 2**31)
        # An article's content goes to a file beyond a few hundred KiB as it arrives.
        self.sink = sink
        # STARTTLS is offered when set; its require setting refuses articles before TLS.
        self.tls = tls

    @property
    def connections(self) -> set[NntpServerProtocol]:
        return self.guard.connections

    def buildProtocol(self, addr: IAddress | None) -> NntpServerProtocol:
        protocol = NntpServerProtocol(self)
        protocol.factory = self
        return protocol
