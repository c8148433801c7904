#!/usr/bin/env python3
"""A minimal twisted.web reverse proxy, the baseline of bench/http_proxy.py.

    python bench/_twisted_proxy.py LISTEN_PORT UPSTREAM_PORT

``twisted.web.proxy.ReverseProxyResource`` in front of 127.0.0.1:UPSTREAM_PORT,
served by ``twisted.web.server.Site`` on 127.0.0.1:LISTEN_PORT, with the
default reactor and no logging: what a few lines of Twisted give.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/http_proxy.py would hide the standard library's "http" package that Twisted imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from twisted.internet import reactor  # noqa: E402
from twisted.web import proxy, server  # noqa: E402


def main() -> None:
    listen, upstream = int(sys.argv[1]), int(sys.argv[2])
    site = server.Site(proxy.ReverseProxyResource("127.0.0.1", upstream, b""))
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(listen, site, backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
