"""DNS routes in routes.yaml, and the name index that picks one per query."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse
from gateway.protocols.dns.config import QName
from gateway.protocols.dns.routes import DnsRoutes

BASE = """
version: 1
listeners:
  dns-in: {protocol: dns, listen: ["udp:5353:interface=127.0.0.1", "tcp:5353:interface=127.0.0.1"]}
  lan-in: {protocol: dns, listen: "udp:5354"}
destinations:
  inside: {protocol: dns, servers: ["127.0.0.1:5301", "[::1]:5302", "127.0.0.1"]}
  outside: {protocol: doh, url: "https://127.0.0.1:8443/dns-query"}
routes:
"""


def config(routes: str, tmp_path: Path | None = None):  # type: ignore[no-untyped-def]
    return parse(
        textwrap.dedent(BASE) + textwrap.dedent(routes), "routes.yaml", tmp_path or Path("/tmp")
    )


def problems(routes: str, tmp_path: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(routes, tmp_path)
    return [str(p) for p in info.value.problems]


def select(cfg, name: str, qtype: int = 1, client: str = "127.0.0.1") -> str | None:  # type: ignore[no-untyped-def]
    route = DnsRoutes(cfg.routes).select(name, qtype, 1, client)
    return None if route is None else route.name


def test_qname_forms() -> None:
    assert QName.parse("WWW.Example.Test") == "www.example.test."
    assert QName.parse("*.example.test.") == "*.example.test."
    assert QName.parse("*.example.test").base == "example.test."
    assert QName.parse("*").wildcard
    for bad in ("a..b", "*.*.x", "w*w.x", "x" * 64 + ".test", "."):
        with pytest.raises(ValueError):
            QName.parse(bad)


def test_exact_suffix_regex_type_client_and_file_order() -> None:
    cfg = config(
        r"""
  - {name: blocked, from: dns-in, match: {qname: [ads.example.test, "*.ads.example.test"]}, action: nxdomain}
  - {name: lan, from: dns-in, match: {qname: "*.internal.test", client: [10.0.0.0/8]}, to: inside}
  - {name: internal, from: dns-in, match: {qname: "*.internal.test"}, answer: ["x.internal.test. 60 IN A 192.0.2.1"]}
  - {name: mx-only, from: dns-in, match: {qname: "mail.example.test", qtype: [MX]}, action: refuse}
  - {name: numbers, from: dns-in, match: {qname_regex: '^[0-9]+\.example\.test\.$'}, to: inside}
  - {name: rest, from: dns-in, to: outside}
"""
    )
    assert select(cfg, "ads.example.test.") == "blocked"
    assert select(cfg, "x.y.ads.example.test.") == "blocked"
    assert select(cfg, "notads.example.test.") == "rest"
    assert select(cfg, "db.internal.test.", client="10.1.1.1") == "lan"
    assert select(cfg, "db.internal.test.") == "internal"
    assert select(cfg, "internal.test.") == "rest"  # *.suffix is below the suffix only
    assert select(cfg, "mail.example.test.", qtype=15) == "mx-only"
    assert select(cfg, "mail.example.test.", qtype=1) == "rest"
    assert select(cfg, "42.example.test.") == "numbers"
    assert select(cfg, ".") == "rest"


def test_route_needs_exactly_one_action() -> None:
    found = problems(
        """
  - {from: dns-in, to: inside, action: refuse}
  - {from: dns-in}
  - {from: dns-in, to: inside, transforms: [headers]}
"""
    )
    assert any(
        "route 1: a DNS route needs exactly one of 'to'" in p and "it has to, action" in p
        for p in found
    )
    assert any(
        "route 2: a DNS route needs exactly one of" in p and "it has none" in p for p in found
    )
    assert any("route 3: transforms do not apply to DNS routes" in p for p in found)


def test_bad_dns_values_are_located() -> None:
    found = problems(
        """
  - {from: dns-in, match: {qname: "a..b", qtype: [AAA]}, answer: ["www 300 IN A notanip"]}
"""
    )
    text = "\n".join(found)
    assert "expected a DNS name such as www.example.test" in text
    assert "unknown DNS record type 'AAA'" in text
    assert "expected a record such as" in text
    found = problems("  - {from: dns-in, match: {rcpt: x}, to: inside}\n")
    assert "match key(s) rcpt do not apply to dns messages" in found[0]


def test_qname_file_is_read_with_line_numbers(tmp_path: Path) -> None:
    (tmp_path / "block.txt").write_text(
        "# ads\nads.example.test\n0.0.0.0 tracker.example.test  # hosts style\n*.evil.test\n\nbad..name\n"
    )
    found = problems(
        "  - {from: dns-in, match: {qname_file: block.txt}, action: refuse}\n  - {from: dns-in, to: outside}\n",
        tmp_path,
    )
    assert found == [
        f"{tmp_path}/block.txt:6:1: expected a DNS name such as www.example.test or *.example.test, got 'bad..name'"
    ]
    (tmp_path / "block.txt").write_text(
        "ads.example.test\n0.0.0.0 tracker.example.test\n*.evil.test\n"
    )
    cfg = config(
        "  - {name: block, from: dns-in, match: {qname_file: block.txt}, action: refuse}\n  - {name: rest, from: dns-in, to: outside}\n",
        tmp_path,
    )
    assert select(cfg, "tracker.example.test.") == "block"
    assert select(cfg, "a.evil.test.") == "block"
    assert select(cfg, "good.example.test.") == "rest"


def test_thousands_of_suffix_routes_use_the_index() -> None:
    routes = "".join(
        f"  - {{name: r{i}, from: dns-in, match: {{qname: '*.zone{i}.test'}}, to: inside}}\n"
        for i in range(3000)
    )
    cfg = config(routes + "  - {name: rest, from: dns-in, to: outside}\n")
    index = DnsRoutes(cfg.routes)
    assert index.candidates("www.zone2999.test.") == [2999, 3000]
    assert select(cfg, "www.zone2999.test.") == "r2999"
    assert select(cfg, "www.other.test.") == "rest"
