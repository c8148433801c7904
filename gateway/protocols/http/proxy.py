"""The ``http`` destination: a reverse proxy with a keep-alive pool per upstream server.

A request from the listener is written to an upstream connection as soon as
its head is known; the request body follows as it arrives and the response
body goes back the same way, each direction with back-pressure (a full socket
buffer on one side pauses reading on the other), so neither body is ever held
whole in memory.  Upstreams are chosen round-robin or by fewest requests in
progress; one that cannot be reached is skipped for ``fail_timeout``.

``X-Forwarded-For`` and ``Forwarded`` keep what the client sent and get the
client's address appended: only that last element is the gateway's own
knowledge; the ones before it are the client's word (they may be forged) and
an upstream should trust them only from proxies it knows.  A request with a
non-idempotent method (POST, PATCH...) is never sent twice: a pooled connection
that closes under it gives 502 rather than a retry (RFC 9112 section 9.3.1).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.message import Kind
from gateway.ports import FileReader, FileSource, Metric, Proxy
from gateway.protocols.http.codec import (
    END,
    HOP_BY_HOP,
    Head,
    ParseError,
    ResponseReader,
    chunk,
)
from gateway.protocols.http.config import HttpDestinationConfig, HttpUrl
from gateway.protocols.http.files import HttpFiles
from gateway.protocols.http.server import Exchange, send_now

log = Logger(namespace="gateway.http.proxy")

# Request header fields the proxy sets itself.
_REPLACED = HOP_BY_HOP | {b"expect", b"x-forwarded-proto", b"host"}
# Fields that a Connection header must not remove: the body's framing.
_FRAMING = frozenset({b"content-length"})
# RFC 9110 section 9.2.2: the methods a request can be sent again with.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class UpstreamConnection(TwistedProtocol):
    """One connection to an upstream server; carries one request at a time."""

    transport: Any

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.reader = ResponseReader()
        self.call: ProxyCall | None = None
        self.closed = False
        self.reused = False
        self.since = 0.0  # last activity, for the timeout sweeper
        self.idle_since = 0.0  # when it last went back to the pool

    def connectionMade(self) -> None:
        self.upstream.connections += 1
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)

    def dataReceived(self, data: bytes) -> None:
        call = self.call
        if call is None:
            # An idle connection has nothing to say; whatever it is, do not reuse it.
            self.close()
            return
        self.since = self.upstream.clock()
        self.reader.receive(data)
        call.upstream_ready()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self.upstream.connections -= 1
        self.upstream.forget(self)
        call, self.call = self.call, None
        if call is not None:
            self.reader.receive_eof()
            call.upstream_lost(self, reason)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.upstream.forget(self)
            # A request body still registered (and paused) would keep loseConnection()
            # from ever closing: Twisted resumes a paused producer instead.
            transport = self.transport
            if getattr(transport, "producer", None) or getattr(transport, "_producer", None):
                transport.unregisterProducer()
            self.transport.loseConnection()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.upstream.forget(self)
            self.transport.abortConnection()

    # IPushProducer for the client's connection: a slow client pauses the upstream.
    def pauseProducing(self) -> None:
        if not self.closed:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.closed:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()


class Upstream:
    """One upstream server: its address, its idle connections, its health."""

    def __init__(self, url: HttpUrl, proxy: HttpProxyDestination) -> None:
        self.url = url
        self.proxy = proxy
        self.clock = proxy.clock
        self.idle: list[UpstreamConnection] = []
        self.active = 0  # requests in progress
        # Requests waiting for one of its max_connections to be free, oldest first.
        self.waiting: deque[ProxyCall] = deque()
        self.connections = 0
        self.failed_until = 0.0
        # For /metrics: requests it answered, could not be connected for, did not answer in
        # time, or broke off (a lost connection or a malformed response).
        self.answered = 0
        self.connect_failures = 0
        self.timeouts = 0
        self.failures = 0
        self.prefix = url.path.encode()
        default = 443 if url.scheme == "https" else 80
        host = url.host if ":" not in url.host else f"[{url.host}]"
        self.authority = (host if url.port == default else f"{host}:{url.port}").encode()
        self._factory = Factory.forProtocol(lambda: UpstreamConnection(self))
        self._factory.noisy = False
        self.endpoint = self._endpoint(proxy.config, proxy.reactor)

    def _endpoint(self, config: HttpDestinationConfig, reactor: Any) -> Any:
        url = self.url
        timeout = float(config.connect_timeout)
        try:
            address = ipaddress.ip_address(url.host)
        except ValueError:
            address = None
        if address is None:
            ep: Any = endpoints.HostnameEndpoint(reactor, url.host, url.port, timeout=timeout)
        elif address.version == 6:
            ep = endpoints.TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                reactor, url.host, url.port, timeout=timeout
            )
        else:
            ep = endpoints.TCP4ClientEndpoint(reactor, url.host, url.port, timeout=timeout)
        if url.scheme == "https":
            from twisted.internet import ssl

            if not config.verify:
                options: Any = ssl.CertificateOptions(verify=False)
            else:
                trust = None
                if config.ca is not None:
                    with open(config.ca, "rb") as f:
                        trust = ssl.trustRootFromCertificates(  # type: ignore[no-untyped-call]
                            [ssl.Certificate.loadPEM(f.read())]
                        )
                options = ssl.optionsForClientTLS(url.host, trustRoot=trust)
            ep = endpoints.wrapClientTLS(options, ep)
        return ep

    @property
    def healthy(self) -> bool:
        return bool(self.failed_until <= self.clock())

    def connect(self) -> defer.Deferred[UpstreamConnection]:
        d: defer.Deferred[UpstreamConnection] = self.endpoint.connect(self._factory)
        return d

    def take_idle(self) -> UpstreamConnection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        if conn.closed:
            return
        if len(self.idle) >= self.proxy.config.keepalive or self.proxy.closed:
            conn.close()
            return
        conn.idle_since = self.clock()
        self.idle.append(conn)

    def close_idle(self, older_than: float) -> None:
        """Close the kept connections idle since before ``older_than``."""
        # Connections are taken from the end, so the longest idle are at the front.
        while self.idle and self.idle[0].idle_since < older_than:
            self.idle.pop(0).close()

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    @property
    def full(self) -> bool:
        """Every connection it may have is carrying a request."""
        return self.active >= self.proxy.config.max_connections

    def wake(self) -> None:
        """A connection is free: hand it to the request that waited longest."""
        while self.waiting and not self.full:
            call = self.waiting.popleft()
            if not call.finished:
                call.begin(self)

    def give_up_waiting(self, older_than: float) -> None:
        """Requests that waited since before ``older_than`` for a connection get 503."""
        while self.waiting and self.waiting[0].queued_at < older_than:
            call = self.waiting.popleft()
            if not call.finished:
                call.fail(
                    503,
                    f"all {self.proxy.config.max_connections} connections to {self.url} stayed"
                    " busy",
                )

    def failed(self, why: str) -> None:
        timeout = float(self.proxy.config.fail_timeout)
        if self.healthy:
            log.warn(
                "upstream {url} of {destination} failed ({why}); skipped for {seconds}s",
                url=self.url,
                destination=self.proxy.name,
                why=why,
                seconds=timeout,
            )
        self.failed_until = self.clock() + timeout


class ProxyCall:
    """One request on its way through the proxy: client exchange <-> upstream connection."""

    def __init__(self, proxy: HttpProxyDestination, exchange: Exchange, route: str) -> None:
        self.proxy = proxy
        self.exchange = exchange
        self.route = route
        self.conn: UpstreamConnection | None = None
        self.upstream: Upstream | None = None
        self.tried: list[Upstream] = []
        self.sent_body = False  # some of the request body went to an upstream
        self.request_done = False
        self.response: Head | None = None
        self.finished = False
        self.retried = False
        self.last_error = ""
        self.producing = False
        self.held = False  # the upstream paused the request body (it reads too slowly)
        self.queued_at = 0.0  # when it began to wait for a free upstream connection
        self._chunked_up = exchange.head.chunked
        exchange.on_lost = self.client_lost

    # --- choosing an upstream and connecting ------------------------------------------

    def start(self) -> None:
        upstream = self.proxy.choose(self.tried)
        if upstream is None:
            self.fail(502, self.last_error or "no upstream server is left to try")
            return
        self.tried.append(upstream)
        self.upstream = upstream
        if upstream.full:
            # As nginx's max_conns with a queue: wait for a connection rather than open
            # one more (ten HTTP/2 clients opened 900 upstream connections).
            self.queued_at = self.proxy.clock()
            upstream.waiting.append(self)
            return
        self.begin(upstream)

    def begin(self, upstream: Upstream) -> None:
        """Take an idle connection to ``upstream`` or open one."""
        upstream.active += 1
        conn = upstream.take_idle()
        if conn is not None:
            self.attach(conn)
            return
        d = upstream.connect()
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: UpstreamConnection) -> None:
        if self.finished:
            # The client went away meanwhile: keep the fresh connection for the next one.
            if self.upstream is not None:
                self.upstream.active -= 1
            conn.upstream.release(conn)
            conn.upstream.wake()
            return
        self.attach(conn)

    def _connect_failed(self, failure: Failure) -> None:
        upstream = self.upstream
        assert upstream is not None
        upstream.active -= 1
        upstream.wake()
        upstream.connect_failures += 1
        self.last_error = f"cannot connect to {upstream.url}: {failure.getErrorMessage()}"
        upstream.failed(self.last_error)
        if self.finished:
            return
        self.start()  # the next upstream, if one is left

    def attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.call = self
        conn.since = self.proxy.clock()
        conn.reader.expect(self.exchange.head.method)
        self.proxy.busy.add(conn)
        send_now(conn.transport, self.proxy.request_head(self.exchange, self.upstream))
        exchange = self.exchange
        if exchange.body_done:
            self.request_done = True
        else:
            conn.transport.registerProducer(self, True)
            exchange.read_body(self)

    # --- the request body, client -> upstream ------------------------------------------

    def body_data(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        self.sent_body = True
        conn.since = self.proxy.clock()
        send_now(conn.transport, chunk(data) if self._chunked_up else data)

    def body_end(self) -> None:
        self.request_done = True
        conn = self.conn
        if conn is None or conn.closed:
            return
        if self._chunked_up:
            send_now(conn.transport, b"0\r\n\r\n")
        conn.transport.unregisterProducer()

    # IPushProducer for the upstream connection: a slow upstream pauses the client.
    def pauseProducing(self) -> None:
        self.held = True
        self.exchange.pause_body()

    def resumeProducing(self) -> None:
        self.held = False
        self.exchange.resume_body()

    def stopProducing(self) -> None:
        self.client_lost()

    # --- the response, upstream -> client ------------------------------------------------

    def upstream_ready(self) -> None:
        conn = self.conn
        if conn is None:
            return
        reader = conn.reader
        exchange = self.exchange
        exchange.cork()
        try:
            while self.conn is conn:
                event = reader.next_event()
                if event is None:
                    if self.response is not None and not self.producing:
                        # More of the body to come: a slow client must pause the upstream.
                        self.producing = True
                        exchange.producer(conn)
                    break
                if event is END:
                    self._response_done(conn)
                    return
                if isinstance(event, Head):
                    if event.status < 200:
                        continue  # 100 Continue and friends: the gateway sent its own
                    self._response_head(event)
                else:
                    assert isinstance(event, bytes)
                    exchange.write(event)
        except ParseError as exc:
            exchange.flush()
            self.upstream_broken(conn, exc.reason)
            return
        exchange.flush()

    def _response_head(self, head: Head) -> None:
        self.response = head
        if self.upstream is not None:
            self.upstream.answered += 1
        exchange = self.exchange
        tokens = head.connection_tokens
        # Connection may name any field, but never the one that frames the body.
        drop = (_REPLACED_RESPONSE | tokens) - _FRAMING if tokens else _REPLACED_RESPONSE
        names = head.lower_names()
        headers = [f for n, f in zip(names, head.headers, strict=True) if n not in drop]
        length: int | None = head.length if head.length >= 0 else None
        exchange.start_raw(head.status, head.reason or b"-", headers, length)

    def _response_done(self, conn: UpstreamConnection) -> None:
        response = self.response
        reuse = (
            response is not None and response.keep_alive and self.request_done and conn.reader.idle
        )
        self.upstream_release(conn, reuse=reuse)
        self.finished = True
        self.exchange.finish()

    def upstream_release(self, conn: UpstreamConnection, *, reuse: bool) -> None:
        conn.call = None
        self.proxy.busy.discard(conn)
        freed = None
        if self.conn is conn:
            self.conn = None
            freed = self.upstream
            if freed is not None:
                freed.active -= 1
        if reuse:
            if not self.request_done:
                conn.abort()
            else:
                if self.producing:
                    # A slow client may have paused it just as the response ended.
                    conn.transport.resumeProducing()
                conn.upstream.release(conn)
        else:
            conn.close()
        if freed is not None:
            freed.wake()

    def upstream_lost(self, conn: UpstreamConnection, reason: Failure) -> None:
        if self.conn is not conn:
            return
        # A close-delimited response ends here.
        if self.response is not None and self.response.length == -2:
            try:
                while True:
                    event = conn.reader.next_event()
                    if event is None or event is END:
                        break
                    if isinstance(event, bytes):
                        self.exchange.write(event)
            except ParseError:
                pass
            else:
                self.upstream_release(conn, reuse=False)
                self.finished = True
                self.exchange.finish()
                return
        self.upstream_broken(conn, f"connection lost: {reason.getErrorMessage()}")

    def upstream_broken(self, conn: UpstreamConnection, why: str) -> None:
        """The upstream connection failed or talked nonsense during this call."""
        # Retried only when the method is idempotent: a POST may have been acted on before
        # the connection closed, and a proxy must not repeat it (RFC 9112 section 9.3.1).
        stale = conn.reused and self.response is None and not self.sent_body and not self.retried
        retry = stale and self.exchange.head.method in _IDEMPOTENT
        self.upstream_release(conn, reuse=False)
        if self.finished:
            return
        if retry:
            # A kept-alive connection the server had closed: try once more on a new one.
            self.retried = True
            upstream = self.upstream
            assert upstream is not None
            self.tried.remove(upstream)
            self.start()
            return
        if self.upstream is not None:
            self.upstream.failures += 1
            if self.response is None and not stale:  # a closed kept-alive one is no failure
                self.upstream.failed(why)
        self.fail(502, f"the upstream server failed: {why}")

    def timed_out(self) -> None:
        conn = self.conn
        if conn is None:
            return
        if not self.request_done and self.response is None and not self.held:
            # Waiting for the client's body, not for the upstream: the listener's idle
            # timeout deals with a client that stalls (408); the upstream is not to blame.
            return
        self.upstream_release(conn, reuse=False)
        if self.upstream is not None:
            self.upstream.timeouts += 1
        if self.upstream is not None and self.response is None:
            self.upstream.failed("no answer in time")
        self.fail(504, "the upstream server did not answer in time")

    # --- ending -------------------------------------------------------------------------

    def fail(self, status: int, why: str) -> None:
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        if conn is not None:
            self.upstream_release(conn, reuse=False)
        exchange = self.exchange
        if exchange.closed or exchange.responded:
            return
        if exchange.started:
            exchange.abort()
            return
        log.info(
            "route {route}: {status} for {method} {target}: {why}",
            route=self.route,
            status=status,
            method=exchange.head.method.decode("latin-1"),
            target=exchange.head.target.decode("latin-1")[:200],
            why=why,
        )
        exchange.error(status, f"{status} from the gateway, route '{self.route}': {why}")

    def client_lost(self) -> None:
        self.finished = True
        conn = self.conn
        if conn is not None:
            self.upstream_release(conn, reuse=False)


_REPLACED_RESPONSE = HOP_BY_HOP


class HttpProxyDestination(Proxy[Exchange], FileSource):
    """The running ``http`` destination."""

    kinds = frozenset({Kind.HTTP, Kind.FILE})

    def __init__(self, config: HttpDestinationConfig, reactor: Any) -> None:
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.clock = reactor.seconds
        self.closed = False
        self.upstreams = [Upstream(url, self) for url in config.url]
        self._next = 0
        self.busy: set[UpstreamConnection] = set()
        self.timeout = float(config.timeout)
        self.strip = config.strip_prefix.encode()
        self.rewrite_host = config.host == "upstream"
        self._sweeper: LoopingCall | None = None
        self._files: HttpFiles | None = None  # made at the first file asked for (TFTP)

    # --- what the listener calls -----------------------------------------------------

    def proxy(self, exchange: Exchange, route: str) -> None:
        """Forward one request; the exchange is answered when the upstream answers."""
        if self._sweeper is None and not self.closed:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(min(0.5, self.timeout / 4), now=False)
        ProxyCall(self, exchange, route).start()

    async def fetch(self, name: str) -> FileReader:
        """A file below the destination's URL, streamed (see gateway.protocols.http.files)."""
        if self._files is None:
            self._files = HttpFiles(self.reactor, self.choose, self.timeout)
        return await self._files.fetch(name)

    def choose(self, tried: list[Upstream]) -> Upstream | None:
        upstreams = self.upstreams
        count = len(upstreams)
        if count == 1 and not tried:
            return upstreams[0]  # healthy or not, it is the one to try
        fresh = [u for u in upstreams if u not in tried] if tried else upstreams
        if not fresh:
            return None
        live = [u for u in fresh if u.healthy]
        if not live:
            # Every upstream failed lately; trying one beats refusing outright.
            live = [min(fresh, key=lambda u: u.failed_until)]
        if self.config.balance == "least-connections":
            start = self._next % count
            self._next += 1
            order = {id(u): (i - start) % count for i, u in enumerate(upstreams)}
            return min(live, key=lambda u: (u.active, order[id(u)]))
        if len(live) == 1:
            return live[0]
        for _ in range(count):
            candidate = upstreams[self._next % count]
            self._next += 1
            if candidate in live:
                return candidate
        return live[0]

    def request_head(self, exchange: Exchange, upstream: Upstream | None) -> bytes:
        head = exchange.head
        assert upstream is not None
        target = head.target
        host = head.host
        if target[:1] != b"/":
            if b"://" in target[:8]:  # absolute-form, http or https in any case (the codec)
                rest = target.split(b"//", 1)[1]
                slash = rest.find(b"/")
                authority, target = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
                host = authority  # it wins over Host (RFC 9112 section 3.2.2)
            elif target == b"*":
                target = b"*"
        strip = self.strip
        if strip and target.startswith(strip):
            target = target[len(strip) :]
            if target[:1] != b"/":
                target = b"/" + target
        if upstream.prefix and target != b"*":
            target = upstream.prefix + target
        tokens = head.connection_tokens
        # Connection may name any field, but never the one that frames the body: without
        # it the upstream would read the body as the next request (request smuggling).
        drop = (_REPLACED | tokens) - _FRAMING if tokens else _REPLACED
        lines = [b"%s %s HTTP/1.1\r\n" % (head.method, target)]
        forwarded_for = b""
        for lower, field in zip(head.lower_names(), head.headers, strict=True):
            if lower in drop:
                continue
            if lower == b"x-forwarded-for":
                value = field[1]
                forwarded_for = forwarded_for + b", " + value if forwarded_for else value
                continue
            lines.append(b"%s: %s\r\n" % field)
        client = exchange.client.encode()
        scheme = exchange.scheme
        node = b'"[' + client + b']"' if b":" in client else client
        if host:
            element = b'for=%s;proto=%s;host="%s"' % (
                node,
                scheme,
                host.replace(b'"', b"").replace(b"\\", b""),
            )
        else:
            element = b"for=%s;proto=%s" % (node, scheme)
        lines.append(
            b"Host: %s\r\nX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nForwarded: %s\r\n%s\r\n"
            % (
                upstream.authority if self.rewrite_host or not host else host,
                forwarded_for + b", " + client if forwarded_for else client,
                scheme,
                element,
                b"Transfer-Encoding: chunked\r\n" if head.chunked else b"",
            )
        )
        return b"".join(lines)

    def _sweep(self) -> None:
        now = self.clock()
        limit = self.timeout
        for conn in list(self.busy):
            if now - conn.since > limit and conn.call is not None:
                conn.call.timed_out()
        older_than = now - float(self.config.keepalive_timeout)
        waited_since = now - float(self.config.connect_timeout)
        for upstream in self.upstreams:
            upstream.close_idle(older_than)
            upstream.give_up_waiting(waited_since)
        if self.closed and not self.busy and self._sweeper is not None:
            # Retired by a reload: the last request it carried is done.
            self._sweeper.stop()
            self._sweeper = None

    # --- the Destination ----------------------------------------------------------------

    def metrics(self) -> Iterable[Metric]:
        labels = ("destination", "upstream")
        upstream = Metric(
            "gateway_http_upstream_requests",
            "Requests an http destination sent to an upstream server, by outcome: ok (it"
            " answered, whatever the status), connect_failed (502 unless another upstream"
            " took it), timeout (504) or failed (the connection broke or the response was"
            " malformed: 502)",
            "counter",
            ("destination", "upstream", "outcome"),
        )
        down = Metric(
            "gateway_http_upstream_down",
            "1 while an upstream server is marked down (skipped after a failure)",
            "gauge",
            labels,
        )
        active = Metric(
            "gateway_http_upstream_active_requests",
            "Requests in progress on an upstream server",
            "gauge",
            labels,
        )
        for u in self.upstreams:
            url = str(u.url)
            counts = (
                ("ok", u.answered),
                ("connect_failed", u.connect_failures),
                ("timeout", u.timeouts),
                ("failed", u.failures),
            )
            for outcome, n in counts:
                upstream.add([self.name, url, outcome], n)
            down.add([self.name, url], int(not u.healthy))
            active.add([self.name, url], u.active)
        return (upstream, down, active)

    async def close(self) -> None:
        self.closed = True
        if self._files is not None:
            await self._files.close()
        if not self.busy and self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
            self._sweeper = None
        for upstream in self.upstreams:
            for conn in list(upstream.idle):
                conn.close()
