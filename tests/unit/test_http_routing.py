"""HTTP routes: the match keys in routes.yaml, the listener's index and the router agree."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from gateway.config import ConfigError, parse
from gateway.message import HttpRequest
from gateway.plugins import load_transforms
from gateway.protocols.http.config import HttpUrl
from gateway.protocols.http.routes import HttpRoutes, http_host
from gateway.routing import NoRoute, Router

T = TypeVar("T")

BASE = """
version: 1
listeners:
  web: {protocol: http, listen: "tcp:8080:interface=127.0.0.1"}
destinations:
  app: {protocol: http, url: "http://127.0.0.1:8081"}
  other: {protocol: http, url: ["http://127.0.0.1:8082/base/", "https://app.example.test"]}
  box: {protocol: maildir, path: box}
routes:
"""


def config(routes: str):  # type: ignore[no-untyped-def]
    return parse(textwrap.dedent(BASE) + textwrap.dedent(routes), "routes.yaml", Path("/tmp"))


def problems(routes: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(routes)
    return [str(p) for p in info.value.problems]


def run(coro: Coroutine[Any, Any, T]) -> T:
    d = defer.Deferred.fromCoroutine(coro)
    out: list[Any] = []
    d.addBoth(out.append)
    assert out
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


def headers_of(pairs: dict[str, str]):  # type: ignore[no-untyped-def]
    def values(name: str) -> list[str]:
        return [v for k, v in pairs.items() if k.lower() == name.lower()]

    return values


ROUTES = r"""
  - {name: hooks, from: web, match: {path: '^/hooks/(?P<team>[a-z]+)$', method: [POST]}, to: box, options: {to: '{team}@example.test'}}
  - {name: api, from: web, match: {prefix: /api/}, to: app}
  - {name: api-v2, from: web, match: {prefix: /api/v2/, header: {X-Beta: '^yes$'}}, to: other}
  - {name: static, from: web, match: {host: [static.example.test, "*.cdn.example.test"]}, to: other}
  - {name: lan, from: web, match: {client: [10.0.0.0/8]}, to: other}
  - {name: rest, from: web, to: app}
"""


def select(cfg, method: str, host: str, target: str, headers=None, client="127.0.0.1"):  # type: ignore[no-untyped-def]
    found = HttpRoutes(cfg.routes).select(method, host, target, headers_of(headers or {}), client)
    return None if found is None else (found[0].name, found[1])


def test_listener_index_picks_the_first_route_in_file_order() -> None:
    cfg = config(ROUTES)
    assert select(cfg, "POST", "h", "/hooks/ops") == ("hooks", {"team": "ops"})
    assert select(cfg, "GET", "h", "/hooks/ops")[0] == "rest"  # method
    assert select(cfg, "GET", "h", "/api/v2/x?q=1")[0] == "api"  # earlier prefix wins
    assert select(cfg, "GET", "h", "/apiv2")[0] == "rest"
    assert select(cfg, "GET", "STATIC.example.test:8080", "/x")[0] == "static"
    assert select(cfg, "GET", "a.b.cdn.example.test", "/x")[0] == "static"
    assert select(cfg, "GET", "cdn.example.test", "/x")[0] == "rest"
    assert select(cfg, "GET", "h", "/x", client="10.1.2.3")[0] == "lan"
    # the query is not part of the path
    assert select(cfg, "POST", "h", "/hooks/ops?x=/api/")[0] == "hooks"


def test_header_condition() -> None:
    cfg = config(
        r"""
  - {name: beta, from: web, match: {prefix: /api/, header: {X-Beta: '^yes$'}}, to: other}
  - {name: rest, from: web, to: app}
"""
    )
    assert select(cfg, "GET", "h", "/api/x", {"X-Beta": "yes"})[0] == "beta"
    assert select(cfg, "GET", "h", "/api/x", {"X-Beta": "no"})[0] == "rest"


def test_router_agrees_with_the_listener_index_and_fills_options() -> None:
    cfg = config(ROUTES)
    router = Router(cfg, load_transforms())
    request = HttpRequest(listener="web", method="POST", target="/hooks/dev", host="h")
    [(route, groups, _)] = router.match(request)
    assert route.name == "hooks" and groups == {"team": "dev"}
    routed = run(router.route(request))
    assert routed[0].route.name == "hooks"
    for method, host, target, hdrs in [
        ("GET", "h", "/api/v2/x", {"X-Beta": "yes"}),
        ("GET", "x.cdn.example.test", "/", {}),
        ("PUT", "h", "/hooks/x", {}),
    ]:
        msg = HttpRequest(
            listener="web",
            method=method,
            target=target,
            host=host,
            http_headers=tuple(hdrs.items()),
        )
        [(route, _, _)] = router.match(msg)
        assert route.name == select(cfg, method, host, target, hdrs)[0]


def test_no_route_for_a_request() -> None:
    cfg = config("  - {name: only, from: web, match: {prefix: /only}, to: app}\n")
    assert select(cfg, "GET", "h", "/else") is None
    with pytest.raises(NoRoute):
        Router(cfg, load_transforms()).match(HttpRequest(listener="web", target="/else"))


def test_config_errors() -> None:
    found = problems("  - {from: web, match: {qname: example.test}, to: app}\n")
    assert any("do not apply to http" in p for p in found)
    found = problems("  - {from: web, match: {path: '(unclosed'}, to: app}\n")
    assert any("invalid regular expression" in p for p in found)
    found = problems(
        "  - {from: web, options: {x: '{nope}'}, match: {path: '^/(?P<team>x)'}, to: app}\n"
    )
    assert any("'{nope}'" in p and "team" in p for p in found)
    with pytest.raises(ConfigError) as info:
        parse(
            "version: 1\ndestinations:\n  a: {protocol: http, url: 'ftp://x', balanse: x}\n",
            "routes.yaml",
            Path("/tmp"),
        )
    text = str(info.value)
    assert "expected a URL" in text and "unknown key 'balanse'" in text and "balance" in text


def test_base_urls() -> None:
    url = HttpUrl.parse("https://App.Example.test/base/")
    assert (url.scheme, url.host, url.port, url.path) == ("https", "app.example.test", 443, "/base")
    assert HttpUrl.parse("http://[::1]:8080").port == 8080
    for bad in ("127.0.0.1:80", "http://", "http://h/?q=1", "http://u:p@h/"):
        with pytest.raises(ValueError):
            HttpUrl.parse(bad)


def test_http_host_forms() -> None:
    assert http_host("Example.TEST:8080") == "example.test"
    assert http_host("example.test.") == "example.test"
    assert http_host("[::1]:8080") == "[::1]"


def test_five_hundred_prefix_routes_cost_about_what_one_does() -> None:
    many = "".join(
        f"  - {{name: r{i}, from: web, match: {{prefix: /svc{i}/}}, to: app}}\n" for i in range(500)
    )
    hosts = "".join(
        f"  - {{name: h{i}, from: web, match: {{host: [h{i}.example.test]}}, to: app}}\n"
        for i in range(100)
    )
    big = HttpRoutes(config(many + hosts + "  - {name: rest, from: web, to: app}\n").routes)
    small = HttpRoutes(config("  - {name: rest, from: web, to: app}\n").routes)
    assert big.select("GET", "h", "/svc499/x", headers_of({}), "127.0.0.1")[0].name == "r499"
    assert big.select("GET", "h77.example.test", "/x", headers_of({}), "1.2.3.4")[0].name == "h77"

    def cost(routes: HttpRoutes, target: str) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(2000):
                routes.select("GET", "www.example.test", target, headers_of({}), "127.0.0.1")
            best = min(best, time.perf_counter() - started)
        return best

    # Generous: the point is that it does not grow with the number of routes (500x).
    assert cost(big, "/elsewhere/x") < 4 * cost(small, "/elsewhere/x")


def test_a_proxy_route_stands_alone() -> None:
    for route in (
        "  - {from: web, to: [app, box]}\n",
        "  - {from: web, to: app, transforms: [http_to_mail]}\n",
        "  - {from: web, to: app, continue: true}\n",
    ):
        assert any("reverse proxy" in p for p in problems(route)), route
