# mypy: disallow-untyped-calls=False
# (Twisted's epoll reactor has no type annotations.)
"""The gateway's reactor: Twisted's epoll reactor with less work per event.

Two changes, both invisible to protocols:

* **Writes go out at the end of the loop's turn, not one turn later.** A
  transport that has data asks the reactor to watch its socket for
  writability; Twisted's epoll reactor then registers the socket (an
  ``epoll_ctl``), returns to ``epoll_wait`` only to learn that the socket is
  writable, sends, and unregisters it again (a second ``epoll_ctl``). Here the
  request is noted instead, and once the turn's events and timed calls have
  run, every noted transport writes at once. Only a transport whose socket
  takes less than it has (the peer reads slowly) is registered with epoll,
  as before. Writes made during one turn still leave as one ``send``. A
  request-response exchange (an SMTP reply, an NNTP command, an HTTP
  response) saves two system calls and one turn of the loop.
* **No legacy logging context per event.** Twisted wraps each ready socket's
  work in ``log.callWithLogger``, which copies a context dictionary for the
  old ``twisted.python.log`` API's log prefixes. The gateway logs through
  ``twisted.logger``, which does not read it.

Everything else (timed calls, threads, signals, the waker) is the epoll
reactor's own.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.epollreactor import EPollReactor


class GatewayReactor(EPollReactor):
    """An epoll reactor that writes at the end of each turn (see the module's doc)."""

    _FLUSH_ROUNDS = 2  # writers that ask again while being flushed wait for epoll after that

    def __init__(self) -> None:
        # Writers waiting for the end of the turn, in the order they asked.
        self._pending_writers: dict[Any, None] = {}
        # The writers of the flush in progress that have not had their turn yet.
        self._batch: dict[Any, None] = {}
        self._flushing: Any = None
        self._flushing_removed = False
        super().__init__()

    # --- writers ---

    def addWriter(self, writer: Any) -> None:
        if writer in self._pending_writers or writer in self._batch:
            return
        if self._continuousPolling.isWriting(writer):
            return
        try:
            fd = writer.fileno()
        except Exception:
            fd = -1
        if fd != -1 and fd in self._writes:
            return  # epoll already watches it
        # A descriptor that is closed already (-1) goes through the flush too, where
        # the reactor's usual handling disconnects it.
        self._pending_writers[writer] = None

    def removeWriter(self, writer: Any) -> None:
        if writer is self._flushing:
            self._flushing_removed = True
        # Stopped before its turn in the flush in progress (another writer's doWrite
        # closed or aborted it): it must not write then, as epoll would not ask it to.
        self._batch.pop(writer, None)
        if self._pending_writers.pop(writer, self) is not self:
            return
        super().removeWriter(writer)

    def getWriters(self) -> list[Any]:
        writers: list[Any] = super().getWriters()
        return writers + [w for w in self._pending_writers if w not in writers]

    def removeAll(self) -> list[Any]:
        pending, self._pending_writers = self._pending_writers, {}
        removed: list[Any] = super().removeAll()
        return removed + [w for w in pending if w not in removed]

    def _register_pending(self) -> None:
        pending, self._pending_writers = self._pending_writers, {}
        for writer in pending:
            self._watch_for_writing(writer)

    def _watch_for_writing(self, writer: Any) -> None:
        try:
            super().addWriter(writer)
        except ValueError:
            pass  # closed already (its descriptor is -1): nothing to watch
        except OSError as exc:
            # The socket is gone (closed under us): the transport finds out on its own.
            if exc.errno not in (errno.EBADF, errno.ENOENT):
                raise

    def flush_writers(self) -> None:
        """Let every transport that asked during this turn write now."""
        rounds = 0
        while self._pending_writers and rounds < self._FLUSH_ROUNDS:
            rounds += 1
            self._batch, self._pending_writers = self._pending_writers, {}
            try:
                while self._batch:
                    writer = next(iter(self._batch))
                    del self._batch[writer]
                    self._flush_one(writer)
            finally:
                if self._batch:  # only after an unexpected error: the rest go next turn
                    self._pending_writers.update(self._batch)
                    self._batch = {}
        if self._pending_writers:
            self._register_pending()

    def _flush_one(self, writer: Any) -> None:
        try:
            fd = writer.fileno()
        except Exception:
            fd = -1
        self._flushing = writer
        self._flushing_removed = False
        try:
            # The same handling as a writable event from epoll: doWrite, and a
            # disconnection when it fails or the descriptor is gone.
            self._doReadOrWrite(writer, fd, self._POLL_OUT)
        finally:
            self._flushing = None
        if not self._flushing_removed and writer not in self._pending_writers:
            # It still has data: the socket's buffer is full. Wait for epoll.
            self._watch_for_writing(writer)

    # --- the loop ---

    def runUntilCurrent(self) -> None:
        super().runUntilCurrent()
        # mainLoop calls this after every doIteration and before computing the
        # next timeout: the end of a turn.
        if self._pending_writers:
            self.flush_writers()

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                handle(selectable, fd, event)

    doIteration = doPoll


def install() -> GatewayReactor:
    """Install the gateway's reactor; call before anything imports the default one."""
    from twisted.internet.main import installReactor

    reactor = GatewayReactor()
    installReactor(reactor)
    return reactor


def install_if_default() -> None:
    """Install the gateway's reactor unless one is installed already (an embedding program's)."""
    import sys

    if "twisted.internet.reactor" in sys.modules:
        return
    install()
