"""HTTP/2 on TLS listeners (ALPN ``h2``), when the ``h2`` package is installed.

twisted.web's ``H2Connection`` does the framing; each stream's request is
handed to the listener as an exchange with the same interface as an HTTP/1.1
one, so routing, proxying and web hooks are the same.  Unlike HTTP/1.1,
twisted.web collects an HTTP/2 request body before the request is handled (in
a temporary file beyond 100 KiB, not in memory); the response is streamed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.logger import Logger
from twisted.web import http

from gateway.protocols.http.codec import HOP_BY_HOP, REASONS, Head

if TYPE_CHECKING:
    from gateway.protocols.http.server import Exchange, HttpServerProtocol

log = Logger(namespace="gateway.http.h2")

try:
    from twisted.web._http2 import H2Connection

    AVAILABLE = True
except ImportError:  # the h2 package is missing: HTTP/1.1 only
    AVAILABLE = False

_PIECE = 64 * 1024


class H2Exchange:
    """One HTTP/2 stream, with the interface of server.Exchange."""

    def __init__(self, http_request: http.Request, client: str) -> None:
        request: Any = http_request
        self.request = request
        self.client = client
        self.scheme = b"https"
        self.http10 = False
        self.started = False
        self.responded = False
        self.closed = False
        self.on_lost: Callable[[], None] | None = None
        content = request.content
        content.seek(0, 2)
        size = content.tell()
        content.seek(0)
        headers = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            if name.lower() not in HOP_BY_HOP and name.lower() != b"content-length"
            for value in values
        ]
        if size or request.method not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE"):
            headers.append((b"Content-Length", b"%d" % size))
        host = request.getHeader(b"host") or b""
        self.head = Head(
            request.method, request.uri, b"HTTP/1.1", 0, b"", headers, True, size,
            host=host.encode() if isinstance(host, str) else host,
        )  # fmt: skip
        self.body_done = size == 0
        self.body_read = 0
        self._sink: Any = None
        self._paused = False
        # For /metrics, as on server.Exchange; on_done is told once the stream is over.
        self.began = 0.0
        self.route: str | None = None
        self.outcome = ""
        self.status = 0
        self.on_done: Callable[[Any], None] | None = None
        request.notifyFinish().addErrback(self._lost)

    def _over(self) -> None:
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(self)

    def _lost(self, failure: Any) -> None:
        self.closed = True
        if not self.responded:
            self.responded = True
            if self.on_lost is not None:
                self.on_lost()
            self._over()

    # --- the request body (already complete) ----------------------------------------

    def read_body(self, sink: Any) -> None:
        self._sink = sink
        self._feed()

    def _feed(self) -> None:
        content = self.request.content
        while not self._paused and not self.body_done and not self.closed:
            data = content.read(_PIECE)
            if not data:
                self.body_done = True
                self._sink.body_end()
                return
            self.body_read += len(data)
            self._sink.body_data(data)

    def pause_body(self) -> None:
        self._paused = True

    def resume_body(self) -> None:
        if self._paused:
            self._paused = False
            self._feed()

    # --- the response ----------------------------------------------------------------

    def start(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.start_raw(status, b"", headers, length)

    def start_raw(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        request = self.request
        request.setResponseCode(status, reason or REASONS.get(status, "Unknown").encode())
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                request.responseHeaders.addRawHeader(name, value)
        self.started = True
        self.status = status

    def write(self, data: bytes) -> None:
        if data and not self.closed:
            self.request.write(data)

    def close_after(self) -> None:
        pass  # HTTP/2 ends the stream, never the connection

    def cork(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        if self.responded:
            return
        self.responded = True
        self._over()
        if self.request.producer is not None:
            self.request.unregisterProducer()
        if not self.closed:
            self.request.finish()

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if self.started:
            self.abort()
            return
        headers = [(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body))]
        self.start(status, headers + (extra or []), len(body))
        if self.request.method != b"HEAD":
            self.write(body)
        self.finish()

    def error(self, status: int, text: str) -> None:
        self.respond(status, text.encode("utf-8", "replace") + b"\n")

    def json(self, status: int, value: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.respond(status, json.dumps(value).encode() + b"\n", b"application/json", extra)

    def abort(self) -> None:
        self.responded = True
        self._over()
        if not self.closed:
            self.closed = True
            # Resets this stream only; the connection's other streams go on.
            self.request.channel.abortConnection()

    def producer(self, producer: Any) -> None:
        if producer is None:
            if self.request.producer is not None:
                self.request.unregisterProducer()
        elif not self.closed:
            self.request.registerProducer(producer, True)


def switch(protocol: HttpServerProtocol, first: bytes) -> Any:
    """Hand a connection that negotiated ``h2`` to twisted.web's HTTP/2 framing."""
    factory = protocol.factory
    client = protocol.client

    class _Request(http.Request):
        def process(self) -> None:
            exchange = H2Exchange(self, client)
            exchange.on_done = protocol.factory.on_done
            try:
                factory.dispatch(cast("Exchange", exchange))
            except Exception:
                log.failure("HTTP/2 request handling failed")
                if not exchange.started:
                    exchange.error(500, "internal error in the gateway")

    connection: Any = H2Connection(protocol.factory.reactor)  # type: ignore[no-untyped-call]
    connection.requestFactory = _Request
    connection.site = None
    connection.factory = None
    connection.timeOut = protocol.factory.idle_timeout or None
    connection.callLater = protocol.factory.reactor.callLater
    connection.makeConnection(protocol.transport)
    protocol.transport.registerProducer(connection, True)
    connection.dataReceived(first)
    return connection
