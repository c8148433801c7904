"""Twisted FTP server: the control connection as a thin shell around ServerCodec.

The flow rules (timeouts, pausing, TLS after AUTH TLS, a failing handler
answered "try later") are LineServerProtocol's.  Each connection has a
DataChannel for its data connections; a transfer is one handler call, which
sends its 150 as it starts and gives the final reply (226, or why not) as its
answer, so the commands a client sends meanwhile wait their turn.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from gateway.config import Network, client_allowed
from gateway.listening import Admission, Guard, retry_after
from gateway.protocols._line_server import Clock, LineServerProtocol
from gateway.protocols.ftp.codec import (
    Active,
    FileRequest,
    Login,
    Passive,
    Reply,
    SendReply,
    ServerCodec,
)
from gateway.protocols.ftp.data import DataChannel, PassivePorts
from gateway.tls import ServerTls

log = Logger(namespace="gateway.ftp")

# A handler failed: "try again later" in the terms of each request.
_LOCAL_ERROR = {
    Login: Reply(421, "Internal error while checking the login; closing"),
    Passive: Reply(425, "Cannot open a passive port now"),
    Active: Reply(425, "Cannot use that address now"),
    FileRequest: Reply(451, "Local error: try again later"),
}


class FtpHandler(TypingProtocol):
    """The decisions behind an FTP listener."""

    def on_connect(self, session: FtpServerProtocol) -> Reply | None:
        """None greets the client; a reply refuses it (sent, then the link closes)."""

    def on_login(
        self, session: FtpServerProtocol, user: str, password: str
    ) -> Awaitable[Reply]: ...

    def on_passive(self, session: FtpServerProtocol, extended: bool) -> Reply: ...

    def on_active(self, session: FtpServerProtocol, host: str, port: int) -> Reply: ...

    def on_file(self, session: FtpServerProtocol, request: FileRequest) -> Awaitable[Reply]: ...


class FtpServerProtocol(LineServerProtocol):
    """One FTP control connection."""

    kind = "FTP"

    def __init__(self, factory: FtpServerFactory) -> None:
        super().__init__(
            factory,
            ServerCodec(
                tls_available=factory.tls is not None,
                data_needs_tls=factory.data_tls,
                active=factory.active,
            ),
        )
        self.ftp_factory = factory
        self.codec = cast(ServerCodec, self._codec)
        self.data: DataChannel | None = None
        self.local_host = ""

    # --- what a handler knows ---

    @property
    def peer_host(self) -> str:
        return self._peer_host

    @property
    def user(self) -> str:
        return self.codec.user

    @property
    def open(self) -> bool:
        """The control connection is up (a transfer's reply will be heard)."""
        return self._open

    def channel(self) -> DataChannel:
        factory = self.ftp_factory
        if self.data is None:
            self.data = DataChannel(
                factory.reactor, self._peer_host, factory.tls, factory.ports, factory.data_timeout
            )
        self.data.tls = factory.tls
        self.data.ports = factory.ports
        self.data.timeout = factory.data_timeout
        return self.data

    def preliminary(self, reply: Reply) -> None:
        """A 1xx reply while the request is handled (150 as a transfer starts)."""
        self._write(reply.to_bytes())

    # --- LineServerProtocol ---

    def connectionMade(self) -> None:
        transport: Any = self.transport
        # A transfer's 150 and its 226 follow each other with nothing from the client in
        # between: with Nagle's algorithm the 226 would wait for the client's delayed ACK
        # of the 150 (40 ms on Linux).
        no_delay = getattr(transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        address = transport.getHost()
        if isinstance(address, (IPv4Address, IPv6Address)):
            self.local_host = address.host
        peer = transport.getPeer()
        host = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else ""
        factory = self.ftp_factory
        networks = factory.login_without_tls  # [] names no one (not everyone, as allow does)
        trusted = bool(networks) and client_allowed(networks, host)
        self.codec.login_needs_tls = (
            factory.tls is not None and factory.tls.require
        ) or not trusted
        super().connectionMade()
        self.codec.tls = self._tls  # implicit TLS (a tls: endpoint)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.data is not None:
            self.data.close("the control connection closed")
        super().connectionLost(reason)

    def _in_progress(self) -> bool:
        return self.codec.busy

    def _refusal(self, admission: Admission) -> tuple[bytes, bool] | None:
        if admission is Admission.NOT_ALLOWED:
            return Reply(421, f"Not allowed from {self._peer_host}").to_bytes(), True
        if admission is Admission.TOO_MANY:
            return Reply(421, "Too many connections, try again later").to_bytes(), True
        if admission is Admission.CLIENT_CONNECTIONS:
            text = f"Too many connections from {self._peer_host}, try again later"
            return Reply(421, text).to_bytes(), True
        if admission is Admission.CLIENT_RATE:
            wait = retry_after(self.ftp_factory.guard.retry_after)
            text = f"{self._peer_host} connects too often, try again in {wait} seconds"
            return Reply(421, text).to_bytes(), True
        try:
            refusal = self.ftp_factory.handler.on_connect(self)
        except Exception:
            log.failure(
                "FTP handler on_connect failed for {peer}", peer=self.peer, level=LogLevel.error
            )
            refusal = self.codec.abort()
        return None if refusal is None else (refusal.to_bytes(), True)

    def _handle_event(self, event: object) -> None:
        if isinstance(event, SendReply):
            self._write(event.to_bytes())
            if event.start_tls:
                self._start_tls()
            elif event.close:
                self._close()
        else:
            self._call_handler(event)

    def _describe(self, event: Any) -> str:
        if isinstance(event, FileRequest):
            return f"{event.verb} {event.path}"
        return type(event).__name__.upper()

    def _ask(self, event: Any) -> object:
        handler = self.ftp_factory.handler
        if isinstance(event, Login):
            return handler.on_login(self, event.user, event.password)
        if isinstance(event, Passive):
            return handler.on_passive(self, event.extended)
        if isinstance(event, Active):
            return handler.on_active(self, event.host, event.port)
        return handler.on_file(self, event)

    def _answer(self, result: object, event: Any) -> None:
        if not isinstance(result, Reply):
            result = self._local_error(event)
        assert isinstance(result, Reply)
        self._handle_event(self.codec.answer(result))

    def _local_error(self, event: Any) -> Reply:
        return _LOCAL_ERROR[type(event)]


class FtpServerFactory(Factory):
    """Builds FtpServerProtocol for each connection; the listener updates its settings."""

    protocol = FtpServerProtocol
    noisy = False

    def __init__(
        self,
        handler: FtpHandler,
        *,
        reactor: Any,
        guard: Guard[Any],
        tls: ServerTls | None,
        ports: PassivePorts,
        login_without_tls: tuple[Network, ...],
        data_tls: bool,
        active: bool,
        idle_timeout: float,
        data_timeout: float,
        session_timeout: float,
    ) -> None:
        self.handler = handler
        self.reactor = reactor
        self.guard = guard
        self.tls = tls
        self.ports = ports
        self.login_without_tls = login_without_tls
        self.data_tls = data_tls
        self.active = active
        self.idle_timeout = idle_timeout
        self.data_timeout = data_timeout
        self.transfer_timeout = 0.0  # transfers are timed on their data connections
        self.session_timeout = session_timeout

    @property
    def clock(self) -> Clock:
        return cast(Clock, self.reactor)

    def buildProtocol(self, addr: Any) -> FtpServerProtocol:
        protocol = FtpServerProtocol(self)
        protocol.factory = self
        return protocol
