"""The ``http`` listener: picks each request's route, then proxies it or turns it into a message.

A route whose destination is an ``http`` destination (a reverse proxy) gets
the request streamed through, request and response alike.  Any other route is
store-and-forward: the body is read (up to ``max_size``), the request becomes
an ``HttpRequest`` message for the route's transforms (``http_to_mail``) and
the spool, and the client gets ``202 Accepted`` with the message's id once it
is on disk.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.config import Route
from gateway.listening import StreamListener
from gateway.message import HttpRequest
from gateway.ports import GatewayPort, Metric, Proxy, Reason, RouteTable, Status, Verdict
from gateway.protocols.http.config import HttpListenerConfig
from gateway.protocols.http.routes import HeaderValues, HttpRoutes
from gateway.protocols.http.server import Exchange, HttpServerFactory
from gateway.stats import Histogram

log = Logger(namespace="gateway.http.listener")


def refusal(verdict: Verdict) -> str:
    """The status a refused request gets (for route tests and dry runs)."""
    if verdict.status is Status.PERMANENT:
        return f"{_STATUS.get(verdict.reason, 400)} {verdict.detail}"
    return f"503 {verdict.detail}"


def _header_values(exchange: Exchange) -> HeaderValues:
    headers = exchange.head.headers

    def values(name: str) -> list[str]:
        wanted = name.lower().encode("latin-1")
        return [v.decode("latin-1") for n, v in headers if n.lower() == wanted]

    return values


_ENCODED_DOT = re.compile(r"%2[eE]")
_ENCODED_SLASH = re.compile(r"%2[fF]|\\")


def _dot_segment(target: str) -> bool:
    """Whether the path has a "." or ".." segment, also written %2e or with %2f or \\."""
    path = _ENCODED_SLASH.sub("/", _ENCODED_DOT.sub(".", target.split("?", 1)[0]))
    return any(segment in (".", "..") for segment in path.split("/"))


class _BodyCollector:
    """Reads a store-and-forward request's body, up to the listener's max_size."""

    def __init__(self, listener: HttpListener, exchange: Exchange, route: Route) -> None:
        self.listener = listener
        self.exchange = exchange
        self.route = route
        self.parts: list[bytes] = []
        self.size = 0
        self.failed = False

    def body_data(self, data: bytes) -> None:
        if self.failed:
            return
        self.size += len(data)
        if self.size > self.listener.config.max_size:
            self.failed = True
            self.parts = []
            self.exchange.error(
                413, f"the request body is larger than {self.listener.config.max_size} bytes"
            )
            return
        self.parts.append(data)

    def body_end(self) -> None:
        if not self.failed:
            self.listener.submit(self.exchange, self.route, b"".join(self.parts))


# What the gateway's reasons are in HTTP, for a request that became a message.
_STATUS = {
    Reason.NO_ROUTE: 404,
    Reason.TOO_BIG: 413,
    Reason.POLICY: 403,
    Reason.BAD_MESSAGE: 400,
    Reason.BAD_ADDRESS: 400,
    Reason.UNSUPPORTED_FORMAT: 415,
    Reason.UNSUPPORTED_METHOD: 405,
    Reason.UNAUTHENTICATED: 401,
    Reason.MISCONFIGURED: 500,
    Reason.DUPLICATE: 409,
}


class HttpListener:
    """Handles the requests of one configured http listener."""

    def __init__(self, config: HttpListenerConfig, gateway: GatewayPort) -> None:
        self.config = config
        self.gateway = gateway
        self._table: RouteTable | None = None
        self._routes: HttpRoutes | None = None
        # For the status line and /metrics.
        self.requests = 0
        self.proxied = 0
        self.accepted = 0
        self.unrouted = 0
        self.clock = time.monotonic
        # (route, outcome) and (route, status class) -> requests; route "" when none took it.
        self.outcomes: dict[tuple[str, str], int] = {}
        self.statuses: dict[tuple[str, str], int] = {}
        self.duration = Histogram()

    def _index(self, table: RouteTable) -> HttpRoutes:
        if table is not self._table or self._routes is None:
            self._routes = HttpRoutes(table.routes_for(self.config.name))
            self._table = table
        return self._routes

    def handle(self, exchange: Exchange) -> None:
        self.requests += 1
        exchange.began = self.clock()
        exchange.route = ""
        head = exchange.head
        if head.method == b"CONNECT":
            # A tunnel is not a request the routes could look at; what the client sends
            # next would be tunnel bytes, so the connection closes after the answer.
            exchange.close_after()
            exchange.respond(405, b"CONNECT is not supported\n", extra=[(b"Allow", b"GET, POST")])
            return
        table = self.gateway.current()
        method = head.method.decode("latin-1")
        target = head.target.decode("latin-1")
        host = head.host.decode("latin-1")
        if not target.startswith("/") and "://" in target:
            # absolute-form: the host in the target wins (RFC 9112 section 3.2.2)
            authority = target.split("://", 1)[1]
            host = authority.split("/", 1)[0]
            target = "/" + authority.split("/", 1)[1] if "/" in authority else "/"
        if ("/." in target or "%2" in target or "\\" in target) and _dot_segment(target):
            # Routes match the path as sent; an upstream that resolves "/a/../b" would
            # serve a path no route allowed.  Clients send paths already resolved.
            exchange.error(400, "a . or .. segment in the request path is not accepted")
            return
        chosen = self._index(table).select(
            method, host, target, _header_values(exchange), exchange.client
        )
        if chosen is None:
            self.unrouted += 1
            if self.gateway.tracer.active:
                self._trace(exchange, method, host, target, "", "404: no route takes it")
            exchange.error(404, f"no route of listener '{self.config.name}' takes {target[:200]}")
            return
        route, _groups = chosen
        exchange.route = route.name
        length = head.length
        for name in route.to:
            destination = table.destination(name)
            if isinstance(destination, Proxy):
                if length > self.config.max_size:
                    exchange.error(413, f"the request body is larger than {self.config.max_size}")
                    return
                self.proxied += 1
                exchange.outcome = "proxied"
                if self.gateway.tracer.active:
                    self._trace(exchange, method, host, target, route.name, f"proxied to {name}")
                destination.proxy(exchange, route.name)
                return
        if length > self.config.max_size:
            exchange.error(413, f"the request body is larger than {self.config.max_size} bytes")
            return
        collector = _BodyCollector(self, exchange, route)
        if exchange.body_done:
            collector.body_end()
        else:
            exchange.read_body(collector)

    def submit(self, exchange: Exchange, route: Route, body: bytes) -> None:
        head = exchange.head
        request = HttpRequest(
            listener=self.config.name,
            client=exchange.client,
            method=head.method.decode("latin-1"),
            target=head.target.decode("latin-1"),
            host=head.host.decode("latin-1"),
            http_headers=tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers),
            body=body,
        )
        d = Deferred.fromCoroutine(self.gateway.submit(request))
        d.addCallbacks(
            lambda verdict: self._answer(exchange, request, verdict),
            lambda failure: self._failed(exchange, request, failure),
        )

    def _answer(self, exchange: Exchange, request: HttpRequest, verdict: Verdict) -> None:
        if exchange.closed or exchange.responded:
            return
        if verdict.status is Status.DELIVERED:
            self.accepted += 1
            exchange.outcome = "queued"
            exchange.json(202, {"id": request.id, "status": "queued"})
        elif verdict.status is Status.PERMANENT:
            status = _STATUS.get(verdict.reason, 400)
            # A request becomes a message by POST only (web hooks): RFC 9110 15.5.6 wants
            # the methods that work named in a 405.
            extra = [(b"Allow", b"POST")] if status == 405 else None
            exchange.json(status, {"error": verdict.detail}, extra)
        else:
            exchange.json(503, {"error": verdict.detail}, [(b"Retry-After", b"30")])

    def _trace(
        self, exchange: Exchange, method: str, host: str, target: str, route: str, action: str
    ) -> None:
        self.gateway.tracer.emit(
            "http",
            listener=self.config.name,
            client=exchange.client,
            method=method,
            host=host,
            target=target[:500],
            route=route,
            action=action,
        )

    def done(self, exchange: Exchange) -> None:
        """Count an exchange that is over, answered or not (the server calls this once)."""
        route = exchange.route
        if route is None:
            return  # not one of this listener's (or counted already)
        exchange.route = None
        status = exchange.status
        outcome = exchange.outcome or ("rejected" if 400 <= status < 500 else "error")
        key = (route, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        key = (route, f"{status // 100}xx" if status else "none")
        self.statuses[key] = self.statuses.get(key, 0) + 1
        self.duration.observe(self.clock() - exchange.began)

    def _failed(self, exchange: Exchange, request: HttpRequest, failure: Any) -> None:
        log.failure("request {id} could not be submitted", failure, id=request.id)
        if not (exchange.closed or exchange.responded):
            exchange.json(
                503, {"error": "the gateway could not take the request"}, [(b"Retry-After", b"30")]
            )


class HttpSockets(StreamListener[HttpListenerConfig]):
    """An http listener: every endpoint shares one handler, one factory and its limits."""

    def __init__(self, config: HttpListenerConfig, gateway: GatewayPort, reactor: Any) -> None:
        super().__init__(config, gateway, reactor)
        self.listener = HttpListener(config, gateway)
        self._factory = HttpServerFactory(
            self.listener,
            reactor,
            max_header_size=int(config.max_header_size),
            header_timeout=float(config.header_timeout),
            body_timeout=float(config.body_timeout),
            idle_timeout=float(config.idle_timeout),
            max_body=int(config.max_size),
            guard=self.guard,
        )

    def factory(self) -> HttpServerFactory:
        return self._factory

    def reconfigure(self, config: HttpListenerConfig) -> None:
        super().reconfigure(config)
        self.listener.config = config
        self._factory.max_header_size = int(config.max_header_size)
        self._factory.header_timeout = float(config.header_timeout)
        self._factory.body_timeout = float(config.body_timeout)
        self._factory.idle_timeout = float(config.idle_timeout)
        self._factory.max_body = int(config.max_size)

    async def drain(self, timeout: float) -> None:
        for protocol in list(self.guard.connections):
            if protocol.exchange is None:
                protocol.transport.loseConnection()
        self._factory.stop()

    def activity(self) -> tuple[int, int]:
        return self.listener.accepted, self.listener.requests

    def metrics(self) -> Iterable[Metric]:
        yield from super().metrics()
        name = self.name
        listener = self.listener
        yield Metric(
            "gateway_listener_requests",
            "Requests a listener received: DNS queries (DNS, DoH), HTTP requests (http)",
            "counter",
            ("listener",),
        ).add([name], listener.requests)
        outcomes = Metric(
            "gateway_http_requests",
            "HTTP requests by route and outcome: proxied (to an http destination), queued"
            " (a web hook in the spool), rejected (a 4xx from the gateway) or error (a 5xx"
            " from the gateway, or no answer); route is empty for those no route took",
            "counter",
            ("listener", "route", "outcome"),
        )
        for (route, outcome), n in sorted(listener.outcomes.items()):
            outcomes.add([name, route, outcome], n)
        yield outcomes
        statuses = Metric(
            "gateway_http_responses",
            "HTTP responses by route and status class (2xx ... 5xx; none: the connection"
            " ended before a response began)",
            "counter",
            ("listener", "route", "code"),
        )
        for (route, code), n in sorted(listener.statuses.items()):
            statuses.add([name, route, code], n)
        yield statuses
        yield Metric(
            "gateway_http_malformed_requests",
            "Requests refused before their head was complete (400, 408, 414, 431, 501)",
            "counter",
            ("listener",),
        ).add([name], self._factory.bad_heads)
        yield Metric(
            "gateway_http_request_duration_seconds",
            "From a request's head to the end of its response (or of the connection)",
            "histogram",
            ("listener",),
        ).add([name], listener.duration)
