"""Twisted SMTP server: a thin shell that moves bytes between a transport and ServerCodec.

Decisions (accept a sender, a recipient, a message) belong to an SmtpHandler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol as TypingProtocol
from typing import cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel

from gateway.config import Network, client_allowed
from gateway.listening import Admission, Guard, retry_after
from gateway.protocols._sink import DataSink, SpillingSink
from gateway.tls import ServerTls, session_cipher

from .._line_server import Clock, LineServerProtocol
from .codec import (
    AuthRequest,
    MailRequest,
    MessageReceived,
    RcptRequest,
    Reply,
    Request,
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
    # "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)" once TLS is up, else "".
    cipher: str = ""
    user: str = ""  # the name the client logged in with (AUTH), else ""


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

    def on_auth(self, session: SmtpSession, user: str, password: str) -> Awaitable[Reply]:
        """235 accepts the credentials (the session's user is then ``user``), 535 refuses."""


_HANDLER_NAMES = {MailRequest: "on_sender", RcptRequest: "on_recipient", AuthRequest: "on_auth"}


class SmtpServerProtocol(LineServerProtocol):
    """One SMTP server connection (the flow rules are LineServerProtocol's)."""

    kind = "SMTP"

    def __init__(self, factory: SmtpServerFactory) -> None:
        super().__init__(
            factory,
            ServerCodec(
                hostname=factory.hostname,
                max_size=factory.max_size,
                max_recipients=factory.max_recipients,
                max_errors=factory.max_errors,
                max_junk=factory.max_junk,
                sink=factory.sink,
                starttls=factory.tls is not None,
                require_tls=factory.tls is not None and factory.tls.require,
                auth=factory.auth,
                require_auth=factory.require_auth,
            ),
        )
        self._smtp_factory = factory
        self._smtp_codec = cast(ServerCodec, self._codec)
        self._session: SmtpSession | None = None

    @property
    def session(self) -> SmtpSession:
        session = self._session
        codec = self._smtp_codec
        if (
            session is None
            or session.helo != codec.helo
            or session.esmtp != codec.esmtp
            or session.tls != self._tls
            or (session.tls and not session.cipher)
            or session.user != (codec.user or "")
        ):
            # Made again only when the client said EHLO/HELO again or started TLS.
            session = self._session = SmtpSession(
                peer_host=self._peer_host,
                peer_port=self._peer_port,
                helo=codec.helo,
                esmtp=codec.esmtp,
                tls=self._tls,
                cipher=(session_cipher(self.transport) or "") if self._tls else "",
                user=codec.user or "",
            )
        return session

    def connectionMade(self) -> None:
        # AUTH without TLS only for the clients the listener names (by default those on
        # this machine, as Dovecot trusts them).
        address = self._transport().getPeer()
        networks = self._smtp_factory.auth_without_tls
        self._smtp_codec.auth_insecure = (
            isinstance(address, (IPv4Address, IPv6Address))
            and bool(networks)
            and client_allowed(networks, address.host)
        )
        super().connectionMade()

    def _in_progress(self) -> bool:
        return self._smtp_codec.in_transaction

    def _refusal(self, admission: Admission) -> tuple[bytes, bool] | None:
        if admission is Admission.NOT_ALLOWED:
            refusal: object = Reply(554, "5.7.1", f"Access denied for {self._peer_host}")
        elif admission is Admission.TOO_MANY:
            refusal = Reply(421, "4.7.0", f"{self._smtp_factory.hostname} Too many connections")
        elif admission is Admission.CLIENT_CONNECTIONS:
            refusal = Reply(
                421,
                "4.7.0",
                f"{self._smtp_factory.hostname} Too many connections from {self._peer_host}",
            )
        elif admission is Admission.CLIENT_RATE:
            wait = retry_after(self._smtp_factory.guard.retry_after)
            refusal = Reply(
                421,
                "4.7.0",
                f"{self._smtp_factory.hostname} {self._peer_host} connects too often,"
                f" try again in {wait} seconds",
            )
        else:
            refusal = self._ask_connect()
        if refusal is None:
            return None
        if not isinstance(refusal, Reply):
            log.error(
                "SMTP handler on_connect returned {result!r} instead of a Reply or None",
                result=refusal,
            )
            return self._codec.abort().to_bytes(), True
        if refusal.code == 554:
            # RFC 5321 3.1: after a 554 greeting the server waits for QUIT, answering 503
            # to anything else (the idle timer and max_errors still end the session).
            self._smtp_codec.refuse()
            return refusal.to_bytes(), False
        return refusal.to_bytes(), True

    def _ask_connect(self) -> object:
        try:
            return self._smtp_factory.handler.on_connect(self.session)
        except Exception:
            log.failure(
                "SMTP handler on_connect failed for {peer}", peer=self.peer, level=LogLevel.error
            )
            return self._codec.abort()

    def _handle_event(self, event: object) -> None:
        if isinstance(event, SendReply):
            self._write(event.reply.to_bytes())
            if event.start_tls:
                self._start_tls()
            elif event.close:
                if event.reply.code == 421:
                    log.info(
                        "SMTP session with {peer} closed: {code} {status} {text}",
                        peer=self.peer,
                        code=event.reply.code,
                        status=event.reply.status,
                        text=event.reply.text,
                    )
                self._close()
        else:
            self._call_handler(event)

    def _describe(self, event: Request) -> str:
        return _HANDLER_NAMES.get(type(event), "on_message")

    def _ask(self, event: Request) -> object:
        handler = self._smtp_factory.handler
        guard = self._smtp_factory.guard
        session = self.session
        # Over the client's limits, as Postfix's smtpd_client_message_rate_limit and
        # smtpd_client_recipient_rate_limit: 450 4.7.1, and the client tries later. A
        # client that logged in is counted as its user, wherever it connects from.
        if isinstance(event, MailRequest):
            wait = guard.throttle("message_rate", self._peer_host, session.user)
            if wait:
                return _throttled("Too much mail from", session.user or self._peer_host, wait)
            return handler.on_sender(session, event.sender, event.params)
        if isinstance(event, RcptRequest):
            wait = guard.throttle("recipient_rate", self._peer_host, session.user)
            if wait:
                return _throttled("Too many recipients from", session.user or self._peer_host, wait)
            return handler.on_recipient(session, event.sender, event.recipient, event.params)
        if isinstance(event, AuthRequest):
            return handler.on_auth(session, event.user, event.password)
        return handler.on_message(session, event.sender, event.recipients, event.data)

    def _answer(self, result: object, event: Request) -> None:
        if isinstance(result, Reply) or (
            result is None and not isinstance(event, (MessageReceived, AuthRequest))
        ):
            self._smtp_codec.answer(result)
            return
        log.error(
            "SMTP handler {handler} returned {result!r}, which is not a Reply",
            handler=self._describe(event),
            result=result,
        )
        self._smtp_codec.answer(LOCAL_ERROR)

    def _local_error(self, event: object) -> Reply:
        return LOCAL_ERROR


def _throttled(what: str, host: str, wait: float) -> Reply:
    return Reply(450, "4.7.1", f"{what} {host}, try again in {retry_after(wait)} seconds")


class SmtpServerFactory(Factory):
    """Builds SmtpServerProtocol instances that share one handler and one set of limits.

    max_size is the largest message accepted, in octets as RFC 1870 counts them (0: no
    limit); max_errors protocol errors end a session with 421, and NOOP, RSET or VRFY
    count as errors once a session has sent max_junk of them without delivering mail.
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
        transfer_timeout: float = 600.0,
        session_timeout: float = 3600.0,
        max_errors: int = 20,
        max_junk: int = 100,
        guard: Guard[SmtpServerProtocol] | None = None,
        sink: Callable[[], DataSink] = SpillingSink,
        tls: ServerTls | None = None,
        auth: bool = False,
        require_auth: bool = False,
        auth_without_tls: tuple[Network, ...] = (),
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
        if max_junk < 0:
            raise ValueError(f"max_junk must be 0 or more, not {max_junk}")
        if not hostname or any(not 33 <= ord(c) <= 126 for c in hostname):
            raise ValueError(f"hostname must be a non-empty ASCII host name, not {hostname!r}")
        self.handler = handler
        self.reactor = reactor
        self.clock = cast(Clock, reactor)
        self.hostname = hostname
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.idle_timeout = idle_timeout
        # A whole message must arrive within transfer_timeout, the whole session last at most
        # session_timeout (0: no limit); see LineServerProtocol.
        self.transfer_timeout = transfer_timeout
        self.session_timeout = session_timeout
        self.max_errors = max_errors
        self.max_junk = max_junk
        # The listener's connection rules; its open connections let a shutdown tell idle
        # sessions to go away.
        self.guard: Guard[SmtpServerProtocol] = guard or Guard(hostname, (), 2**31)
        # A message's content goes to a file beyond a few hundred KiB as it arrives.
        self.sink = sink
        # STARTTLS is offered when set; its require setting refuses MAIL before TLS.
        self.tls = tls
        # AUTH is offered (after TLS) when set; require_auth refuses MAIL before AUTH.
        self.auth = auth
        self.require_auth = require_auth
        self.auth_without_tls = auth_without_tls
        if require_auth and not auth:
            raise ValueError("require_auth needs users to authenticate (auth)")

    @property
    def connections(self) -> set[SmtpServerProtocol]:
        return self.guard.connections

    def buildProtocol(self, addr: IAddress | None) -> SmtpServerProtocol:
        protocol = SmtpServerProtocol(self)
        protocol.factory = self
        return protocol
