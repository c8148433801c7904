"""Datagrams written once the reactor has finished reading a socket.

A forwarder that sends each datagram the moment it has one wakes its peer once
per datagram. Queueing them and writing the queue when the reactor has read
everything waiting on a socket wakes the peer once per batch under load; when
queries come one at a time, the batch is that one datagram and it leaves at the
end of the same read, with no extra turn of the reactor (a ``callLater(0)``
costs a timer, an ``epoll_wait`` and a loop iteration per query).

``ReadBatch.watch(port)`` wraps a UDP port's ``doRead`` so that the outboxes
marked during the read are flushed when it returns. Outboxes marked outside any
watched read (a timer, a TCP connection, a DoH request) are flushed on the
reactor's next turn, as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

Flush = Callable[[], None]

_BATCHES: weakref.WeakKeyDictionary[Any, ReadBatch] = weakref.WeakKeyDictionary()


class ReadBatch:
    """The flushes waiting for the current read of one reactor to end."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.reading = 0
        self._waiting: list[Flush] = []
        self._call: Any = None

    def watch(self, port: Any) -> None:
        """Flush what the datagrams read from ``port`` queued, once the read is over."""
        read = port.doRead

        def do_read() -> Any:
            self.reading += 1
            try:
                return read()
            finally:
                self.reading -= 1
                if not self.reading and self._waiting:
                    self.run()

        port.doRead = do_read

    def mark(self, flush: Flush) -> None:
        """Run ``flush`` once the current read ends, or on the reactor's next turn.

        The caller marks an outbox once, when its first datagram is queued.
        """
        self._waiting.append(flush)
        if not self.reading and self._call is None:
            self._call = self.reactor.callLater(0, self.run)

    def run(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        while self._waiting:
            waiting, self._waiting = self._waiting, []
            for flush in waiting:
                flush()

    def forget(self, flush: Flush) -> None:
        """``flush`` must not run any more (its socket is closing)."""
        self._waiting = [f for f in self._waiting if f != flush]
        if not self._waiting and self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None


def read_batch(reactor: Any) -> ReadBatch:
    """The batch of ``reactor`` (one per reactor, made on first use)."""
    batch = _BATCHES.get(reactor)
    if batch is None:
        batch = _BATCHES[reactor] = ReadBatch(reactor)
    return batch
