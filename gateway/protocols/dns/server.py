"""Twisted shells of the DNS listener: UDP datagrams and TCP streams (RFC 1035, RFC 7766).

The protocols only move bytes: each query goes to a handler that returns the
response (or a Deferred of it, or None to stay silent).  Over TCP several
queries may be in flight on one connection and are answered as they complete.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.listening import Admission, Guard
from gateway.protocols.dns.batch import ReadBatch, read_batch

log = Logger(namespace="gateway.dns.server")

Answer = bytes | None | Deferred[bytes | None]
# Where a handler may send a response that is not ready at once: (response, client).
Reply = Callable[[bytes | None, Any], object]


class DnsHandler(TypingProtocol):
    def answer(
        self, data: bytes, client: tuple[str, int], transport: str, reply: Reply | None = None
    ) -> Answer:
        """The response to ``data`` from ``client`` over "udp", "tcp" or "doh".

        Bytes, None for no response, or a Deferred of either; or, when ``reply`` is given,
        None now and the response passed to ``reply`` later (no Deferred per query).
        """
        ...


class DnsUdpProtocol(DatagramProtocol):
    """One UDP socket: a datagram in, at most one datagram out."""

    noisy = False

    def __init__(self, handler: DnsHandler) -> None:
        self.handler = handler
        self._sendto: Any = None
        self._batch: ReadBatch | None = None
        # Answers wait here until the reactor has read what is waiting, then go out together:
        # a client then wakes once per batch of answers rather than once per answer.
        self._outbox: list[tuple[bytes, Any]] = []
        self._flushing = False
        # Response rate limiting (an object with check(response, host)), or None.
        self.limiter: Any = None

    def startProtocol(self) -> None:
        # Answers go straight to the socket: Port.write checks that the address is an IP
        # address on every datagram, and recvfrom() only ever gives us IP addresses.
        transport: Any = self.transport
        raw = getattr(transport, "socket", None)
        self._sendto = raw.sendto if raw is not None else transport.write
        reactor = getattr(transport, "reactor", None)
        self._batch = read_batch(reactor) if reactor is not None else None
        if self._batch is not None and hasattr(transport, "doRead"):
            self._batch.watch(transport)

    def stopProtocol(self) -> None:
        if self._batch is not None and self._flushing:
            self._batch.forget(self._flush)
        self._flushing = False
        self._outbox.clear()
        self._sendto = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            result = self.handler.answer(datagram, addr, "udp", self._send)
        except Exception:
            log.failure("DNS handler failed on a UDP query from {client}", client=addr)
            return
        if result.__class__ is bytes:
            self._send(result, addr)
        elif isinstance(result, Deferred):
            result.addCallbacks(self._send, self._failed, callbackArgs=(addr,), errbackArgs=(addr,))
        elif result:
            self._send(result, addr)

    def _send(self, response: bytes | None, addr: Any) -> None:
        if not response or self._sendto is None:
            return
        if self.limiter is not None:
            response = self.limiter.check(response, addr[0])
            if response is None:
                return
        self._outbox.append((response, addr))
        if self._batch is None:  # a transport without a reactor to wait for: now
            self._flush()
        elif not self._flushing:
            self._flushing = True
            self._batch.mark(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        outbox, self._outbox = self._outbox, []
        sendto = self._sendto
        if sendto is None:
            return
        for response, addr in outbox:
            try:
                sendto(response, addr)
            except OSError as exc:
                log.debug("cannot answer {client}: {error}", client=addr, error=exc)

    def _failed(self, failure: Failure, addr: Any) -> None:
        log.failure("DNS handler failed on a UDP query from {client}", failure, client=addr)


class DnsTcpProtocol(Protocol):
    """One TCP connection: 2-octet length-prefixed messages, pipelined (RFC 7766)."""

    max_pending = 64  # queries in flight before we stop reading from this client

    def __init__(self, factory: DnsTcpFactory) -> None:
        self.factory = factory
        self._buffer = bytearray()
        self._pending = 0
        self._paused = False
        self._timer: Any = None
        self._open = False
        self._peer: tuple[str, int] = ("", 0)

    @property
    def _transport(self) -> Any:
        return self.transport

    def connectionMade(self) -> None:
        peer = self._transport.getPeer()
        self._peer = (getattr(peer, "host", ""), getattr(peer, "port", 0))
        # A client outside 'allow' is served, and each query answered REFUSED by the handler.
        if self.factory.guard.connect(self, self._peer[0], check_allow=False) is not Admission.OK:
            self._transport.loseConnection()
            return
        self._open = True
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if not self._open:
            return
        self._buffer += data
        self._parse()

    def _parse(self) -> None:
        # Paused at max_pending, queries already read wait in the buffer too: one segment
        # carrying hundreds of them must not put them all in flight at once.
        whole = False
        while len(self._buffer) >= 2 and not self._paused:
            (length,) = struct.unpack_from("!H", self._buffer)
            if len(self._buffer) < 2 + length:
                break
            message = bytes(self._buffer[2 : 2 + length])
            del self._buffer[: 2 + length]
            whole = True
            if length == 0:
                continue
            self._query(message)
        # Only a whole message is activity: a client that trickles in a byte at a time
        # must still complete a query within the idle timeout, or be closed.
        if whole and self._pending == 0:
            self._arm()

    def _query(self, message: bytes) -> None:
        try:
            result = self.factory.handler.answer(message, self._peer, "tcp")
        except Exception:
            log.failure("DNS handler failed on a TCP query from {client}", client=self._peer)
            return
        if isinstance(result, Deferred):
            self._pending += 1
            self._cancel_timer()
            if self._pending >= self.max_pending and not self._paused:
                self._paused = True
                self._transport.pauseProducing()
            result.addCallbacks(self._send, self._failed)
            result.addBoth(self._done)
        elif result:
            self._send(result)

    def _send(self, response: bytes | None) -> None:
        if response and self._open:
            self._transport.write(struct.pack("!H", len(response)) + response)

    def _failed(self, failure: Failure) -> None:
        log.failure("DNS handler failed on a TCP query from {client}", failure, client=self._peer)

    def _done(self, _: object) -> None:
        self._pending -= 1
        if self._paused and self._pending < self.max_pending // 2 and self._open:
            self._paused = False
            self._transport.resumeProducing()
            self._parse()
        if self._pending == 0:
            self._arm()

    def _arm(self) -> None:
        if not self._open:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.factory.idle_timeout)
        else:
            self._timer = self.factory.reactor.callLater(self.factory.idle_timeout, self._idle)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _idle(self) -> None:
        self._timer = None
        if self._open and self._pending == 0:
            self._transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._open = False
        self._cancel_timer()
        self.factory.guard.disconnect(self)


class DnsTcpFactory(Factory):
    noisy = False

    def __init__(
        self,
        handler: DnsHandler,
        reactor: Any,
        *,
        idle_timeout: float,
        guard: Guard[DnsTcpProtocol] | None = None,
    ) -> None:
        self.handler = handler
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.guard: Guard[DnsTcpProtocol] = guard or Guard("dns", (), 2**31)

    @property
    def connections(self) -> set[DnsTcpProtocol]:
        return self.guard.connections

    def buildProtocol(self, addr: Any) -> DnsTcpProtocol:
        return DnsTcpProtocol(self)
