"""The gateway's reactor (gateway/reactor.py) over real loopback sockets.

Each test runs its own GatewayReactor (not the installed one) until the scenario
is done or a deadline passes.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import protocol
from twisted.internet.defer import Deferred

from gateway.reactor import GatewayReactor


class _CountingPoller:
    """Wraps the reactor's epoll object and counts the calls that change it."""

    def __init__(self, poller: Any) -> None:
        self._poller = poller
        self.changes = 0

    def register(self, fd: int, flags: int) -> None:
        self.changes += 1
        self._poller.register(fd, flags)

    def modify(self, fd: int, flags: int) -> None:
        self.changes += 1
        self._poller.modify(fd, flags)

    def unregister(self, fd: int) -> None:
        self.changes += 1
        self._poller.unregister(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


def _run(
    reactor: GatewayReactor, scenario: Callable[[], Deferred[Any]], timeout: float = 20
) -> Any:
    """Run ``scenario`` on ``reactor``; its result, or its exception raised here."""
    outcome: dict[str, Any] = {}

    def start() -> None:
        d = scenario()
        d.addCallbacks(
            lambda r: outcome.setdefault("result", r), lambda f: outcome.setdefault("failure", f)
        )
        d.addBoth(lambda _: reactor.stop())

    def too_long() -> None:
        outcome.setdefault("failure", TimeoutError(f"the scenario took more than {timeout}s"))
        reactor.stop()

    reactor.callWhenRunning(start)
    timer = reactor.callLater(timeout, too_long)
    reactor.run(installSignalHandlers=False)
    if timer.active():
        timer.cancel()
    failure = outcome.get("failure")
    if isinstance(failure, BaseException):
        raise failure
    if failure is not None:
        failure.raiseException()
    return outcome.get("result")


class _LineEcho(protocol.Protocol):
    """Answers each line with ``ok <line>``."""

    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line == b"quit":
                self.transport.write(b"bye\n")  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.transport.write(b"ok " + line + b"\n")  # type: ignore[union-attr]


class _Collect(protocol.Protocol):
    """Collects what arrives; ``done`` fires with it when the connection closes."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()
        self.on_data: Callable[[_Collect], None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.on_data is not None:
            self.on_data(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.received))


def _listen(reactor: GatewayReactor, build: Callable[[], protocol.Protocol]) -> tuple[Any, int]:
    factory = protocol.Factory.forProtocol(build)  # type: ignore[arg-type]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, port.getHost().port


def test_request_response_without_registering_for_writes() -> None:
    """Replies that fit the socket leave at the end of the turn: epoll is not touched for them."""
    reactor = GatewayReactor()
    counter = _CountingPoller(reactor._poller)
    reactor._poller = counter
    lines = 200

    async def scenario() -> tuple[bytes, int]:
        port, number = _listen(reactor, _LineEcho)
        client = _Collect()
        creator = protocol.ClientCreator(reactor, lambda: client)
        proto = await creator.connectTCP("127.0.0.1", number)
        state = {"sent": 0}

        def next_line(c: _Collect) -> None:
            # One line at a time: each reply comes back before the next request.
            if c.received.count(b"\n") == state["sent"] and state["sent"] < lines:
                state["sent"] += 1
                c.transport.write(b"line %d\n" % state["sent"])  # type: ignore[union-attr]
            elif c.received.count(b"\n") == lines:
                c.on_data = None
                c.transport.write(b"quit\n")  # type: ignore[union-attr]

        proto.on_data = next_line
        before = counter.changes
        state["sent"] = 1
        proto.transport.write(b"line 1\n")
        received = await proto.done
        changes = counter.changes - before
        await port.stopListening()
        return received, changes

    received, changes = _run(reactor, lambda: Deferred.fromCoroutine(scenario()))
    replies = received.split(b"\n")
    assert replies[:lines] == [b"ok line %d" % n for n in range(1, lines + 1)]
    assert replies[lines] == b"bye"
    # 400 writes; epoll changes only for accepting, connecting and closing, not per write.
    assert changes < 20, changes


def test_writes_of_one_turn_leave_as_one_send() -> None:
    """Several writes in one callback are still one segment for the peer to read."""
    reactor = GatewayReactor()

    class Burst(protocol.Protocol):
        def connectionMade(self) -> None:
            for n in range(50):
                self.transport.write(b"%02d," % n)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

    async def scenario() -> bytes:
        port, number = _listen(reactor, Burst)
        with socket.create_connection(("127.0.0.1", number)) as s:
            # The peer is a blocking socket read from the reactor's thread, so read
            # only once the reactor has had its turn.
            done: Deferred[None] = Deferred()
            reactor.callLater(0.3, done.callback, None)
            await done
            first = s.recv(65536)
        await port.stopListening()
        return first

    first = _run(reactor, lambda: Deferred.fromCoroutine(scenario()))
    assert first == b"".join(b"%02d," % n for n in range(50))


def test_large_write_to_a_slow_reader_waits_for_epoll_and_arrives_whole() -> None:
    reactor = GatewayReactor()
    payload = os.urandom(1 << 16) * 128  # 8 MiB: far more than the socket buffers hold
    seen: dict[str, Any] = {}

    class Sender(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(payload)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

    async def scenario() -> bytes:
        port, number = _listen(reactor, Sender)
        client = _Collect()
        proto = await protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", number
        )
        proto.transport.pauseProducing()
        wait: Deferred[None] = Deferred()
        reactor.callLater(0.3, wait.callback, None)
        await wait
        # The sender could not write everything: it waits for epoll to say writable.
        seen["writers"] = len(reactor._writes)
        seen["received_while_paused"] = len(client.received)
        proto.transport.resumeProducing()
        data = await client.done
        await port.stopListening()
        return data

    data = _run(reactor, lambda: Deferred.fromCoroutine(scenario()))
    assert seen["writers"] == 1
    assert seen["received_while_paused"] == 0
    assert len(data) == len(payload) and data == payload
    assert not reactor._writes and not reactor._pending_writers


def test_abort_while_a_write_is_pending() -> None:
    reactor = GatewayReactor()

    class WriteThenAbort(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"never sent")  # type: ignore[union-attr]
            self.transport.abortConnection()  # type: ignore[union-attr]

    async def scenario() -> bytes:
        port, number = _listen(reactor, WriteThenAbort)
        client = _Collect()
        await protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", number)
        data = await client.done
        await port.stopListening()
        return data

    assert _run(reactor, lambda: Deferred.fromCoroutine(scenario())) == b""
    assert not reactor._pending_writers and not reactor._writes


def test_connection_refused_is_reported() -> None:
    """An outgoing connection (its connect uses the write path) fails cleanly."""
    reactor = GatewayReactor()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]

    async def scenario() -> str:
        try:
            await protocol.ClientCreator(reactor, protocol.Protocol).connectTCP(
                "127.0.0.1", closed_port, timeout=5
            )
        except Exception as exc:
            return type(exc).__name__
        return "connected"

    assert _run(reactor, lambda: Deferred.fromCoroutine(scenario())) == "ConnectionRefusedError"


def test_process_stdin_and_stdout() -> None:
    """Pipes to a child process use the same writer path."""
    reactor = GatewayReactor()
    data = b"x" * 300_000 + b"\nend\n"

    class Child(protocol.ProcessProtocol):
        def __init__(self) -> None:
            self.out = bytearray()
            self.done: Deferred[bytes] = Deferred()

        def connectionMade(self) -> None:
            self.transport.write(data)  # type: ignore[union-attr]
            self.transport.closeStdin()  # type: ignore[union-attr]

        def outReceived(self, chunk: bytes) -> None:
            self.out += chunk

        def outConnectionLost(self) -> None:
            # Not processEnded: _run runs the reactor without signal handlers, so no
            # SIGCHLD; a child whose pipes close just before it can be reaped (a busy
            # machine) would then never be reported ended, and the test hung.
            self.done.callback(bytes(self.out))

    async def scenario() -> bytes:
        child = Child()
        reactor.spawnProcess(child, sys.executable, [sys.executable, "-c",
                             "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"],
                             env=os.environ.copy())  # fmt: skip
        return await child.done

    assert _run(reactor, lambda: Deferred.fromCoroutine(scenario())) == data


def test_remove_all_returns_a_pending_writer() -> None:
    """removeAll (the reactor's stop) in the same turn as a write still returns the writer."""
    reactor = GatewayReactor()
    seen: dict[str, Any] = {}

    class WriteAndRemoveAll(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"hello")  # type: ignore[union-attr]
            seen["writers"] = reactor.getWriters()
            seen["removed"] = reactor.removeAll()
            seen["pending"] = dict(reactor._pending_writers)
            seen["transport"] = self.transport

    async def scenario() -> None:
        port, number = _listen(reactor, WriteAndRemoveAll)
        with socket.create_connection(("127.0.0.1", number)):
            wait: Deferred[None] = Deferred()
            reactor.callLater(0.3, wait.callback, None)
            await wait
        seen["transport"].abortConnection()
        await port.stopListening()

    _run(reactor, lambda: Deferred.fromCoroutine(scenario()))
    assert seen["transport"] in seen["writers"]
    assert seen["transport"] in seen["removed"]
    assert seen["pending"] == {}


@pytest.mark.parametrize("count", [1, 30])
def test_many_clients_each_get_their_replies(count: int) -> None:
    reactor = GatewayReactor()

    async def scenario() -> list[bytes]:
        port, number = _listen(reactor, _LineEcho)
        clients = []
        for _ in range(count):
            c = _Collect()
            proto = await protocol.ClientCreator(reactor, lambda c=c: c).connectTCP(
                "127.0.0.1", number
            )
            proto.transport.write(b"a\nb\nquit\n")
            clients.append(c)
        results = [await c.done for c in clients]
        await port.stopListening()
        return results

    results = _run(reactor, lambda: Deferred.fromCoroutine(scenario()))
    assert results == [b"ok a\nok b\nbye\n"] * count


def test_a_closed_descriptor_asking_to_write_is_disconnected_not_an_error() -> None:
    from twisted.internet import abstract

    reactor = GatewayReactor()

    class Closed(abstract.FileDescriptor):
        lost: Any = None

        def fileno(self) -> int:
            return -1

        def writeSomeData(self, data: bytes) -> int:
            raise AssertionError("a closed descriptor must not be written")

        def connectionLost(self, reason: Any) -> None:
            self.lost = reason

    closed = Closed(reactor)
    reactor.addWriter(closed)
    assert closed in reactor.getWriters()
    reactor.runUntilCurrent()  # the end of a turn: the flush
    assert closed.lost is not None
    assert not reactor._pending_writers and closed not in reactor.getWriters()


def test_a_writer_stopped_by_an_earlier_one_in_the_same_flush_does_not_write() -> None:
    """As with epoll: once a connection stops writing (aborted), it is not asked to write."""
    from twisted.internet import abstract

    reactor = GatewayReactor()
    read_a, write_a = os.pipe()
    read_b, write_b = os.pipe()
    wrote: list[str] = []

    class Pipe(abstract.FileDescriptor):
        def __init__(self, name: str, fd: int) -> None:
            super().__init__(reactor)
            self.name = name
            self.fd = fd
            self.other: Pipe | None = None

        def fileno(self) -> int:
            return self.fd

        def doWrite(self) -> None:
            wrote.append(self.name)
            if self.other is not None:
                self.other.stopWriting()  # what abortConnection does first
            self.stopWriting()

    a, b = Pipe("a", write_a), Pipe("b", write_b)
    a.other = b
    try:
        a.startWriting()
        b.startWriting()
        reactor.runUntilCurrent()
        assert wrote == ["a"]
        assert not reactor._pending_writers and not reactor._writes and not reactor._batch
        # Each on its own is flushed as usual.
        b.startWriting()
        reactor.runUntilCurrent()
        assert wrote == ["a", "b"]
    finally:
        for fd in (read_a, write_a, read_b, write_b):
            os.close(fd)
