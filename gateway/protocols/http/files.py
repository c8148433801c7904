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

from collections import deque
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

log = Logger(namespace="gateway.http.files")

AHEAD = 256 * 1024  # bytes read from the server beyond what the client has taken

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
        self.reader.ended(reason)


class HttpFile(FileReader):
    """The body of one answer, read by the block, with back-pressure on the server.

    The pieces are kept as they arrived (no copying into one buffer); a read takes
    whole pieces, cutting one only when it asks for less.
    """

    def __init__(self, response: Any, url: str) -> None:
        length = response.length
        self.size = length if isinstance(length, int) else None
        self.url = url
        self.pieces: deque[bytes] = deque()
        self.held = 0  # bytes in pieces
        self.done = False
        self.problem: FileProblem | None = None
        self.paused = False
        self.waiting: Deferred[None] | None = None
        self.wanted = 0
        self.body = _Body(self)
        response.deliverBody(self.body)

    def arrived(self, data: bytes) -> None:
        self.pieces.append(data)
        self.held += len(data)
        if self.held > AHEAD and not self.paused and self.body.transport is not None:
            self.paused = True
            self.body.transport.pauseProducing()
        if self.held >= self.wanted:
            self._wake()

    def ended(self, reason: Failure | None) -> None:
        self.done = True
        problem: Any = reason.value if reason is not None else None
        if problem is not None and not isinstance(problem, ResponseDone | PotentialDataLoss):
            self.problem = FileProblem("unavailable", f"{self.url} broke off: {problem}")
        self._wake()

    def _wake(self) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback(None)

    async def read(self, n: int) -> bytes:
        while self.held < n and not self.done:
            self.wanted = n
            self.waiting = Deferred()
            await self.waiting
        if self.problem is not None and self.held < n:
            raise self.problem
        return self._take(n)

    def read_now(self, n: int) -> bytes | None:
        """What has arrived, up to ``n`` bytes (None when nothing has, yet)."""
        if not self.held:
            if not self.done:
                return None
            if self.problem is not None:
                raise self.problem
            return b""
        return self._take(n)

    def _take(self, n: int) -> bytes:
        taken: list[bytes] = []
        want = n
        while want > 0 and self.pieces:
            piece = self.pieces.popleft()
            if len(piece) > want:
                self.pieces.appendleft(piece[want:])
                piece = piece[:want]
            taken.append(piece)
            want -= len(piece)
        chunk = taken[0] if len(taken) == 1 else b"".join(taken)
        self.held -= len(chunk)
        if self.paused and self.held < AHEAD // 2 and self.body.transport is not None:
            self.paused = False
            self.body.transport.resumeProducing()
        return chunk

    def close(self) -> None:
        if not self.done and self.body.transport is not None:
            self.body.transport.stopProducing()  # the client left: stop downloading
        self.done = True


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
