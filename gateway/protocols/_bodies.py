"""Request bodies for the gateway's HTTP clients (web hooks, uploads, DNS over HTTPS)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer  # type: ignore[import-untyped]

__all__ = ["BytesProducer", "FileProducer"]


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, for ``Agent.request``.

    It writes the whole body at once, so it needs no cooperator and no global
    reactor (``twisted.web.client.FileBodyProducer`` needs both). ``length``
    is known, so the request carries a Content-Length instead of chunks.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class FileProducer:
    """A request body streamed from a file on disk (between ``prefix`` and ``suffix``), a
    block at a time, paused while the connection's buffer is full; ``on_progress`` is
    called after each block (a stall timer restarts on it)."""

    BLOCK = 256 * 1024

    def __init__(
        self,
        reactor: Any,
        path: str,
        prefix: bytes = b"",
        suffix: bytes = b"",
        on_progress: Callable[[], object] = lambda: None,
    ) -> None:
        self.reactor = reactor
        self.path = path
        self.prefix = prefix
        self.suffix = suffix
        self.on_progress = on_progress
        self.length = len(prefix) + os.path.getsize(path) + len(suffix)
        self._file: BinaryIO | None = None
        self._consumer: Any = None
        self._done: Deferred[None] = Deferred()
        self._call: Any = None
        self._paused = False
        self._stopped = False
        self._stage = 0  # 0: prefix, 1: the file, 2: suffix, 3: done

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed when done or stopped)
        self._schedule()
        return self._done

    def _schedule(self) -> None:
        if self._call is None and not self._paused and not self._stopped:
            self._call = self.reactor.callLater(0, self._step)

    def _step(self) -> None:
        self._call = None
        if self._paused or self._stopped:
            return
        try:
            chunk = self._next()
        except OSError as exc:
            self._close()
            self._done.errback(exc)
            return
        if chunk:
            self._consumer.write(chunk)
            self.on_progress()
        if self._stage == 3:
            self._close()
            self._done.callback(None)
        else:
            self._schedule()

    def _next(self) -> bytes:
        if self._stage == 0:
            self._stage = 1
            if self.prefix:
                return self.prefix
        if self._stage == 1:
            assert self._file is not None
            block = self._file.read(self.BLOCK)
            if block:
                return block
            self._stage = 2
        self._stage = 3
        return self.suffix

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def pauseProducing(self) -> None:
        self._paused = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        # The request was given up: the Deferred of startProducing does not fire.
        self._stopped = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self._close()
