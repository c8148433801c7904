"""The Twisted shell of the HTTP/1.1 server: moves bytes between a connection and the codec.

One request is handled at a time per connection (pipelined requests wait in
the buffer).  The request body is handed on as it arrives, with back-pressure,
so a proxied upload never sits whole in memory.  The handler (the listener)
decides everything; this module only frames.  Timeouts are checked by a
sweeper every half second rather than a timer per request, which keeps the
per-request cost low.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import interfaces, tcp
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from gateway.listening import Admission, Guard, retry_after
from gateway.protocols.http.codec import END, Head, ParseError, RequestReader, chunk, response_head

log = Logger(namespace="gateway.http.server")

_PLAIN_TCP = (tcp.Server, tcp.Client)

# Bytes of unread request data kept before the connection stops reading.
_READ_AHEAD = 256 * 1024


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data``, straight to the socket when nothing is queued before it.

    Twisted's ``write`` queues and sends on the reactor's next turn, which costs
    a write event and two epoll changes per write; most proxied requests and
    responses fit the socket's buffer at once.  Only plain TCP connections are
    written this way (a TLS transport encrypts in ``write``); whatever the socket
    does not take goes through ``write`` as usual, producers and all.  Relies on
    Twisted's ``FileDescriptor`` buffer attributes.
    """
    if (
        type(transport) in _PLAIN_TCP
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # write() meets the error again and handles it
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def closing_response(
    status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    """A whole plain-text response after which the connection closes."""
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
        (b"Connection", b"close"),
        *(extra or []),
    ]
    return response_head(status, headers) + body


class BodySink(Protocol):
    """Where a request body goes as it arrives."""

    def body_data(self, data: bytes) -> None: ...

    def body_end(self) -> None: ...


class Handler(Protocol):
    """Decides what each request gets (the listener)."""

    def handle(self, exchange: Exchange) -> None: ...


class Exchange:
    """One request and its response on a server connection."""

    __slots__ = (
        "_chunked",
        "_close",
        "_out",
        "_sink",
        "began",
        "body_deadline",
        "body_done",
        "body_read",
        "client",
        "head",
        "http10",
        "on_lost",
        "outcome",
        "protocol",
        "responded",
        "route",
        "scheme",
        "started",
        "status",
    )

    def __init__(self, protocol: HttpServerProtocol, head: Head) -> None:
        self.protocol = protocol
        self.head = head
        self.client = protocol.client
        self.scheme = protocol.scheme
        self.http10 = head.version == b"HTTP/1.0"
        self._sink: BodySink | None = None
        # Called when the client goes away before the response is complete.
        self.on_lost: Callable[[], None] | None = None
        self.body_done = head.length == 0
        self.body_deadline = 0.0
        self.body_read = 0
        self.started = False  # the response head is written
        self.responded = False  # the response is complete
        self._chunked = False
        self._close = not head.keep_alive
        # While not None, writes are collected here and sent together by flush().
        self._out: list[bytes] | None = None
        # For /metrics: the handler sets the first three; status is the response's.
        self.began = 0.0
        self.route: str | None = None
        self.outcome = ""
        self.status = 0

    # --- the request body -------------------------------------------------------

    def read_body(self, sink: BodySink) -> None:
        """Hand the body to ``sink`` from now on (the rest of it, as it arrives)."""
        self._sink = sink
        if self.head.expect_continue and not self.body_done and not self.started:
            self.protocol.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.protocol.pump()

    def pause_body(self) -> None:
        self.protocol.pause_reading("body")

    def resume_body(self) -> None:
        self.protocol.resume_reading("body")

    # --- the response -------------------------------------------------------------

    def start(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        """Write the response head; ``length`` None means the length is not known."""
        self.start_raw(status, b"", headers, length)

    def start_raw(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        if self.protocol.closing:
            self._close = True
        if length is None and self.head.method != b"HEAD" and status not in (204, 304):
            if self.http10:
                self._close = True
            else:
                self._chunked = True
                headers.append((b"Transfer-Encoding", b"chunked"))
        if not self.body_done:
            # The rest of the request body would have to be read and thrown away;
            # closing afterwards is simpler and safe.
            self._close = True
        if self._close:
            headers.append((b"Connection", b"close"))
        elif self.http10:
            headers.append((b"Connection", b"keep-alive"))
        if reason:
            # One join of a list (not of a generator): the cheapest way to build it.
            line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
            data = b"".join([line, *[b"%s: %s\r\n" % field for field in headers], b"\r\n"])
        else:
            data = response_head(status, headers)
        self.started = True
        self.status = status
        self._emit(data)

    def write(self, data: bytes) -> None:
        if data:
            self._emit(chunk(data) if self._chunked else data)

    def _emit(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        else:
            send_now(self.protocol.transport, data)

    def close_after(self) -> None:
        """Close the connection once this response is sent."""
        self._close = True

    def cork(self) -> None:
        """Collect what is written until flush(), to send it in one piece."""
        if self._out is None:
            self._out = []

    def flush(self) -> None:
        out, self._out = self._out, None
        if out:
            send_now(self.protocol.transport, b"".join(out) if len(out) > 1 else out[0])

    def finish(self) -> None:
        if self.responded:
            return
        if self._chunked:
            self._emit(b"0\r\n\r\n")
        self.flush()
        self.responded = True
        on_done = self.protocol.factory.on_done
        if on_done is not None:
            on_done(self)
        self.protocol.exchange_done(self, self._close)

    def respond(
        self, status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8",
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:  # fmt: skip
        """A whole small response at once."""
        if self.started:
            self.abort()
            return
        headers = [(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body))]
        if extra:
            headers.extend(extra)
        self.start(status, headers, len(body))
        if self.head.method != b"HEAD":
            self.write(body)
        self.finish()

    def error(self, status: int, text: str) -> None:
        """A short plain-text error answer."""
        self.respond(status, text.encode("utf-8", "replace") + b"\n")

    def json(self, status: int, value: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps(value).encode() + b"\n"
        self.respond(status, body, b"application/json", extra)

    def abort(self) -> None:
        """Give up on this exchange: the connection is dropped."""
        self._out = None
        self.responded = True
        self.protocol.abort()

    @property
    def closed(self) -> bool:
        return self.protocol.closed

    def producer(self, producer: Any) -> None:
        """Register (or with None, unregister) what feeds the response, for back-pressure."""
        transport = self.protocol.transport
        if producer is None:
            if self.protocol.producing:
                self.protocol.producing = False
                transport.unregisterProducer()
        elif not self.protocol.closed:
            self.protocol.producing = True
            transport.registerProducer(producer, True)

    # --- called by the protocol -------------------------------------------------------

    def _deliver(self, data: bytes | None) -> None:
        sink = self._sink
        assert sink is not None
        if data is None:
            self.body_done = True
            sink.body_end()
        else:
            self.body_read += len(data)
            if self.body_read > self.protocol.factory.max_body:
                raise ParseError(
                    413, f"the request body is larger than {self.protocol.factory.max_body} bytes"
                )
            sink.body_data(data)


class HttpServerProtocol(TwistedProtocol):
    """One client connection."""

    transport: Any

    def __init__(self, factory: HttpServerFactory) -> None:
        self.factory = factory
        self.reader = RequestReader(factory.max_header_size)
        self.exchange: Exchange | None = None
        self.client = ""
        self.scheme = b"http"
        self.closed = False
        self.closing = False
        self.producing = False
        self._paused: set[str] = set()
        self._pumping = False
        # The sweeper closes the connection when now - since > limit.
        self.since = 0.0
        self.limit = 0.0
        self.timeout_status = 408
        self._alpn_checked = False
        self._h2: Any = None  # twisted.web's H2Connection, when ALPN chose h2
        self.lingering = 0.0  # while closing lingeringly: when to stop waiting

    @property
    def reclaimable(self) -> bool:
        """Open, speaking HTTP/1 and not closing: closing it loses no request."""
        return not self.closed and not self.closing and self._h2 is None and not self.lingering

    def connectionMade(self) -> None:
        factory = self.factory
        peer = self.transport.getPeer()
        self.client = getattr(peer, "host", "") or ""
        if interfaces.ISSLTransport.providedBy(self.transport):
            self.scheme = b"https"
        admission = factory.guard.connect(self, self.client)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        self._wait(factory.idle_timeout, 0)
        if admission is Admission.OK:
            return
        self.closing = True
        if admission is Admission.NOT_ALLOWED:
            refusal = closing_response(403, b"this listener does not take requests from you\n")
        elif admission is Admission.CLIENT_CONNECTIONS:
            refusal = closing_response(
                429, b"too many connections from you\n", [(b"Retry-After", b"1")]
            )
        elif admission is Admission.CLIENT_RATE:
            wait = b"%d" % retry_after(factory.guard.retry_after)
            refusal = closing_response(429, b"you connect too often\n", [(b"Retry-After", wait)])
        else:
            refusal = closing_response(503, b"too many connections\n", [(b"Retry-After", b"1")])
        self.transport.write(refusal)
        # The client may be sending its request already: closing at once would reset
        # the connection under it and could lose the answer.
        self._linger()

    def _wait(self, limit: float, status: int) -> None:
        self.since = self.factory.clock()
        self.limit = limit
        self.timeout_status = status

    def dataReceived(self, data: bytes) -> None:
        if self._h2 is not None:
            self._h2.dataReceived(data)
            return
        if self.closed:
            if self.lingering:
                self._lingered(data)
            return
        if not self._alpn_checked:
            self._alpn_checked = True
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                from gateway.protocols.http import h2

                self.limit = 0.0  # HTTP/2 keeps its own idle timeout
                self._h2 = h2.switch(self, data)
                return
        reader = self.reader
        reader.receive(data)
        self.pump()
        if (
            self.exchange is None
            and self.timeout_status != 408
            and reader.buffered
            and not self.closed
        ):
            # The first bytes of a request, not a whole header yet: the whole header must
            # come within the limit, however slowly it trickles in.  (Set after pump(), so
            # a request whose header came whole does not read the clock for it.)
            self._wait(self.factory.header_timeout, 408)

    def pump(self) -> None:
        """Move events from the codec to the exchange for as long as it can take them."""
        if self._pumping or self.closed:
            return
        self._pumping = True
        try:
            self._pump()
        except ParseError as exc:
            self._bad(exc)
        except Exception:
            log.failure("HTTP request handling failed")
            if self.exchange is not None and not self.exchange.started:
                self.exchange.error(500, "internal error in the gateway")
            self.abort()
        finally:
            self._pumping = False

    def _pump(self) -> None:
        reader = self.reader
        while not self.closed:
            exchange = self.exchange
            if exchange is None:
                event = reader.next_event()
                if event is None:
                    break
                assert isinstance(event, Head)
                exchange = self.exchange = Exchange(self, event)
                if event.length > self.factory.max_body:
                    # Declared too large: refused before the handler or an upstream sees
                    # it, and before a client that sent Expect: 100-continue sends it.
                    raise ParseError(
                        413,
                        f"the request body ({event.length} bytes) is larger than"
                        f" {self.factory.max_body} bytes",
                    )
                if exchange.body_done:
                    # A request without a body: its END is next; take it now.
                    reader.next_event()
                else:
                    # However steadily it trickles in, the body must be whole by then.
                    exchange.body_deadline = self.factory.clock() + self.factory.body_timeout
                # No clock while the handler works: the upstream's timeout covers that.
                self.limit = 0.0
                self.factory.dispatch(exchange)
                continue
            if exchange.body_done or exchange._sink is None or "body" in self._paused:
                if reader.buffered > _READ_AHEAD:
                    self.pause_reading("full")
                break
            event = reader.next_event()
            if event is None:
                if not self.closed:
                    left = exchange.body_deadline - self.factory.clock()
                    self._wait(max(0.001, min(self.factory.idle_timeout, left)), 408)
                break
            if "full" in self._paused and reader.buffered < _READ_AHEAD:
                self.resume_reading("full")
            if event is END:
                self.limit = 0.0
                exchange._deliver(None)
            else:
                assert isinstance(event, bytes)
                exchange._deliver(event)

    def _bad(self, exc: ParseError, linger: bool = True) -> None:
        exchange = self.exchange
        log.info(
            "bad request from {client}: {reason} ({status})",
            client=self.client,
            reason=exc.reason,
            status=exc.status,
        )
        self.closing = True
        if exchange is None or not exchange.started:
            if exchange is not None:
                exchange.responded = True
                exchange.status = exc.status
            else:
                self.factory.bad_heads += 1
            body = exc.reason.encode("utf-8", "replace") + b"\n"
            self.transport.write(closing_response(exc.status, body))
            if linger and (
                (exchange is not None and not exchange.body_done) or self.reader.buffered
            ):
                # The client may still be sending: read and drop that for a while, so
                # that closing with unread data (a reset) does not destroy the answer
                # before the client has read it.
                self._linger()
            else:
                self._close()
        else:
            self.abort()
        if exchange is not None and not exchange.body_done:
            exchange.body_done = True
            if exchange.on_lost is not None:
                exchange.on_lost()

    def exchange_done(self, exchange: Exchange, close: bool) -> None:
        if exchange is not self.exchange:
            return
        self.exchange = None
        # The response is complete: nothing needs telling if the client goes now.  This
        # also breaks the cycle exchange -> on_lost -> its handler (a proxy call) ->
        # exchange, so both are freed at once rather than left to the garbage collector.
        exchange.on_lost = None
        if self.producing:
            self.producing = False
            self.transport.unregisterProducer()
        if close or self.closing:
            if not exchange.body_done or self.reader.buffered:
                self._linger()  # answered before the request was all in
            else:
                self._close()
            return
        if self._paused:
            self._paused.clear()
            self.transport.resumeProducing()
        self._wait(self.factory.idle_timeout, 0)
        if self.reader.buffered:
            self.pump()

    def pause_reading(self, why: str) -> None:
        if not self._paused and not self.closed:
            self.transport.pauseProducing()
        self._paused.add(why)

    def resume_reading(self, why: str) -> None:
        if why not in self._paused:
            return
        self._paused.discard(why)
        if not self._paused and not self.closed:
            self.transport.resumeProducing()
            if why == "body":
                self.pump()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.loseConnection()

    # A lingering close (as nginx's lingering_close): after a final answer sent while the
    # request was still coming, stop sending, then read and drop what arrives until the
    # client has been quiet for LINGER_QUIET seconds or LINGER_TOTAL have passed.
    LINGER_QUIET = 5.0
    LINGER_TOTAL = 30.0

    def _linger(self) -> None:
        if self.closed:
            return
        self.closed = True  # dataReceived drops everything from now on
        self.lingering = self.factory.clock() + self.LINGER_TOTAL
        self.reader = RequestReader(self.factory.max_header_size)  # free what was buffered
        if self._paused:
            self._paused.clear()
            self.transport.resumeProducing()
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if type(self.transport) in _PLAIN_TCP and half_close is not None:
            half_close()  # the answer, then FIN: the client learns at once that we are done
        self._wait(self.LINGER_QUIET, 0)

    def _lingered(self, data: bytes) -> None:
        now = self.factory.clock()
        if now >= self.lingering:
            self.transport.loseConnection()
            self.lingering = 0.0
            self.limit = 0.0
        else:
            self._wait(min(self.LINGER_QUIET, self.lingering - now), 0)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()

    def timed_out(self) -> None:
        """Called by the sweeper."""
        if self.lingering:
            self.lingering = 0.0
            self.limit = 0.0
            self.transport.loseConnection()
            return
        exchange = self.exchange
        if self.timeout_status and (exchange is None or not exchange.started):
            what = "request header" if exchange is None else "request body"
            # A client too slow to finish its request is not waited for any longer.
            self._bad(ParseError(408, f"the {what} did not arrive in time"), linger=False)
        else:
            self._close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._h2 is not None:
            self._h2.connectionLost(reason)
        self.closed = True
        self.factory.guard.disconnect(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None and self.factory.on_done is not None:
            self.factory.on_done(exchange)  # aborted, refused or cut short: never finished
        self.reader.receive_eof()
        if exchange is not None and not exchange.responded:
            exchange.responded = True
            if exchange.on_lost is not None:
                exchange.on_lost()


@implementer(IProtocolNegotiationFactory)
class HttpServerFactory(Factory):
    """Builds connections for one HTTP listener; the handler decides what each request gets.

    On TLS endpoints it offers ``h2`` (when the h2 package is installed) and
    ``http/1.1`` by ALPN.
    """

    noisy = False

    def __init__(
        self,
        handler: Handler,
        reactor: Any,
        *,
        max_header_size: int = 16 * 1024,
        header_timeout: float = 10.0,
        body_timeout: float = 300.0,
        idle_timeout: float = 60.0,
        max_body: int = 10 * 1024 * 1024,
        guard: Guard[HttpServerProtocol] | None = None,
    ) -> None:
        self.handler = handler
        self.reactor = reactor
        self.clock = reactor.seconds
        self.max_header_size = max_header_size
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self.max_body = max_body
        # The listener's connection rules (allow, max_connections) and its open connections.
        self.guard: Guard[HttpServerProtocol] = guard or Guard("http", (), 1000)
        self.guard.reclaim = self.close_an_idle_connection
        self._sweeper: LoopingCall | None = None
        # Told about each exchange once it is over (answered or not), for /metrics.
        self.on_done: Callable[[Exchange], None] | None = getattr(handler, "done", None)
        self.bad_heads = 0  # requests refused before their head was complete (400, 408, 431...)

    def buildProtocol(self, addr: Any) -> HttpServerProtocol:
        if self._sweeper is None:
            self._sweeper = LoopingCall(self.sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(0.5, now=False)
        return HttpServerProtocol(self)

    def dispatch(self, exchange: Exchange) -> None:
        """Hand a request to the handler, unless its client is over limits.request_rate
        (429 and Retry-After, as nginx's limit_req with limit_req_status 429)."""
        wait = self.guard.throttle("request_rate", exchange.client)
        if wait:
            exchange.respond(
                429,
                b"too many requests, slow down\n",
                extra=[(b"Retry-After", b"%d" % retry_after(wait))],
            )
            return
        self.handler.handle(exchange)

    def close_an_idle_connection(self, keep: HttpServerProtocol) -> bool:
        """Close the connection idle the longest (between requests, nothing buffered) to make
        room for ``keep``; False when every other one is busy.

        Idle sockets cannot then keep legitimate clients out, as nginx reuses its keep-alive
        connections when it runs out of them.
        """
        idle = [
            p
            for p in self.guard.connections
            if p is not keep and p.exchange is None and p.reader.idle and p.reclaimable
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda p: p.since)
        oldest.closed = True
        oldest.transport.loseConnection()
        return True

    def acceptableProtocols(self) -> list[bytes]:
        from gateway.protocols.http import h2

        return [b"h2", b"http/1.1"] if h2.AVAILABLE else [b"http/1.1"]

    def sweep(self) -> None:
        now = self.clock()
        for protocol in list(self.guard.connections):
            if protocol.limit and now - protocol.since > protocol.limit:
                protocol.timed_out()

    def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
