"""The settings of DNS and DoH listeners and destinations, and the keys of DNS routes.

Also the value types a DNS route is written in (names, record types, records)
and the check of a DNS route at load time.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.config import (
    HIDDEN,
    BaseDestinationConfig,
    ClientLimits,
    ConfigPath,
    Duration,
    HostPort,
    ListenerConfig,
    Location,
    Network,
    Pattern,
    Problem,
    Rate,
    Route,
    RouteContext,
    Size,
    Value,
    doc,
)
from gateway.message import Kind
from gateway.tls import TlsConfig

# --- value types -------------------------------------------------------------------


class QName(str, Value):
    """A DNS name to match: ``www.example.test`` (that name), ``*.example.test`` (names below it).

    Stored lower-case with a trailing dot, as the DNS listener compares them.
    """

    schema: typing.ClassVar[dict[str, Any]] = {
        "type": "string",
        "description": "DNS name, or *.suffix",
    }

    @classmethod
    def parse(cls, text: str) -> QName:
        name = text.strip().lower()
        if name in ("*", "*."):
            return cls("*.")
        body = name[2:] if name.startswith("*.") else name
        if not body.endswith("."):
            body += "."
        labels = body[:-1].split(".")
        if body == "." or any(not label for label in labels):
            raise ValueError(
                f"expected a DNS name such as www.example.test or *.example.test, got '{text}'"
            )
        if len(body) > 254 or any(len(label) > 63 for label in labels):
            raise ValueError(
                f"'{text}' is too long for a DNS name (labels up to 63, names up to 253)"
            )
        if "*" in body:
            raise ValueError(f"'{text}': a wildcard '*' may only be the whole first label")
        return cls(("*." if name.startswith("*.") else "") + body)

    @property
    def wildcard(self) -> bool:
        return self.startswith("*.")

    @property
    def base(self) -> str:
        """The name itself, or for ``*.suffix`` the suffix."""
        return self[2:] if self.wildcard else str(self)


class RRType(int, Value):
    """A DNS record type by name (A, AAAA, MX ...) or number."""

    schema: typing.ClassVar[dict[str, Any]] = {
        "type": ["string", "integer"],
        "description": "record type, e.g. A",
    }

    @classmethod
    def parse(cls, text: str) -> RRType:
        import dns.rdatatype

        try:
            return cls(int(dns.rdatatype.from_text(text.strip().upper())))
        except Exception:
            raise ValueError(f"unknown DNS record type '{text}' (e.g. A, AAAA, MX, TXT)") from None


class RRClass(int, Value):
    """A DNS class by name (IN, CH) or number."""

    schema: typing.ClassVar[dict[str, Any]] = {
        "type": ["string", "integer"],
        "description": "DNS class, e.g. IN",
    }

    @classmethod
    def parse(cls, text: str) -> RRClass:
        import dns.rdataclass

        try:
            return cls(int(dns.rdataclass.from_text(text.strip().upper())))
        except Exception:
            raise ValueError(f"unknown DNS class '{text}' (e.g. IN, CH)") from None


class Record(str, Value):
    """A DNS record in zone-file form: ``www.example.test. 300 IN A 192.0.2.1``."""

    schema: typing.ClassVar[dict[str, Any]] = {
        "type": "string",
        "description": "zone-file record line",
    }

    @classmethod
    def parse(cls, text: str) -> Record:
        import dns.exception
        import dns.rrset

        try:
            parse_record(text)
        except (dns.exception.DNSException, ValueError) as exc:
            raise ValueError(
                "expected a record such as 'www.example.test. 300 IN A 192.0.2.1',"
                f" got '{text}': {exc}"
            ) from None
        return cls(text.strip())


def parse_record(text: str) -> Any:
    import dns.rrset

    parts = text.split()
    if len(parts) < 4:
        raise ValueError("a record needs a name, a TTL, a class (optional), a type and data")
    name, ttl = parts[0], parts[1]
    if not ttl.isdigit():
        raise ValueError(f"the TTL '{ttl}' is not a number")
    rest = parts[2:]
    rdclass = "IN"
    if rest[0].upper() in ("IN", "CH", "HS"):
        rdclass, rest = rest[0].upper(), rest[1:]
    if len(rest) < 2:
        raise ValueError("a record needs a type and data after the TTL")
    return dns.rrset.from_text(name, int(ttl), rdclass, rest[0], " ".join(rest[1:]))


# --- listeners and destinations --------------------------------------------------------

# Who a DNS or DoH listener answers when 'allow' is not given: this host only, so that a
# listener on a public address (a systemd socket on [::]:53, say) is not an open resolver.
LOOPBACK = (Network.parse("127.0.0.0/8"), Network.parse("::1"))
ALLOW_HELP = (
    "client networks answered; others get REFUSED (default: loopback only, so the"
    " gateway is never an open resolver; list your own networks)"
)


@dataclass(frozen=True, kw_only=True)
class RateLimitConfig:
    """Response rate limiting on UDP (BIND's rate-limit, Knot's rrl)."""

    responses: Rate = field(
        metadata=doc("the same answer to one client network, e.g. 10/s (a burst of 10 included)")
    )
    errors: Rate | None = field(
        default=None,
        metadata=doc("error answers (NXDOMAIN, REFUSED ...) to one client network, all together"),
    )
    slip: int = field(
        default=2,
        metadata=doc(
            "every Nth answer over the rate goes out truncated, so real clients retry over"
            " TCP (0: drop them all; 1: truncate them all)"
        ),
    )
    ipv4_prefix: int = field(default=24, metadata=doc("IPv4 clients are counted by this network"))
    ipv6_prefix: int = field(default=56, metadata=doc("IPv6 clients are counted by this network"))

    def __post_init__(self) -> None:
        if not 0 <= self.slip <= 10:
            raise ValueError(f"'slip' must be 0 to 10, not {self.slip}")
        if not 8 <= self.ipv4_prefix <= 32:
            raise ValueError(f"'ipv4_prefix' must be 8 to 32, not {self.ipv4_prefix}")
        if not 16 <= self.ipv6_prefix <= 128:
            raise ValueError(f"'ipv6_prefix' must be 16 to 128, not {self.ipv6_prefix}")


@dataclass(frozen=True, kw_only=True)
class DnsListenerConfig(ListenerConfig):
    """A DNS server over UDP and TCP (RFC 1035, RFC 7766) whose queries are routed."""

    kind: typing.ClassVar[Kind] = Kind.DNS
    protocol: Literal["dns"] = "dns"
    allow: tuple[Network, ...] = field(default=LOOPBACK, metadata=doc(ALLOW_HELP))
    tcp_idle_timeout: Duration = field(
        default=Duration(10), metadata=doc("close idle TCP connections after", positive=True)
    )
    max_tcp_connections: int = field(
        default=1000, metadata=doc("TCP clients at once", positive=True)
    )
    max_udp_size: Size = field(
        default=Size(1232),
        metadata=doc(
            "largest answer sent over UDP; a longer one goes out cut, with TC set, and the"
            " client asks again over TCP (1232: DNS flag day 2020)"
        ),
    )
    rate_limit: RateLimitConfig | None = field(
        default=None,
        metadata=doc("response rate limiting on UDP: responses, errors, slip, ipv4/6_prefix"),
    )

    def connection_limit(self) -> int:
        return self.max_tcp_connections

    def __post_init__(self) -> None:
        if not 512 <= self.max_udp_size <= 65535:
            raise ValueError(
                f"'max_udp_size' must be 512 to 65535 octets, not {int(self.max_udp_size)}"
            )


@dataclass(frozen=True, kw_only=True)
class DohLimits(ClientLimits):
    """Per client: over query_rate, 429 and Retry-After."""

    query_rate: Rate | None = field(default=None, metadata=doc("queries per client, e.g. 100/s"))


@dataclass(frozen=True, kw_only=True)
class DohListenerConfig(ListenerConfig):
    """DNS over HTTPS (RFC 8484) and the JSON form, answered through the DNS routes."""

    kind: typing.ClassVar[Kind] = Kind.DNS
    protocol: Literal["doh"] = "doh"
    allow: tuple[Network, ...] = field(default=LOOPBACK, metadata=doc(ALLOW_HELP))
    path: str = field(default="/dns-query", metadata=doc("URL path of the endpoint"))
    max_size: Size = field(default=Size(65535), metadata=doc("largest query accepted (413)"))
    max_connections: int = field(
        default=1000, metadata=doc("clients connected at once", positive=True)
    )
    hsts: Duration = field(
        default=Duration(365 * 86400),
        metadata=doc("Strict-Transport-Security max-age of HTTPS answers (0: none)"),
    )
    limits: DohLimits = field(
        default_factory=DohLimits,
        metadata=doc("per client: connections, connection_rate, query_rate"),
    )
    tls: TlsConfig | None = field(
        default=None,
        metadata=doc("certificate and key for the tls: endpoints (DNS over HTTPS)"),
    )

    def connection_limit(self) -> int:
        return self.max_connections

    def client_limits(self) -> DohLimits:
        return self.limits

    def tls_config(self) -> TlsConfig | None:
        return self.tls


@dataclass(frozen=True, kw_only=True)
class DnsDestinationConfig(BaseDestinationConfig):
    """Forwards DNS queries to DNS servers: UDP first, TCP when the answer is truncated."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.DNS})
    protocol: Literal["dns"] = "dns"
    servers: tuple[HostPort, ...] = field(metadata=doc("servers tried in order: 127.0.0.1:53"))
    timeout: Duration = field(
        default=Duration(2), metadata=doc("per server and query", positive=True)
    )


@dataclass(frozen=True, kw_only=True)
class DohDestinationConfig(BaseDestinationConfig):
    """Sends DNS queries as DNS-over-HTTPS requests (RFC 8484)."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.DNS})
    protocol: Literal["doh"] = "doh"
    url: str = field(metadata=doc("e.g. https://dns.example/dns-query"))
    method: Literal["POST", "GET"] = "POST"
    ca: ConfigPath | None = field(default=None, metadata=doc("CA file to verify the server"))
    verify: bool = field(default=True, metadata=doc("verify the server's certificate"))
    connections: int = field(default=4, metadata=doc("keep-alive connections in the pool"))
    timeout: Duration = field(default=Duration(5), metadata=doc("per query", positive=True))


# --- what DNS routes say ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DnsMatch:
    """The match keys of routes from DNS and DoH listeners."""

    qname: tuple[QName, ...] = field(
        default=(), metadata=doc("DNS names: www.example.test, or *.example.test for names below")
    )
    qname_regex: Pattern | None = field(default=None, metadata=doc("DNS name (regex)"))
    qname_file: ConfigPath | None = field(
        default=None,
        metadata=doc("a file of DNS names, one a line (# comments); re-read on reload"),
    )
    qtype: tuple[RRType, ...] = field(default=(), metadata=doc("record types: A, AAAA ..."))
    qclass: RRClass | None = field(default=None, metadata=doc("DNS class, e.g. IN"))
    # The names read from qname_file when the file was loaded.
    file_names: tuple[QName, ...] = field(default=(), metadata=HIDDEN)


@dataclass(frozen=True, kw_only=True)
class DnsRoute:
    """The keys of routes from DNS and DoH listeners, besides to, match and from."""

    answer: tuple[Record, ...] = field(
        default=(), metadata=doc("DNS: answer with these records instead of forwarding")
    )
    action: Literal["refuse", "nxdomain"] | None = field(
        default=None, metadata=doc("DNS: answer REFUSED or NXDOMAIN")
    )
    cache: bool = field(default=True, metadata=doc("DNS: cache the answers of this route"))
    cache_entries: int = field(default=10000, metadata=doc("DNS: cache size (LRU)"))
    serve_stale: Duration = field(
        default=Duration(0),
        metadata=doc("DNS: serve expired answers this long when every upstream fails"),
    )


def check_dns_route(route: Route, context: RouteContext) -> Route:
    """DNS routes: one action, no transforms, and the names of a qname_file loaded."""
    if len(context.kinds) > 1:
        context.problem("from_", "a route takes either DNS listeners or others, not both")
    keys = route.view(DnsRoute)
    chosen = [
        k for k, v in (("to", route.to), ("answer", keys.answer), ("action", keys.action)) if v
    ]
    if len(chosen) != 1:
        context.problem(
            "",
            "a DNS route needs exactly one of 'to' (forward), 'answer' (local records) or"
            f" 'action' (refuse, nxdomain); it has {', '.join(chosen) or 'none'}",
        )
    if route.transforms:
        context.problem("transforms", "transforms do not apply to DNS routes")
    path = route.match.view(DnsMatch).qname_file
    if path is None:
        return route
    names, problems = read_name_file(path)
    for problem in problems:
        if problem.where is None:
            # The file as a whole: reported at the line that names it.
            context.problem("match.qname_file=", problem.message)
        else:
            context.problems([problem])
    return dataclasses.replace(route, match=route.match.with_values(file_names=names))


def read_name_file(path: str) -> tuple[tuple[QName, ...], list[Problem]]:
    """DNS names from a block-list style file: one a line, ``#`` starts a comment.

    A hosts-file line (``0.0.0.0 ads.example``) is taken by its last field.
    """
    problems: list[Problem] = []
    names: list[QName] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        why = (exc.strerror or str(exc)).lower()
        return (), [Problem(None, f"'qname_file': cannot read the name file {path}: {why}")]
    except UnicodeDecodeError as exc:
        return (), [Problem(None, f"'qname_file': the name file {path} is not UTF-8 text: {exc}")]
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            names.append(QName.parse(text.split()[-1]))
        except ValueError as exc:
            problems.append(Problem(Location(path, number, 1), str(exc)))
    return tuple(names), problems
