"""The admin site on the ``admin:`` endpoint: /metrics, /healthz and /readyz.

/healthz answers 200 while the process runs its event loop; /readyz answers
200 only once every listener is bound and the configuration is loaded, and 503
while starting, reloading or stopping, or just after the spool refused a
message, so a load balancer can tell.  Its second line says which configuration
is in force and how the last reload went.  /trace streams the routing decisions
as server-sent events while someone reads it (``gateway trace``).  /metrics is for Prometheus.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

if TYPE_CHECKING:
    from gateway.service import GatewayService

log = Logger(namespace="gateway.admin")


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
        return b"ok\n"


class _Ready(Resource):
    isLeaf = True

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.gateway = gateway

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
        problems = self.gateway.readiness_problems()
        configuration = self.gateway.configuration_line() + "\n"
        if problems:
            request.setResponseCode(503)
            return ("not ready: " + "; ".join(problems) + "\n" + configuration).encode()
        return ("ready\n" + configuration).encode()


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.gateway = gateway

    def render_GET(self, request: Request) -> int:
        from gateway.metrics import GatewayMetrics

        if self.gateway.metrics is None:
            self.gateway.metrics = GatewayMetrics(self.gateway)
        accept = request.getHeader(b"accept")
        page = self.gateway.metrics.render(accept.decode("latin-1") if accept else None)
        return _answer_later(request, page, "/metrics")


def _answer_later(
    request: Request, page: Coroutine[Any, Any, tuple[bytes, str]], what: str
) -> int:
    """Answer ``request`` with the (body, content type) ``page`` makes; 500 if it fails,
    nothing if the client hung up meanwhile."""
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)

    def send(answer: tuple[bytes, str]) -> None:
        if gone:
            return  # the client hung up
        body, content_type = answer
        request.setHeader(b"content-type", content_type.encode())  # type: ignore[no-untyped-call]
        request.write(body)  # type: ignore[no-untyped-call]
        request.finish()  # type: ignore[no-untyped-call]

    def failed(failure: Failure) -> None:
        log.failure("{what} failed", failure, what=what)
        if gone:
            return
        request.setResponseCode(500)
        request.finish()  # type: ignore[no-untyped-call]

    Deferred.fromCoroutine(page).addCallbacks(send, failed)
    return NOT_DONE_YET


class _Trace(Resource):
    """/trace: the routing decisions as they happen, as server-sent events (one JSON
    object per event), filtered by ?route=, ?listener= and ?match=."""

    isLeaf = True
    keepalive = 15.0  # seconds between comments that keep idle proxies from closing it

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.gateway = gateway

    def render_GET(self, request: Request) -> int:
        from twisted.internet import task

        from gateway.tracing import Watcher

        def arg(name: str) -> str:
            values = request.args.get(name.encode()) or [b""]
            return str(values[0].decode("utf-8", "replace"))

        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")  # type: ignore[no-untyped-call]
        request.setHeader(b"cache-control", b"no-cache")  # type: ignore[no-untyped-call]
        state = {"paused": False}

        def send(event: dict[str, Any]) -> bool:
            if state["paused"]:
                return False
            data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
            request.write(f"data: {data}\n\n".encode())  # type: ignore[no-untyped-call]
            return True

        watcher = Watcher(send, route=arg("route"), listener=arg("listener"), match=arg("match"))
        tracer = self.gateway.tracer
        stop = tracer.watch(watcher)

        class _Producer:
            def pauseProducing(self) -> None:
                state["paused"] = True

            def resumeProducing(self) -> None:
                state["paused"] = False
                tracer.flush(watcher)

            def stopProducing(self) -> None:
                stop()

        request.registerProducer(_Producer(), True)  # type: ignore[no-untyped-call]
        request.write(b": tracing\n\n")  # type: ignore[no-untyped-call]
        ping = task.LoopingCall(
            lambda: state["paused"] or request.write(b": keep-alive\n\n")  # type: ignore[no-untyped-call]
        )
        ping.clock = self.gateway.reactor
        ping.start(self.keepalive, now=False)

        def gone(_: object) -> None:
            stop()
            if ping.running:
                ping.stop()

        request.notifyFinish().addBoth(gone)
        return NOT_DONE_YET


class _Dashboard(Resource):
    """/: the dashboard page (see gateway.dashboard)."""

    isLeaf = True

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        from gateway.dashboard import Picture

        self.gateway = gateway
        self.picture = Picture()

    def render_GET(self, request: Request) -> int | bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
            return b"not found\n"
        request.setHeader(b"content-security-policy", _CSP)  # type: ignore[no-untyped-call]
        return _answer_later(request, self._page(), "the dashboard")

    async def _page(self) -> tuple[bytes, str]:
        from gateway.dashboard import render

        return await render(self.gateway, self.picture), "text/html; charset=utf-8"


# The page loads nothing from elsewhere, and only its own inline style and script.
_CSP = (
    b"default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline';"
    b" connect-src 'self'; img-src data:"
)


class _AdminSite(Site):
    noisy = False  # no "Starting factory" lines each time it opens

    def log(self, request: Any) -> None:
        pass  # no access log: health checks and scrapes every few seconds would fill it


def admin_site(gateway: GatewayService) -> Site:
    root = Resource()  # type: ignore[no-untyped-call]
    health: Any = _Health()  # type: ignore[no-untyped-call]
    ready: Any = _Ready(gateway)
    metrics: Any = _Metrics(gateway)
    trace: Any = _Trace(gateway)
    dashboard: Any = _Dashboard(gateway)
    root.putChild(b"", dashboard)
    root.putChild(b"trace", trace)
    root.putChild(b"healthz", health)
    root.putChild(b"readyz", ready)
    root.putChild(b"metrics", metrics)
    site = _AdminSite(root)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    return site
