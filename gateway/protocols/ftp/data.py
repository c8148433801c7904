"""FTP data connections: one per transfer, opened passively (the client connects to a port
the session listens on) or actively (the session connects to the client), in TLS when the
client asked for protected data (PROT P).

A passive port takes one connection, and only from the address of the
control connection's client (another address could steal the upload or the
download, RFC 2577 / vsftpd's ``pasv_promiscuous``); active mode connects only
to the client's own address, and never to a port below 1024 (the "bounce"
attack, RFC 2577).

A transfer succeeds only when its connection ended cleanly: the client's FIN
(and its TLS close_notify under TLS) after the last byte.  A reset, a TLS
connection cut without close_notify, or ``timeout`` seconds without a byte
moving fails it with ``TransferFailed``.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from gateway.ports import FileReader
from gateway.protocols._line_server import IdleTimer
from gateway.protocols.ftp.codec import local_to_ascii

log = Logger(namespace="gateway.ftp")

BLOCK = 256 * 1024  # read from a file source at once


def _closed_by_peer(transport: Any) -> bool:
    """Whether the peer sent TLS's close_notify (on a TLS transport, read while it is being
    lost)."""
    handle: Any = getattr(transport, "getHandle", lambda: None)()
    try:
        return bool(handle is not None and handle.get_shutdown() & SSL.RECEIVED_SHUTDOWN)
    except (AttributeError, SSL.Error):
        return False


def _clean(reason: Failure) -> bool:
    return isinstance(reason.value, ConnectionDone)


class TransferFailed(Exception):
    """The data connection could not be opened, or broke off, or stalled."""


def same_host(a: str, b: str) -> bool:
    """Whether two addresses are one host (an IPv4-mapped IPv6 address is its IPv4 one)."""
    try:
        x = ipaddress.ip_address(a.partition("%")[0])
        y = ipaddress.ip_address(b.partition("%")[0])
    except ValueError:
        return a == b
    if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped is not None:
        x = x.ipv4_mapped
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped is not None:
        y = y.ipv4_mapped
    return x == y


class NoPassivePort(Exception):
    """Every port of the passive range is taken."""


class PassivePorts:
    """The ports passive data connections are offered on: ``low``-``high``, or any free
    port (0, 0). Each offer takes the next free port of the range, round the range."""

    def __init__(self, low: int = 0, high: int = 0) -> None:
        self.low, self.high = low, high
        self._next = random.randint(low, high) if low else 0

    def listen(self, reactor: Any, factory: Factory, interface: str) -> Any:
        """A listening port (NoPassivePort once every port of the range is taken;
        CannotListenError if not even any free port can be had)."""
        if not self.low:
            return reactor.listenTCP(0, factory, backlog=1, interface=interface)
        count = self.high - self.low + 1
        for _ in range(count):
            port = self._next
            self._next = self.low if port >= self.high else port + 1
            try:
                return reactor.listenTCP(port, factory, backlog=1, interface=interface)
            except CannotListenError:
                continue
        raise NoPassivePort(f"every passive port ({self.low}-{self.high}) is in use")


@implementer(IPushProducer)
class Paced(TwistedProtocol):
    """A connection that writes no faster than its peer reads (the producer of its own
    transport): ``drained`` waits while the transport's buffer is full. Both ends of FTP
    data connections (the listener's and the ftp destination's) send this way."""

    def __init__(self) -> None:
        self._paused = False
        self._writable: Deferred[None] | None = None
        self._gone = False

    async def drained(self) -> None:
        """Wait until the transport takes more (at once, once the connection is gone)."""
        while self._paused and not self._gone:
            self._writable = Deferred()
            await self._writable

    def gone(self) -> None:
        """The connection is lost: nothing waits for room any more."""
        self._gone = True
        self._wake()

    def _wake(self) -> None:
        if self._writable is not None:
            waiting, self._writable = self._writable, None
            waiting.callback(None)

    # --- IPushProducer ---

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._wake()

    def stopProducing(self) -> None:
        """The connection is going: connectionLost follows and ends the transfer."""


class DataConnection(Paced):
    """One data connection; ``receive`` or ``send`` runs the transfer over it."""

    def __init__(self, channel: DataChannel) -> None:
        super().__init__()
        self.channel = channel
        self.made: Deferred[DataConnection] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self._early: list[bytes] = []  # data before a transfer took the connection
        self._sink: Callable[[bytes], None] | None = None
        self._problem: BaseException | None = None
        self._reason: Failure | None = None
        self._idle = IdleTimer(channel.reactor, self._stalled)
        self.moved = 0  # bytes received or sent
        self.awaited = False  # a transfer waits for ``made``

    # --- Twisted ---

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self.channel.protected and self.channel.tls is None:
            # The listener was reloaded without its tls: block: nothing to protect it with.
            self.abort("TLS is no longer offered")
            self.made.callback(self)
            return
        if self.channel.protected:
            # TLS 1.2 at most: with 1.3, the session tickets the server sends after the
            # handshake make GnuTLS clients (lftp, FileZilla) reset an upload now and then
            # (one in four, measured with lftp); the control connection keeps 1.3.
            transport.startTLS(self.channel.tls.up_to_tls12())
        transport.registerProducer(self, True)
        self._idle.restart(self.channel.timeout)
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self._idle.restart(self.channel.timeout)
        if self._sink is None:
            self._early.append(data)
            if sum(map(len, self._early)) > BLOCK:
                self._transport().pauseProducing()  # no transfer yet: hold the client back
            return
        self._take(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._idle.stop()
        if self.channel.protected and _closed_by_peer(self.transport):
            # The client ended TLS with close_notify: every byte before it is authentic and
            # the transfer is whole, even if the socket then saw a reset (our close_notify
            # in answer reaching a socket the client had closed already).
            reason = connectionDone
        self._reason = reason
        self.gone()
        if self.awaited and not self.made.called:
            self.made.errback(TransferFailed("the data connection closed at once"))
        self.lost.callback(None)

    # --- transfers ---

    async def receive(self, sink: Callable[[bytes], None]) -> int:
        """Hand every byte to ``sink`` until the client ends the connection cleanly; the
        count received. ``sink`` may raise (a full disk, too large): the connection is cut
        and that is raised."""
        self._sink = sink
        early, self._early = self._early, []
        for data in early:
            self._take(data)
        self._transport().resumeProducing()
        await self.lost
        if self._problem is not None:
            raise self._problem
        if self._reason is None or not _clean(self._reason):
            why = self._reason.getErrorMessage() if self._reason is not None else "lost"
            raise TransferFailed(f"the data connection broke off ({why})")
        return self.moved

    async def send(self, reader: FileReader, *, offset: int = 0, ascii: bool = False) -> int:
        """Send ``reader`` from ``offset`` on, then close cleanly; the count sent.
        FileProblem if the source fails, TransferFailed if the connection does."""
        skip = offset
        last_cr = False
        while True:
            data = reader.read_now(BLOCK)
            if data is None:
                data = await reader.read(BLOCK)
            if not data:
                break
            if skip:
                cut = min(skip, len(data))
                data, skip = data[cut:], skip - cut
                if not data:
                    continue
            if ascii:
                data, last_cr = local_to_ascii(data, last_cr)
            await self.write(data)
        await self.finish()
        return self.moved

    async def write(self, data: bytes) -> None:
        if self._reason is not None or self._problem is not None:
            raise self._problem or TransferFailed("the client closed the data connection")
        self._transport().write(data)
        self.moved += len(data)
        self._idle.restart(self.channel.timeout)
        await self.drained()
        if self._problem is not None:
            raise self._problem

    async def finish(self) -> None:
        """Close after what was written has gone (under TLS, with close_notify)."""
        transport = self._transport()
        transport.unregisterProducer()
        transport.loseConnection()
        await self.lost
        if self._problem is not None:
            raise self._problem
        if self._reason is not None and not _clean(self._reason):
            why = self._reason.getErrorMessage()
            raise TransferFailed(f"the data connection broke off ({why})")

    def abort(self, why: str) -> None:
        self._problem = self._problem or TransferFailed(why)
        if self._reason is None and self.transport is not None:
            self._transport().abortConnection()

    # --- inside ---

    def _take(self, data: bytes) -> None:
        if self._problem is not None:
            return
        assert self._sink is not None
        try:
            self._sink(data)
        except Exception as exc:  # a full disk, too large: the transfer ends with it
            self._problem = exc
            self._transport().abortConnection()
            return
        self.moved += len(data)

    def _stalled(self) -> None:
        self.abort(f"no data moved for {self.channel.timeout:g} seconds")

    def _transport(self) -> Any:
        return self.transport


class _PassiveFactory(Factory):
    noisy = False

    def __init__(self, channel: DataChannel) -> None:
        super().__init__()
        self.channel = channel

    def buildProtocol(self, addr: Any) -> DataConnection | None:
        return self.channel.accepted(addr)


class _ActiveFactory(ClientFactory):
    noisy = False

    def __init__(self, channel: DataChannel, connection: DataConnection) -> None:
        self.channel = channel
        self.connection = connection

    def buildProtocol(self, addr: Any) -> DataConnection:
        return self.connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.connection.made.called:
            self.connection.made.errback(
                TransferFailed(f"cannot connect to the client: {reason.getErrorMessage()}")
            )


class DataChannel:
    """The data side of one FTP session: the passive port offered or the active address
    given, and the data connection of the transfer in progress."""

    def __init__(
        self, reactor: Any, peer_host: str, tls: Any, ports: PassivePorts, timeout: float
    ) -> None:
        self.reactor = reactor
        self.peer_host = peer_host
        self.tls = tls
        self.ports = ports
        self.timeout = timeout
        self.protected = False
        self._listening: Any = None
        self._waiting: DataConnection | None = None  # accepted, or to be
        self._active: tuple[str, int] | None = None
        self.connection: DataConnection | None = None

    @property
    def ready(self) -> bool:
        """PASV/EPSV or PORT/EPRT was given for the next transfer."""
        return self._listening is not None or self._waiting is not None or bool(self._active)

    def listen(self, interface: str, protected: bool) -> int:
        """Offer a passive port on ``interface`` (CannotListenError if none is free)."""
        self.close()
        self.protected = protected
        self._waiting = DataConnection(self)
        self._listening = self.ports.listen(self.reactor, _PassiveFactory(self), interface)
        port: int = self._listening.getHost().port
        return port

    def target(self, host: str, port: int, protected: bool) -> None:
        """Connect to ``host``:``port`` for the next transfer."""
        self.close()
        self.protected = protected
        self._active = (host, port)

    def accepted(self, addr: Any) -> DataConnection | None:
        host = getattr(addr, "host", "")
        if not same_host(host, self.peer_host):
            log.warn(
                "FTP: a data connection from {host} to the passive port of {client} refused",
                host=host,
                client=self.peer_host,
            )
            return None
        connection = self._waiting
        if connection is None or connection.transport is not None:
            return None  # a passive port takes one connection
        self._stop_listening()
        return connection

    async def open(self, local: str) -> DataConnection:
        """The data connection for a transfer: accepted (waiting up to ``timeout``) or made."""
        if self._active is not None:
            host, port = self._active
            self._active = None
            connection = DataConnection(self)
            self.reactor.connectTCP(
                host,
                port,
                _ActiveFactory(self, connection),
                timeout=self.timeout,
                bindAddress=(local, 0),
            )
        elif self._waiting is not None:
            connection = self._waiting
        else:
            raise TransferFailed("send PASV, EPSV, PORT or EPRT first")
        self.connection = connection
        connection.awaited = True

        def late() -> None:
            if not connection.made.called:
                connection.made.errback(
                    TransferFailed(f"no data connection within {self.timeout:g} seconds")
                )

        timer = self.reactor.callLater(self.timeout, late)
        try:
            return await connection.made
        finally:
            if timer.active():
                timer.cancel()
            self._stop_listening()
            self._waiting = None

    def done(self) -> None:
        """The transfer is over (its connection closed)."""
        self.connection = None

    def close(self, why: str = "the session ended") -> None:
        """Give up the offered port and cut a transfer in progress."""
        self._stop_listening()
        self._active = None
        if self._waiting is not None and self._waiting.transport is not None:
            self._waiting.abort(why)
        self._waiting = None
        if self.connection is not None:
            self.connection.abort(why)
            self.connection = None

    def _stop_listening(self) -> None:
        if self._listening is not None:
            listening, self._listening = self._listening, None
            listening.stopListening()


__all__ = [
    "DataChannel",
    "DataConnection",
    "NoPassivePort",
    "Paced",
    "PassivePorts",
    "TransferFailed",
    "same_host",
]
