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
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.config import HttpListenerConfig, Route, client_allowed
from gateway.destination import Status
from gateway.message import HttpRequest
from gateway.protocols.http.server import Exchange, HttpServerFactory
from gateway.routing import HttpRoutes
from gateway.stats import Histogram
from gateway.systemd import server_endpoint

if TYPE_CHECKING:
    from gateway.service import GatewayService, Runtime, Verdict

log = Logger(namespace="gateway.http.listener")


def _header_values(exchange: Exchange) -> Any:
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


class HttpListener:
    """Handles the requests of one configured http listener."""

    def __init__(self, config: HttpListenerConfig, gateway: GatewayService) -> None:
        self.config = config
        self.gateway = gateway
        self._runtime: Runtime | None = None
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

    def _index(self, runtime: Runtime) -> HttpRoutes:
        if runtime is not self._runtime or self._routes is None:
            self._routes = HttpRoutes(runtime.router.routes_for(self.config.name))
            self._runtime = runtime
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
        allow = self.config.allow
        if allow and not client_allowed(allow, exchange.client):
            log.info(
                "listener {listener} refused client {client}: not in allow",
                listener=self.config.name,
                client=exchange.client,
            )
            exchange.close_after()
            exchange.error(403, f"listener '{self.config.name}' does not take requests from you")
            return
        runtime = self.gateway.current()
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
        chosen = self._index(runtime).select(
            method, host, target, _header_values(exchange), exchange.client
        )
        if chosen is None:
            self.unrouted += 1
            exchange.error(404, f"no route of listener '{self.config.name}' takes {target[:200]}")
            return
        route, _groups = chosen
        exchange.route = route.name
        length = head.length
        for name in route.to:
            destination = runtime.destinations.get(name)
            proxy = getattr(destination, "proxy", None)
            if proxy is not None:
                if length > self.config.max_size:
                    exchange.error(413, f"the request body is larger than {self.config.max_size}")
                    return
                self.proxied += 1
                exchange.outcome = "proxied"
                proxy(exchange, route.name)
                return
        if length > self.config.max_size:
            exchange.error(
                413, f"the request body is larger than {self.config.max_size} bytes"
            )
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
            http_headers=tuple(
                (n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers
            ),
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
            status = verdict.http_status
            if not status:
                # A refusal from the router (no route) carries 5.1.1, as in SMTP.
                status = 404 if verdict.enhanced == "5.1.1" else 400
            exchange.json(status, {"error": verdict.detail})
        else:
            exchange.json(503, {"error": verdict.detail}, [(b"Retry-After", b"30")])

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


class HttpSockets:
    """The sockets of an http listener; every endpoint shares one handler and its limits."""

    def __init__(self, config: HttpListenerConfig, gateway: GatewayService, reactor: Any) -> None:
        self.listener = HttpListener(config, gateway)
        self.reactor = reactor
        self.factory = HttpServerFactory(
            self.listener,
            reactor,
            max_header_size=int(config.max_header_size),
            header_timeout=float(config.header_timeout),
            idle_timeout=float(config.idle_timeout),
            max_connections=config.max_connections,
            max_body=int(config.max_size),
        )

    async def listen_on(self, description: str) -> Any:
        return await server_endpoint(self.reactor, description).listen(self.factory)

    def reconfigure(self, config: HttpListenerConfig) -> None:
        self.listener.config = config
        self.factory.max_header_size = int(config.max_header_size)
        self.factory.header_timeout = float(config.header_timeout)
        self.factory.idle_timeout = float(config.idle_timeout)
        self.factory.max_connections = config.max_connections
        self.factory.max_body = int(config.max_size)

    async def drain(self, timeout: float) -> None:
        for protocol in list(self.factory.connections):
            if protocol.exchange is None:
                protocol.transport.loseConnection()
        self.factory.stop()
