"""Queries to upstream DNS servers: UDP first, TCP when the answer is truncated.

Each upstream query gets a random ID and leaves from one of a small pool of
UDP sockets bound to random ports, replaced after a number of queries, so an
off-path attacker has to guess both.  An answer is taken only if it comes from
the server that was asked, with the ID and the question that were sent;
anything else is counted and ignored (RFC 5452).
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.protocols.dns.wire import (
    Question,
    WireError,
    is_truncated,
    parse_response_question,
    with_id,
)

log = Logger(namespace="gateway.dns.client")


class UpstreamError(Exception):
    """No upstream answered in time; the message says which and why."""


@dataclass
class _Pending:
    server: tuple[str, int]
    question: tuple[str, int, int]
    deferred: Deferred[bytes]
    timer: Any


class _UdpSocket(DatagramProtocol):
    noisy = False

    def __init__(self, owner: DnsUpstream) -> None:
        self.owner = owner
        self.pending: dict[int, _Pending] = {}
        self.uses = 0
        self.retired = False
        self.port: Any = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if len(datagram) < 12:
            self.owner.ignored += 1
            return
        pending = self.pending.get(int.from_bytes(datagram[:2], "big"))
        if pending is None or (addr[0], addr[1]) != pending.server:
            self.owner.ignored += 1
            return
        try:
            _, qname, qtype, qclass = parse_response_question(datagram)
        except WireError:
            self.owner.ignored += 1
            return
        if (qname, qtype, qclass) != pending.question:
            self.owner.ignored += 1
            return
        del self.pending[int.from_bytes(datagram[:2], "big")]
        if pending.timer.active():
            pending.timer.cancel()
        pending.deferred.callback(datagram)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.retired and not self.pending and self.port is not None:
            self.port.stopListening()
            self.port = None


class _TcpQuery(Protocol):
    def __init__(self, query: bytes) -> None:
        self.query = query
        self.buffer = b""
        self.done: Deferred[bytes] = Deferred()

    @property
    def _transport(self) -> Any:
        return self.transport

    def connectionMade(self) -> None:
        self._transport.write(struct.pack("!H", len(self.query)) + self.query)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= 2:
            (length,) = struct.unpack_from("!H", self.buffer)
            if len(self.buffer) >= 2 + length:
                answer = self.buffer[2 : 2 + length]
                self._transport.loseConnection()
                if not self.done.called:
                    self.done.callback(answer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(UpstreamError("the TCP connection closed before the answer"))


class DnsUpstream:
    """A set of DNS servers tried in order, each with a per-query timeout."""

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[tuple[str, int]],
        timeout: float,
        *,
        sockets: int = 8,
        rotate_after: int = 2000,
    ) -> None:
        self.reactor = reactor
        self.servers = list(servers)
        self.timeout = timeout
        self.pool_size = sockets
        self.rotate_after = rotate_after
        self._pools: dict[int, list[_UdpSocket]] = {}
        self._rng = random.Random(secrets.randbits(64))
        self.ignored = 0  # answers that did not match a question we asked
        self.queries = 0

    async def resolve(self, data: bytes, question: Question) -> bytes:
        """The upstream's answer to ``data`` (its ID as the upstream sent it).

        Raises UpstreamError when no server answers.
        """
        problems = []
        for server in self.servers:
            try:
                answer = await self._udp(data, question, server)
                if is_truncated(answer):
                    answer = await self._tcp(data, question, server)
                return answer
            except UpstreamError as exc:
                problems.append(f"{server[0]}:{server[1]}: {exc}")
        raise UpstreamError("; ".join(problems) or "no servers configured")

    # --- UDP ---

    def _socket(self, host: str) -> _UdpSocket:
        family = ipaddress.ip_address(host).version
        pool = self._pools.setdefault(family, [])
        live = [s for s in pool if not s.retired]
        if len(live) < self.pool_size:
            sock = _UdpSocket(self)
            interface = "::" if family == 6 else "0.0.0.0"
            sock.port = self.reactor.listenUDP(0, sock, interface=interface)
            pool.append(sock)
            live.append(sock)
        sock = live[self._rng.randrange(len(live))]
        sock.uses += 1
        if sock.uses >= self.rotate_after:
            # A fresh random port from now on; the old socket closes when its queries are done.
            sock.retired = True
            pool.remove(sock)
        return sock

    def _udp(self, data: bytes, question: Question, server: tuple[str, int]) -> Deferred[bytes]:
        self.queries += 1
        try:
            sock = self._socket(server[0])
        except Exception as exc:
            return defer.fail(UpstreamError(f"cannot open a UDP socket: {exc}"))
        qid = secrets.randbits(16)
        while qid in sock.pending:
            qid = secrets.randbits(16)
        d: Deferred[bytes] = Deferred()

        def expire() -> None:
            sock.pending.pop(qid, None)
            sock._maybe_close()
            d.errback(UpstreamError(f"no answer within {self.timeout:g}s"))

        timer = self.reactor.callLater(self.timeout, expire)
        sock.pending[qid] = _Pending(
            server, (question.qname, question.qtype, question.qclass), d, timer
        )
        try:
            sock.port.write(with_id(data, qid), server)
        except OSError as exc:
            sock.pending.pop(qid, None)
            timer.cancel()
            return defer.fail(UpstreamError(f"cannot send: {exc}"))
        return d

    # --- TCP ---

    async def _tcp(self, data: bytes, question: Question, server: tuple[str, int]) -> bytes:
        host, port = server
        endpoint: Any
        if ipaddress.ip_address(host).version == 6:
            endpoint = TCP6ClientEndpoint(self.reactor, host, port, timeout=self.timeout)  # type: ignore[no-untyped-call]
        else:
            endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=self.timeout)
        qid = secrets.randbits(16)
        protocol = _TcpQuery(with_id(data, qid))
        try:
            connecting: Deferred[Any] = connectProtocol(endpoint, protocol)  # type: ignore[no-untyped-call]
            timer = self.reactor.callLater(self.timeout, connecting.cancel)
            try:
                await connecting
            finally:
                if timer.active():
                    timer.cancel()
        except Exception as exc:
            raise UpstreamError(f"TCP connection failed: {exc}") from None
        timer = self.reactor.callLater(self.timeout, protocol.done.cancel)
        try:
            answer = await protocol.done
        except defer.CancelledError:
            protocol._transport.loseConnection()
            raise UpstreamError(f"no TCP answer within {self.timeout:g}s") from None
        finally:
            if timer.active():
                timer.cancel()
        try:
            rid, qname, qtype, qclass = parse_response_question(answer)
        except WireError as exc:
            raise UpstreamError(f"malformed TCP answer: {exc}") from None
        if rid != qid or (qname, qtype, qclass) != (
            question.qname,
            question.qtype,
            question.qclass,
        ):
            raise UpstreamError("the TCP answer does not match the question")
        return answer

    def close(self) -> None:
        for pool in self._pools.values():
            for sock in pool:
                for pending in sock.pending.values():
                    if pending.timer.active():
                        pending.timer.cancel()
                    pending.deferred.errback(UpstreamError("the gateway is stopping"))
                sock.pending.clear()
                if sock.port is not None:
                    sock.port.stopListening()
                    sock.port = None
        self._pools.clear()
