"""The FTP control connection's shell in memory: what it does to its socket and what it
answers before any handler is asked."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.config import Network
from gateway.listening import Guard
from gateway.protocols.ftp.codec import Reply
from gateway.protocols.ftp.data import PassivePorts
from gateway.protocols.ftp.server import FtpServerFactory


class _Socket(StringTransport):
    """A TCP transport that records TCP_NODELAY."""

    def __init__(self) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 21),
            peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
        )
        self.no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


class _Handler:
    def on_connect(self, session: Any) -> Reply | None:
        return None


def _factory(login_without_tls: tuple[Network, ...] = ()) -> FtpServerFactory:
    return FtpServerFactory(
        _Handler(),  # type: ignore[arg-type]
        reactor=Clock(),
        guard=Guard("drop", (), 10),
        tls=None,
        ports=PassivePorts(),
        login_without_tls=login_without_tls,
        data_tls=False,
        active=True,
        idle_timeout=300,
        data_timeout=300,
        session_timeout=0,
    )


def test_replies_leave_at_once_and_a_stranger_must_use_tls() -> None:
    protocol = _factory().buildProtocol(None)
    socket = _Socket()
    protocol.makeConnection(socket)
    # Nagle's algorithm would hold a transfer's 226 until the client ACKed its 150.
    assert socket.no_delay
    assert socket.value() == b"220 Gateway FTP service ready\r\n"
    socket.clear()
    protocol.dataReceived(b"USER scan\r\n")
    assert socket.value().startswith(b"530 ")  # not from a trusted network, no TLS here
    trusted = _factory((Network.parse("192.0.2.0/24"),)).buildProtocol(None)
    socket = _Socket()
    trusted.makeConnection(socket)
    trusted.dataReceived(b"USER scan\r\n")
    assert socket.value().endswith(b"331 Password required for scan\r\n")
