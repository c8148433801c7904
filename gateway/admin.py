"""The admin site on the ``admin:`` endpoint: /healthz and /readyz.

/healthz answers 200 while the process runs its event loop; /readyz answers
200 only once every listener is bound and the configuration is loaded, and 503
while starting or stopping, so a load balancer or systemd can tell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from gateway.service import GatewayService


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
        if problems:
            request.setResponseCode(503)
            return ("not ready: " + "; ".join(problems) + "\n").encode()
        return b"ready\n"


def admin_site(gateway: GatewayService) -> Site:
    root = Resource()  # type: ignore[no-untyped-call]
    health: Any = _Health()  # type: ignore[no-untyped-call]
    ready: Any = _Ready(gateway)
    root.putChild(b"healthz", health)
    root.putChild(b"readyz", ready)
    site = Site(root)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    return site
