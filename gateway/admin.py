"""The admin site on the ``admin:`` endpoint: the dashboard, /metrics, /healthz and /readyz.

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
from urllib.parse import quote, unquote

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


def _answer_later(request: Request, page: Coroutine[Any, Any, tuple[bytes, str]], what: str) -> int:
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
    """/ (the dashboard page, see gateway.dashboard) and what people do from it:
    POST /sign-in and /sign-out, GET /queue/ID (show), POST /queue/retry and
    /queue/drop.  The last four need a session signed in with the admin token, and
    the changing ones its CSRF field and a request from this very origin."""

    isLeaf = True

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        from gateway.admin_auth import AdminSessions
        from gateway.dashboard import Picture

        self.gateway = gateway
        self.picture = Picture()
        self.sessions = AdminSessions(gateway.reactor.seconds)

    def _token(self) -> str:
        return self.gateway.current().config.admin_token

    def _viewer(self, request: Request, notice: str = "") -> Any:
        from gateway.admin_auth import COOKIE
        from gateway.dashboard import Viewer

        cookie = request.getCookie(COOKIE.encode())  # type: ignore[no-untyped-call]
        session = self.sessions.session(cookie.decode("latin-1") if cookie else None, self._token())
        csrf = self.sessions.csrf(session) if session else ""
        return Viewer(actions=bool(self._token()), csrf=csrf, notice=notice)

    def _headers(self, request: Request) -> None:
        request.setHeader(b"content-security-policy", _CSP)  # type: ignore[no-untyped-call]
        request.setHeader(b"cache-control", b"no-store")  # type: ignore[no-untyped-call]
        request.setHeader(b"x-frame-options", b"DENY")  # type: ignore[no-untyped-call]
        request.setHeader(b"referrer-policy", b"same-origin")  # type: ignore[no-untyped-call]

    def render_GET(self, request: Request) -> int | bytes:
        self._headers(request)
        path = _path(request).split("/")
        if path == [""]:
            notice = ""
            for done in ("retried", "dropped"):
                if _arg(request, done):
                    notice = f"{_arg(request, done)} {done}"
            page = self._page(self._viewer(request, notice))
            return _answer_later(request, page, "the dashboard")
        if len(path) == 2 and path[0] == "queue" and path[1]:
            viewer = self._viewer(request)
            if not viewer.signed_in:
                return self._refuse(request, 403, _SIGN_IN_FIRST)
            key = unquote(path[1])
            return _answer_later(request, self._show(request, key, viewer), "showing a delivery")
        if path in (["sign-in"], ["sign-out"]):
            return _see(request, "/#queue-title")  # the forms are on the dashboard
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
        return b"not found\n"

    def render_POST(self, request: Request) -> int | bytes:
        from gateway.admin_auth import COOKIE, Refused, check_origin

        self._headers(request)
        untyped: Any = request  # Twisted's Request methods without annotations
        path = _path(request)
        client = str(getattr(untyped.getClientAddress(), "host", ""))
        tls = bool(untyped.isSecure())
        try:
            check_origin(
                _header(request, b"origin"),
                _header(request, b"sec-fetch-site"),
                _header(request, b"host"),
                tls,
            )
            if path == "sign-in":
                session = self.sessions.sign_in(_arg(request, "token"), self._token(), client)
                untyped.addCookie(
                    COOKIE.encode(),
                    session.encode(),
                    path=b"/",
                    httpOnly=True,
                    sameSite="strict",
                    secure=tls,
                )
                log.info("dashboard: {client} signed in", client=client)
                return _see(request, "/#queue-title")
            if path not in ("sign-out", "queue/retry", "queue/drop"):
                raise Refused(404, "no such action")
            cookie = request.getCookie(COOKIE.encode())  # type: ignore[no-untyped-call]
            found = self.sessions.session(
                cookie.decode("latin-1") if cookie else None, self._token()
            )
            if found is None:
                raise Refused(403, _SIGN_IN_FIRST)
            self.sessions.check_csrf(found, _arg(request, "csrf"))
        except Refused as refused:
            return self._refuse(request, refused.status, refused.reason)
        if path == "sign-out":
            self.sessions.sign_out(found)
            untyped.addCookie(COOKIE.encode(), b"", path=b"/", max_age=b"0")
            return _see(request, "/")
        what = path.removeprefix("queue/")
        work = self._act(request, what, _arg(request, "id"), client)
        return _answer_later(request, work, f"{what} from the dashboard")

    def _refuse(self, request: Request, status: int, reason: str) -> bytes:
        from gateway.dashboard import render_refusal

        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")  # type: ignore[no-untyped-call]
        return render_refusal(status, reason)

    async def _page(self, viewer: Any) -> tuple[bytes, str]:
        from gateway.dashboard import render

        return await render(self.gateway, self.picture, viewer), _HTML

    async def _show(self, request: Request, key: str, viewer: Any) -> tuple[bytes, str]:
        from gateway.dashboard import render_refusal, render_show
        from gateway.queue_cli import describe

        spool = self.gateway.spool
        found = await spool.find(key) if spool is not None else []
        if spool is None or not found:
            request.setResponseCode(404)
            return render_refusal(404, f"no message or delivery with id {key} in the spool"), _HTML
        record, missing = await describe(spool, found)
        return render_show(record, missing, viewer), _HTML

    async def _act(
        self, request: Request, what: str, delivery_id: str, client: str
    ) -> tuple[bytes, str]:
        from gateway.dashboard import render_refusal

        spool = self.gateway.spool
        entry = await spool.entry(delivery_id) if spool is not None and delivery_id else None
        if spool is None or entry is None:
            request.setResponseCode(404)
            reason = (
                f"no delivery {delivery_id or '(none given)'} in the spool (delivered meanwhile?)"
            )
            return render_refusal(404, reason), _HTML
        if what == "retry":
            await spool.retry([delivery_id], by=f"the dashboard (from {client})")
            if self.gateway.delivery is not None:
                self.gateway.delivery.kick(entry.destination)
            done = "retried"
        elif await spool.drop(delivery_id):
            done = "dropped"
        else:
            request.setResponseCode(404)
            return render_refusal(
                404, f"{delivery_id} left the spool before it could be dropped"
            ), _HTML
        log.info(
            "dashboard: {client} {what} {id} (route {route}, destination {destination})",
            client=client,
            what=done,
            id=delivery_id,
            route=entry.route,
            destination=entry.destination,
        )
        return _see(request, f"/?{done}={quote(delivery_id)}#queue-title"), _HTML


_HTML = "text/html; charset=utf-8"
_SIGN_IN_FIRST = "sign in with the admin token first (on the dashboard, at the queue)"


def _path(request: Request) -> str:
    """The request's path without its query and the slashes around it ("" for /)."""
    return (request.path or b"").decode("utf-8", "replace").strip("/")


def _arg(request: Request, name: str) -> str:
    values = request.args.get(name.encode()) or [b""]
    return str(values[0].decode("utf-8", "replace"))


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def _see(request: Request, where: str) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"location", where.encode())  # type: ignore[no-untyped-call]
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
    return b""


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
    for action in (b"sign-in", b"sign-out", b"queue"):
        root.putChild(action, dashboard)
    root.putChild(b"trace", trace)
    root.putChild(b"healthz", health)
    root.putChild(b"readyz", ready)
    root.putChild(b"metrics", metrics)
    site = _AdminSite(root)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    return site
