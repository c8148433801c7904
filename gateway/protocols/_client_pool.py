"""Bookkeeping the SMTP and NNTP client pools share: connection slots and who waits for one.

Each pool keeps its own rules (which connection to reuse, when to retire it,
how to back off); only the counting and the hand-over live here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionRefusedError, DNSLookupError

__all__ = ["Slots", "connect_failure"]

_C = TypeVar("_C")


class Slots(Generic[_C]):
    """Connections open or being opened, never more than ``limit``, and the operations waiting.

    An operation that finds no free connection reserves a slot (and opens a
    connection in it) or waits. A waiter is given either a connection that
    someone released (the pool hands it over) or None: a freed slot, in which
    it opens a connection of its own.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self._waiters: deque[Deferred[_C | None]] = deque()
        self._drained: list[Deferred[None]] = []

    def reserve(self) -> bool:
        """Take a free slot; False when every slot is taken (then ``wait``)."""
        if self.taken < self.limit:
            self.taken += 1
            return True
        return False

    def wait(self) -> Deferred[_C | None]:
        """Queue for a connection or a slot, first come first served."""
        waiter: Deferred[_C | None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def next_waiter(self) -> Deferred[_C | None] | None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:  # a cancelled operation leaves a fired waiter behind
                return waiter
        return None

    def free(self) -> None:
        """A connection closed (or never opened): its slot goes to a waiter, or is free."""
        waiter = self.next_waiter()
        if waiter is not None:
            waiter.callback(None)  # the slot passes to the waiting operation
            return
        self.taken -= 1
        if self.taken == 0:
            drained, self._drained = self._drained, []
            for deferred in drained:
                deferred.callback(None)

    def fail_waiters(self, error: Callable[[], Exception]) -> None:
        """Fail every waiting operation, each with an exception of its own."""
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(error())

    async def drained(self) -> None:
        """Return once no slot is taken."""
        if self.taken:
            drained: Deferred[None] = Deferred()
            self._drained.append(drained)
            await drained


def connect_failure(exc: Exception, server: str, timeout: float) -> str:
    """Why a connection to ``server`` could not be made, for logs and failure texts."""
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s connecting to {server}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {server}"
    if isinstance(exc, DNSLookupError):
        return f"could not resolve the host name of {server}"
    return f"could not connect to {server}: {exc}"
