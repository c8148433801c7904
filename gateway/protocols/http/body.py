"""Request bodies for the gateway's HTTP clients (the web hook destination and DNS over HTTPS)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer  # type: ignore[import-untyped]

__all__ = ["BytesProducer"]


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
