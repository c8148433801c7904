"""Queries to upstream DNS servers: UDP first, TCP when the answer is truncated.

Each upstream query gets a random ID and leaves from one of a small pool of
UDP sockets bound to random ports, replaced after a number of queries, so an
off-path attacker has to guess both.  An answer is taken only if it comes from
the server that was asked, with the ID and the question that were sent;
anything else is counted and ignored (RFC 5452).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import struct
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.protocols.dns.batch import read_batch
from gateway.protocols.dns.wire import Question, WireError, parse_response_question, with_id

log = Logger(namespace="gateway.dns.client")


class UpstreamError(Exception):
    """No upstream answered in time; the message says which and why."""


# The largest DNS message (RFC 1035 4.2.1 leaves UDP to EDNS, which allows up to 65,535).
MAX_MESSAGE = 65535

OnAnswer = Callable[[bytes], object]
OnError = Callable[[BaseException | Failure], object]


class _Query:
    """One query on its way through the servers, and whom to tell how it ended.

    While a UDP attempt is out, its socket's ``pending`` maps the upstream ID to this object.
    """

    __slots__ = (
        "data",
        "index",
        "on_answer",
        "on_error",
        "problems",
        "qid",
        "question",
        "question_wire",
        "server",
        "slot",
        "sock",
    )

    def __init__(
        self, data: bytes, question: Question, on_answer: OnAnswer, on_error: OnError
    ) -> None:
        self.data = data
        self.question = question
        # The question section as sent; an upstream echoes it byte for byte, case included.
        self.question_wire = data[12 : question.question_end]
        self.on_answer = on_answer
        self.on_error = on_error
        self.index = 0  # into DnsUpstream.servers
        self.slot = 0  # the timeout wheel's slot of the UDP attempt out now
        self.problems: list[str] = []
        self.server: tuple[str, int] = ("", 0)
        self.sock: _UdpSocket | None = None
        self.qid = -1


class _UdpSocket(DatagramProtocol):
    noisy = False

    def __init__(self, owner: DnsUpstream) -> None:
        self.owner = owner
        self.pending: dict[int, _Query] = {}
        self.uses = 0
        self.retired = False
        self.port: Any = None
        self.sendto: Any = None
        self.serial = 0  # tells this socket in the timeout wheel

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if len(datagram) < 12:
            self.owner.ignored += 1
            return
        qid = (datagram[0] << 8) | datagram[1]
        query = self.pending.get(qid)
        if query is None or (addr[0], addr[1]) != query.server:
            self.owner.ignored += 1
            return
        # A response (QR) to one question, the one we sent; the slow path allows an upstream
        # that changed the name's case.
        if not (
            datagram[2] & 0x80
            and datagram[4:6] == b"\x00\x01"
            and datagram[12 : query.question.question_end] == query.question_wire
        ) and not _same_question(datagram, query.question):
            self.owner.ignored += 1
            return
        del self.pending[qid]
        owner = self.owner
        # Off the timeout wheel now, so that its turn only meets the attempts that did time out:
        # a turn that walked every answered query would stall the reactor for a tick's worth
        # of them, and the queries behind it would wait.
        bucket = owner._wheel.get(query.slot)
        if bucket is not None:
            bucket.discard(self.serial << 16 | qid)
        if self.retired and not self.pending:
            owner._close_retired(self)
        owner._answered(query, datagram)

    def close(self) -> None:
        if self.port is not None:
            self.port.stopListening()
            self.port = None


def _deliver(query: _Query, answer: bytes) -> None:
    try:
        query.on_answer(answer)
    except Exception:
        log.failure("passing on the answer of {server} failed", server=query.server)


def _deliver_error(query: _Query, error: BaseException | Failure) -> None:
    try:
        query.on_error(error)
    except Exception:
        log.failure("passing on the failure of a query failed")


def _same_question(datagram: bytes, question: Question) -> bool:
    try:
        _, qname, qtype, qclass = parse_response_question(datagram)
    except WireError:
        return False
    return (qname, qtype, qclass) == (question.qname, question.qtype, question.qclass)


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


# Random octets are taken from the OS this many at a time: query IDs and socket choices need
# unpredictable values (RFC 5452), and one getrandom() per 2,000 queries costs far less than
# one per query.
_RANDOM_BATCH = 4096


class DnsUpstream:
    """A set of DNS servers tried in order, each with a per-query timeout.

    Timeouts are kept on a wheel of ``tick``-second slots, turned by one timer while queries
    are out, rather than a reactor timer per query: a query fails between ``timeout`` and
    ``timeout + tick`` seconds after it was sent.
    """

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
        self._retired: set[_UdpSocket] = set()
        self._families = {host: ipaddress.ip_address(host).version for host, _ in self.servers}
        self._random = b""
        self._random_at = 0
        self.tick = min(0.1, timeout / 4) if timeout > 0 else 0.1
        self._per_tick = 1 / self.tick
        # Slot -> (socket serial << 16 | query ID) of the attempts that time out in it; an
        # answered attempt leaves its slot. Plain ints, so the wheel keeps no query alive and
        # the garbage collector has nothing to walk there.
        self._wheel: dict[int, set[int]] = {}
        self._turning: Any = None
        self._sockets: dict[int, _UdpSocket] = {}
        self._serial = 0
        # Datagrams to send once the reactor has read everything that is waiting: upstream
        # servers on this machine then wake once per batch rather than once per query.
        self._outbox: list[tuple[_UdpSocket, bytes, _Query, int]] = []
        self._flushing = False
        self._batch = read_batch(reactor)
        self.ignored = 0  # answers that did not match a question we asked
        self.queries = 0

    def resolve(self, data: bytes, question: Question) -> Deferred[bytes]:
        """The upstream's answer to ``data`` (its ID as the upstream sent it).

        Fails with UpstreamError when no server answers.
        """
        deferred: Deferred[bytes] = Deferred()
        self.ask(data, question, deferred.callback, deferred.errback)
        return deferred

    def ask(self, data: bytes, question: Question, on_answer: OnAnswer, on_error: OnError) -> None:
        """resolve() with plain callbacks, the listener's fast path: no Deferred per query.

        Exactly one of them is called, once, perhaps before this returns: ``on_answer`` with
        the answer, or ``on_error`` with an UpstreamError (a Failure for a bug). What they
        raise is logged.
        """
        query = _Query(data, question, on_answer, on_error)
        if not self.servers:
            _deliver_error(query, UpstreamError("no servers configured"))
        else:
            self._send(query)

    def _failed(self, query: _Query, problem: str) -> None:
        """The current server did not answer ``query``: on to the next one, or give up."""
        host, port = query.server
        query.problems.append(f"{host}:{port}: {problem}")
        query.index += 1
        if query.index < len(self.servers):
            self._send(query)
        else:
            _deliver_error(query, UpstreamError("; ".join(query.problems)))

    def _answered(self, query: _Query, answer: bytes) -> None:
        if answer[2] & 0x02:  # TC: ask the same server again over TCP
            tcp = Deferred.fromCoroutine(self._tcp(query.data, query.question, query.server))
            tcp.addCallbacks(
                self._tcp_answered, self._tcp_failed, callbackArgs=(query,), errbackArgs=(query,)
            )
        else:
            _deliver(query, answer)

    def _tcp_answered(self, answer: bytes, query: _Query) -> None:
        _deliver(query, answer)

    def _tcp_failed(self, failure: Failure, query: _Query) -> None:
        if isinstance(failure.value, UpstreamError):
            self._failed(query, str(failure.value))
        else:
            _deliver_error(query, failure)

    # --- UDP ---

    def _random_octets(self, count: int) -> bytes:
        at = self._random_at
        if at + count > len(self._random):
            self._random = os.urandom(_RANDOM_BATCH)
            at = 0
        self._random_at = at + count
        return self._random[at : at + count]

    def _socket(self, host: str, choice: int) -> _UdpSocket:
        family = self._families.get(host) or ipaddress.ip_address(host).version
        pool = self._pools.get(family)
        if pool is None:
            pool = self._pools[family] = []
        if len(pool) < self.pool_size:
            sock = _UdpSocket(self)
            self._serial += 1
            sock.serial = self._serial
            self._sockets[sock.serial] = sock
            interface = "::" if family == 6 else "0.0.0.0"
            # Answers up to a DNS message's largest size: Twisted reads 8,192 octets of a
            # datagram unless told, and a longer answer would be passed on cut short.
            sock.port = self.reactor.listenUDP(
                0, sock, interface=interface, maxPacketSize=MAX_MESSAGE
            )
            if hasattr(sock.port, "doRead"):
                self._batch.watch(sock.port)
            # Straight to the socket: Port.write checks the address is an IP address twice
            # per datagram, and ours always are.
            raw = getattr(sock.port, "socket", None)
            sock.sendto = raw.sendto if raw is not None else sock.port.write
            pool.append(sock)
        sock = pool[choice % len(pool)]
        sock.uses += 1
        if sock.uses >= self.rotate_after:
            # A fresh random port from now on; the old socket closes when its queries are done.
            sock.retired = True
            pool.remove(sock)
            self._retired.add(sock)
        return sock

    def _close_retired(self, sock: _UdpSocket) -> None:
        sock.close()
        self._retired.discard(sock)
        self._sockets.pop(sock.serial, None)

    def _send(self, query: _Query) -> None:
        """One UDP attempt of ``query`` at ``servers[query.index]``."""
        self.queries += 1
        server = query.server = self.servers[query.index]
        octets = self._random_octets(3)
        try:
            sock = self._socket(server[0], octets[2])
        except Exception as exc:
            self._failed(query, f"cannot open a UDP socket: {exc}")
            return
        qid = (octets[0] << 8) | octets[1]
        while qid in sock.pending:
            octets = self._random_octets(2)
            qid = (octets[0] << 8) | octets[1]
        sock.pending[qid] = query
        query.sock = sock
        query.qid = qid
        self._outbox.append((sock, struct.pack(">H", qid) + query.data[2:], query, qid))
        if not self._flushing:
            self._flushing = True
            self._batch.mark(self._flush)
        # The first slot that starts after the deadline: never early, at most a tick late.
        slot = query.slot = int((self.reactor.seconds() + self.timeout) * self._per_tick) + 1
        bucket = self._wheel.get(slot)
        if bucket is None:
            bucket = self._wheel[slot] = set()
        bucket.add(sock.serial << 16 | qid)
        if self._turning is None:
            self._turning = self.reactor.callLater(self.tick, self._turn)

    def _flush(self) -> None:
        self._flushing = False
        outbox, self._outbox = self._outbox, []
        for sock, packet, query, qid in outbox:
            try:
                sock.sendto(packet, query.server)
            except OSError as exc:
                # Like Port.write: a refusal left over from an earlier datagram is not this one's.
                if exc.errno == errno.ECONNREFUSED or sock.pending.get(qid) is not query:
                    continue
                del sock.pending[qid]
                if sock.retired and not sock.pending:
                    self._close_retired(sock)
                self._failed(query, f"cannot send: {exc}")

    def _turn(self) -> None:
        """Fail the attempts whose time is up; again in a tick while any are out."""
        self._turning = None
        now = int(self.reactor.seconds() * self._per_tick)
        for slot in sorted(slot for slot in self._wheel if slot <= now):
            for key in self._wheel.pop(slot):
                sock = self._sockets.get(key >> 16)
                query = None if sock is None else sock.pending.get(key & 0xFFFF)
                # Gone: answered. Another slot: its ID was reused by a later attempt.
                if sock is None or query is None or query.slot != slot:
                    continue
                del sock.pending[key & 0xFFFF]
                if sock.retired and not sock.pending:
                    self._close_retired(sock)
                self._failed(query, f"no answer within {self.timeout:g}s")
        if self._wheel:
            self._turning = self.reactor.callLater(self.tick, self._turn)

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
        if self._turning is not None and self._turning.active():
            self._turning.cancel()
        self._turning = None
        if self._flushing:
            self._batch.forget(self._flush)
        self._flushing = False
        self._outbox.clear()
        self._wheel.clear()
        socks = [sock for pool in self._pools.values() for sock in pool] + list(self._retired)
        self._pools.clear()
        self._retired.clear()
        self._sockets.clear()
        for sock in socks:
            pending = list(sock.pending.values())
            sock.pending.clear()
            sock.close()
            for query in pending:
                _deliver_error(query, UpstreamError("the gateway is stopping"))
