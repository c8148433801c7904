"""Files fetched from an ``http`` destination by name: TFTP reads answered from a web server.

The name is joined to the destination's URL (``http://boot.example/tftp/`` and
``pxelinux/ipxe.efi`` fetch ``/tftp/pxelinux/ipxe.efi``) after it is tidied
as a folder tidies it (``tidy_name``): ``..`` may not climb above the URL's path.  The
body is streamed: it is read from the server as the client takes it, a few
hundred kilobytes ahead at most (the server's socket is paused beyond that), so
the first block goes out as soon as it has arrived and a file of any size costs
the same memory.  The size is the answer's ``Content-Length`` when it has one.
A 404 or 410 is "file not found", 401 and 403 "access violation", any other
answer or a server that cannot be reached "not defined" with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from gateway import __version__
from gateway.ports import FileProblem, FileReader, tidy_name
from gateway.protocols._streamed import StreamedFile

log = Logger(namespace="gateway.http.files")


# What a server that cannot be reached or does not answer raises: the next one is tried.
_UNREACHABLE = (
    error.ConnectError,
    error.DNSLookupError,
    error.TimeoutError,
    defer.TimeoutError,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
)


class _Body(Protocol):
    def __init__(self, reader: HttpFile) -> None:
        self.reader = reader

    def dataReceived(self, data: bytes) -> None:
        self.reader.arrived(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reader.body_ended(reason)


class HttpFile(StreamedFile):
    """The body of one answer, read by the block, with back-pressure on the server."""

    def __init__(self, response: Any, url: str) -> None:
        length = response.length
        super().__init__(length if isinstance(length, int) else None)
        self.url = url
        self.body = _Body(self)
        response.deliverBody(self.body)

    def body_ended(self, reason: Failure | None) -> None:
        problem: Any = reason.value if reason is not None else None
        broken = problem is not None and not isinstance(problem, ResponseDone | PotentialDataLoss)
        self.ended(
            FileProblem("unavailable", f"{self.url} broke off: {problem}") if broken else None
        )

    def pause(self) -> None:
        if self.body.transport is not None:
            self.body.transport.pauseProducing()

    def resume(self) -> None:
        if self.body.transport is not None:
            self.body.transport.resumeProducing()

    def stop(self) -> None:
        if self.body.transport is not None:
            self.body.transport.stopProducing()  # the client left: stop downloading


class HttpFiles:
    """GETs of names below the destination's URLs, on a pool of kept-alive connections.

    ``endpoints`` gives, for an upstream URL, the endpoint the reverse proxy uses
    for it (so TLS settings are the destination's).
    """

    def __init__(
        self,
        reactor: Any,
        choose: Callable[[list[Any]], Any],
        timeout: float,
    ) -> None:
        self.reactor = reactor
        self.choose = choose
        self.timeout = timeout
        untyped: Any = HTTPConnectionPool  # Twisted's web client has no annotations
        self.pool = untyped(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 8
        self.fetched = 0
        self.failures = 0
        self.agents: dict[int, Any] = {}  # one Agent per upstream (by id: they live as long)

    async def fetch(self, name: str) -> FileReader:
        path = tidy_name(name)
        tried: list[Any] = []
        errors: list[str] = []
        while True:
            upstream = self.choose(tried)
            if upstream is None:
                self.failures += 1
                why = "; ".join(errors) or "every one failed a moment ago"
                raise FileProblem("unavailable", f"no web server answered ({why})")
            tried.append(upstream)
            url = f"{upstream.url.scheme}://{upstream.authority.decode()}{upstream.url.path}"
            url = url.rstrip("/") + "/" + quote(path)
            try:
                response = await self._get(upstream, url)
            except _UNREACHABLE as exc:
                why = f"{url}: {exc.__class__.__name__} {exc}".strip()
                upstream.failed(why)
                errors.append(why)
                continue
            return self._answer(response, url, name)

    async def _get(self, upstream: Any, url: str) -> Any:
        agent = self.agents.get(id(upstream))
        if agent is None:
            endpoint = upstream.endpoint

            class _One:
                def endpointForURI(self, uri: Any) -> Any:
                    return endpoint

            untyped: Any = Agent
            agent = untyped.usingEndpointFactory(self.reactor, _One(), pool=self.pool)
            self.agents[id(upstream)] = agent
        headers = Headers({b"user-agent": [f"gateway/{__version__} (tftp)".encode()]})
        d: Deferred[Any] = agent.request(b"GET", url.encode(), headers)
        d.addTimeout(self.timeout, self.reactor)
        return await d

    def _answer(self, response: Any, url: str, name: str) -> FileReader:
        status = int(response.code)
        if 200 <= status < 300:
            self.fetched += 1
            return HttpFile(response, url)
        _discard(response)
        if status in (404, 410):
            raise FileProblem("not-found", f"no file '{name}' ({url} answered {status})")
        if status in (401, 403):
            raise FileProblem("denied", f"'{name}': {url} answered {status}")
        self.failures += 1
        raise FileProblem("unavailable", f"{url} answered {status}")

    async def close(self) -> None:
        closing: Any = self.pool.closeCachedConnections()
        if closing is not None:
            await closing


def _discard(response: Any) -> None:
    """Read and drop an error answer's body, so its connection can be used again."""
    body = Protocol()
    response.deliverBody(body)
