"""routes.yaml, parsed once into frozen, typed values.

The file is read with PyYAML's node API so that every value keeps its line and
column; the dataclasses below are both the parser's schema and the source of
``gateway schema``.  Nothing after start-up sees raw YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
import re
import string
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.message import Kind, local_hostname

# --- locations and errors ---------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A place in the configuration file, 1-based like an editor shows it."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    where: Location | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ConfigError(Exception):
    """One or more mistakes in a configuration file, each with its location."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """'; did you mean 'x'?' for the nearest valid name, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# --- value types with their own syntax ----------------------------------------


class Size(int):
    """A size in bytes written with a unit: 512, 10k, 10KiB, 10MB, 1GiB."""

    _UNITS: typing.ClassVar[dict[str, int]] = {
        "": 1, "b": 1,
        "k": 1024, "kb": 1000, "kib": 1024,
        "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
        "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    }  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> Size:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
        if not m or m.group(2).lower() not in cls._UNITS:
            raise ValueError(f"expected a size such as 512, 64KiB, 10MiB or 1GB, got '{text}'")
        return cls(int(float(m.group(1)) * cls._UNITS[m.group(2).lower()]))


class Duration(float):
    """A duration in seconds with a unit: 250ms, 2s, 5m, 1h, 5d; a bare number is seconds."""

    _UNITS: typing.ClassVar[dict[str, float]] = {
        "ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
    }  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> Duration:
        total = 0.0
        rest = text.strip()
        if not rest:
            raise ValueError("expected a duration such as 2s, 5m or 1h, got an empty value")
        for m in re.finditer(r"(\d+(?:\.\d+)?)\s*([a-z]*)|(.)", rest):
            if m.group(3) is not None and m.group(3).strip():
                raise ValueError(
                    f"expected a duration such as 250ms, 2s, 5m, 1h or 5d, got '{text}'"
                )
            if m.group(1) is None:
                continue
            unit = m.group(2)
            if unit not in cls._UNITS:
                raise ValueError(
                    f"unknown unit '{unit}' in duration '{text}' (use ms, s, m, h, d or w)"
                )
            total += float(m.group(1)) * cls._UNITS[unit]
        return cls(total)


_SERVER_ENDPOINTS = ("tcp", "tcp6", "ssl", "unix", "systemd", "udp", "tls")
_CLIENT_ENDPOINTS = ("tcp", "tcp6", "ssl", "unix", "tls", "udp")


class Endpoint(str):
    """A Twisted server endpoint string, plus ``udp:PORT[:interface=ADDR]`` for UDP.

    Sockets passed by systemd (socket activation): ``systemd:domain=INET6:index=N``
    or ``systemd:domain=INET6:name=NAME`` (Twisted's) for TCP, and
    ``udp:systemd:index=N`` or ``udp:systemd:name=NAME`` (ours) for UDP.
    """

    kinds: typing.ClassVar[tuple[str, ...]] = _SERVER_ENDPOINTS

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        kind = text.split(":", 1)[0].lower()
        if kind not in cls.kinds or ":" not in text:
            raise ValueError(
                f"expected an endpoint such as tcp:2525:interface=127.0.0.1, got '{text}'"
                + suggest(kind, cls.kinds).replace("'; ", "' kind; ")
            )
        if kind == "udp" and text[4:].lower().startswith("systemd:"):
            if "systemd" not in cls.kinds:
                raise ValueError(f"a socket passed by systemd only listens, got '{text}'")
            systemd_endpoint_args(text)
        elif kind == "udp":
            udp_endpoint_args(text)
        elif kind == "systemd":
            systemd_endpoint_args(text)
        else:
            cls._check_with_twisted(text)
        return cls(text)

    @staticmethod
    def _check_with_twisted(text: str) -> None:
        from twisted.internet import endpoints
        from twisted.internet.testing import MemoryReactor

        try:
            endpoints.serverFromString(MemoryReactor(), text)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ValueError(f"invalid endpoint '{text}': {exc}") from None

    @property
    def is_udp(self) -> bool:
        return self.lower().startswith("udp:")


class ClientEndpoint(Endpoint):
    """A Twisted client endpoint string such as ``tcp:127.0.0.1:25``."""

    kinds = _CLIENT_ENDPOINTS

    @staticmethod
    def _check_with_twisted(text: str) -> None:
        from twisted.internet import endpoints
        from twisted.internet.testing import MemoryReactor

        try:
            endpoints.clientFromString(MemoryReactor(), text)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ValueError(f"invalid endpoint '{text}': {exc}") from None


def systemd_endpoint_args(text: str) -> tuple[str | None, int | None, str | None]:
    """Domain, index and name of ``systemd:domain=INET6:index=N`` (or ``name=NAME``).

    Also of the UDP form ``udp:systemd:index=N`` / ``udp:systemd:name=NAME``, where
    ``domain=`` may be left out (the socket says it).  Twisted checks nothing of a
    systemd endpoint until the sockets exist, so ``gateway check`` checks here.
    """
    udp = text.lower().startswith("udp:")
    body = text.split(":", 2 if udp else 1)[-1]
    form = (
        "udp:systemd:index=N or udp:systemd:name=NAME"
        if udp
        else ("systemd:domain=INET6:index=N or systemd:domain=INET6:name=NAME")
    )
    given: dict[str, str] = {}
    for part in body.split(":") if body else []:
        key, sep, value = part.partition("=")
        if not sep or not value or key not in ("domain", "index", "name") or key in given:
            raise ValueError(f"expected {form}, got '{text}'")
        given[key] = value
    if ("index" in given) == ("name" in given):
        raise ValueError(f"expected {form} (one of index= and name=), got '{text}'")
    domains = ("INET", "INET6") if udp else ("INET", "INET6", "UNIX")
    domain = given.get("domain")
    if (domain is None and not udp) or (domain is not None and domain not in domains):
        raise ValueError(
            f"expected domain={' or '.join(domains)} in '{text}' (the socket's address family)"
        )
    index = None
    if "index" in given:
        if not given["index"].isdigit():
            raise ValueError(f"index= is the socket's number counting from 0, got '{text}'")
        index = int(given["index"])
    return domain, index, given.get("name")


def udp_endpoint_args(text: str) -> tuple[int, str]:
    """Port and interface of ``udp:PORT[:interface=ADDR]`` (Twisted has no UDP endpoint)."""
    parts = text.split(":")
    try:
        port = int(parts[1])
        if not 0 <= port <= 65535:
            raise ValueError
    except (IndexError, ValueError):
        raise ValueError(
            f"expected udp:PORT[:interface=ADDR] with a port number, got '{text}'"
        ) from None
    interface = ""
    rest = ":".join(parts[2:])
    if rest:
        if not rest.startswith("interface="):
            raise ValueError(f"the only option of a udp endpoint is interface=ADDR, got '{rest}'")
        interface = rest[len("interface=") :].replace("\\:", ":")
    return port, interface


class Network:
    """An IP network such as 127.0.0.0/8 or ::1 (a bare address is a /32 or /128)."""

    __slots__ = ("net",)

    def __init__(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        self.net = net

    @classmethod
    def parse(cls, text: str) -> Network:
        try:
            return cls(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"expected an IP network such as 127.0.0.0/8 or ::1, got '{text}'"
            ) from None

    def __contains__(self, address: object) -> bool:
        try:
            ip = ipaddress.ip_address(str(address))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.version == self.net.version and ip in self.net

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Network) and other.net == self.net

    def __hash__(self) -> int:
        return hash(self.net)

    def __repr__(self) -> str:
        return f"Network({str(self.net)!r})"


def client_allowed(networks: tuple[Network, ...], address: str) -> bool:
    """True when ``networks`` is empty (no restriction) or holds ``address``."""
    return not networks or any(address in n for n in networks)


class HostPort(str):
    """``HOST:PORT`` or ``[IPv6]:PORT`` (port 53 when left out)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        value = text.strip()
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", value)
        if not m:
            raise ValueError(f"expected HOST:PORT such as 127.0.0.1:53 or [::1]:53, got '{text}'")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4) or 53)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} in '{text}' is out of range")
        obj = cls(value)
        obj.host = host
        obj.port = port
        return obj


class HttpUrl(str):
    """An ``http://`` or ``https://`` base URL: ``http://127.0.0.1:8080`` or ``https://app/api``."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, text: str) -> HttpUrl:
        from urllib.parse import urlsplit

        value = text.strip()
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid URL '{text}': {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"expected a URL such as http://127.0.0.1:8080 or https://app.example, got '{text}'"
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"a base URL has no query, fragment or user name, got '{text}'")
        obj = cls(value)
        obj.scheme = parts.scheme
        obj.host = parts.hostname
        obj.port = port or (443 if parts.scheme == "https" else 80)
        obj.path = parts.path.rstrip("/")
        return obj


class WebhookUrl(str):
    """The URL a web hook is POSTed to: ``http(s)://host[:port]/path[?query]``."""

    @classmethod
    def parse(cls, text: str) -> WebhookUrl:
        from urllib.parse import urlsplit

        value = text.strip()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises for a port out of range)
        except ValueError as exc:
            raise ValueError(f"invalid URL '{text}': {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or not value.isascii():
            raise ValueError(
                f"expected a URL such as https://hooks.example/mail (ASCII; IDNs and"
                f" non-ASCII paths encoded), got '{text}'"
            )
        if parts.fragment or parts.username or parts.password:
            raise ValueError(f"a web hook URL has no #fragment or user name, got '{text}'")
        return cls(value)


class ConfigPath(str):
    """A file or folder; relative paths are taken from the configuration file's folder."""


class Pattern(str):
    """A regular expression, searched case-insensitively (as Postfix's regexp tables do)."""

    compiled: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        try:
            compiled = re.compile(text, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"invalid regular expression '{text}': {exc}") from None
        obj = cls(text)
        obj.compiled = compiled
        return obj

    @property
    def groups(self) -> set[str]:
        return set(self.compiled.groupindex)


class QName(str):
    """A DNS name to match: ``www.example.test`` (that name), ``*.example.test`` (names below it).

    Stored lower-case with a trailing dot, as the DNS listener compares them.
    """

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


class RRType(int):
    """A DNS record type by name (A, AAAA, MX ...) or number."""

    @classmethod
    def parse(cls, text: str) -> RRType:
        import dns.rdatatype

        try:
            return cls(int(dns.rdatatype.from_text(text.strip().upper())))
        except Exception:
            raise ValueError(f"unknown DNS record type '{text}' (e.g. A, AAAA, MX, TXT)") from None


class RRClass(int):
    """A DNS class by name (IN, CH) or number."""

    @classmethod
    def parse(cls, text: str) -> RRClass:
        import dns.rdataclass

        try:
            return cls(int(dns.rdataclass.from_text(text.strip().upper())))
        except Exception:
            raise ValueError(f"unknown DNS class '{text}' (e.g. IN, CH)") from None


class Record(str):
    """A DNS record in zone-file form: ``www.example.test. 300 IN A 192.0.2.1``."""

    @classmethod
    def parse(cls, text: str) -> Record:
        import dns.exception
        import dns.rrset

        try:
            _parse_record(text)
        except (dns.exception.DNSException, ValueError) as exc:
            raise ValueError(
                "expected a record such as 'www.example.test. 300 IN A 192.0.2.1',"
                f" got '{text}': {exc}"
            ) from None
        return cls(text.strip())


def _parse_record(text: str) -> Any:
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


# --- the schema ----------------------------------------------------------------

Protocol = Literal["smtp", "maildir"]


def _yaml(name: str, doc: str = "") -> dict[str, str]:
    return {"yaml": name, "doc": doc}


def _doc(doc: str) -> dict[str, str]:
    return {"doc": doc}


@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    """Fields every listener has."""

    name: str = field(default="", metadata={"yaml": None})
    protocol: str
    listen: tuple[Endpoint, ...] = field(metadata=_doc("endpoint string(s) to accept on"))
    allow: tuple[Network, ...] = field(
        default=(), metadata=_doc("client networks allowed to connect; empty means any")
    )
    kind: typing.ClassVar[Kind]


@dataclass(frozen=True, kw_only=True)
class SmtpListenerConfig(ListenerConfig):
    """An ESMTP server that turns each received mail into a message."""

    kind: typing.ClassVar[Kind] = Kind.MAIL
    protocol: Literal["smtp"] = "smtp"
    hostname: str = field(default_factory=local_hostname, metadata=_doc("name in the greeting"))
    max_size: Size = field(
        default=Size(10 * 1024 * 1024), metadata=_doc("largest message accepted")
    )
    max_recipients: int = field(default=1000, metadata=_doc("recipients per message"))
    idle_timeout: Duration = field(default=Duration(300), metadata=_doc("drop idle clients after"))


@dataclass(frozen=True, kw_only=True)
class DnsListenerConfig(ListenerConfig):
    """A DNS server over UDP and TCP (RFC 1035, RFC 7766) whose queries are routed."""

    kind: typing.ClassVar[Kind] = Kind.DNS
    protocol: Literal["dns"] = "dns"
    tcp_idle_timeout: Duration = field(
        default=Duration(10), metadata=_doc("close idle TCP connections after")
    )
    max_tcp_connections: int = field(default=1000, metadata=_doc("TCP clients at once"))


@dataclass(frozen=True, kw_only=True)
class DohListenerConfig(ListenerConfig):
    """DNS over HTTPS (RFC 8484) and the JSON form, answered through the DNS routes."""

    kind: typing.ClassVar[Kind] = Kind.DNS
    protocol: Literal["doh"] = "doh"
    path: str = field(default="/dns-query", metadata=_doc("URL path of the endpoint"))
    max_size: Size = field(default=Size(65535), metadata=_doc("largest query accepted (413)"))


@dataclass(frozen=True, kw_only=True)
class HttpListenerConfig(ListenerConfig):
    """An HTTP/1.1 server (HTTPS on an ssl: endpoint): requests are proxied or become messages."""

    kind: typing.ClassVar[Kind] = Kind.HTTP
    protocol: Literal["http"] = "http"
    max_size: Size = field(
        default=Size(10 * 1024 * 1024), metadata=_doc("largest request body accepted (413)")
    )
    max_header_size: Size = field(
        default=Size(16 * 1024), metadata=_doc("request line and header fields together (431)")
    )
    header_timeout: Duration = field(
        default=Duration(10), metadata=_doc("a client must send a whole request header within")
    )
    idle_timeout: Duration = field(
        default=Duration(60),
        metadata=_doc("close a connection with no request, or a body that stalls, after"),
    )
    max_connections: int = field(default=1000, metadata=_doc("clients connected at once"))


@dataclass(frozen=True, kw_only=True)
class BaseDestinationConfig:
    """Fields every destination has."""

    name: str = field(default="", metadata={"yaml": None})
    protocol: str
    kinds: typing.ClassVar[frozenset[Kind]]


@dataclass(frozen=True, kw_only=True)
class DnsDestinationConfig(BaseDestinationConfig):
    """Forwards DNS queries to DNS servers: UDP first, TCP when the answer is truncated."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.DNS})
    protocol: Literal["dns"] = "dns"
    servers: tuple[HostPort, ...] = field(metadata=_doc("servers tried in order: 127.0.0.1:53"))
    timeout: Duration = field(default=Duration(2), metadata=_doc("per server and query"))


@dataclass(frozen=True, kw_only=True)
class DohDestinationConfig(BaseDestinationConfig):
    """Sends DNS queries as DNS-over-HTTPS requests (RFC 8484)."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.DNS})
    protocol: Literal["doh"] = "doh"
    url: str = field(metadata=_doc("e.g. https://dns.example/dns-query"))
    method: Literal["POST", "GET"] = "POST"
    ca: ConfigPath | None = field(default=None, metadata=_doc("CA file to verify the server"))
    verify: bool = field(default=True, metadata=_doc("verify the server's certificate"))
    connections: int = field(default=4, metadata=_doc("keep-alive connections in the pool"))
    timeout: Duration = field(default=Duration(5), metadata=_doc("per query"))


@dataclass(frozen=True, kw_only=True)
class DestinationConfig(BaseDestinationConfig):
    """A store-and-forward destination: the delivery settings apply to spooled messages."""

    concurrency: int = field(default=10, metadata=_doc("deliveries in progress at once"))
    retry_min: Duration = field(
        default=Duration(60), metadata=_doc("first retry after a temporary failure")
    )
    retry_max: Duration = field(default=Duration(3600), metadata=_doc("longest wait between tries"))
    max_age: Duration = field(
        default=Duration(5 * 86400), metadata=_doc("give up (dead letter, bounce) after")
    )
    duplicate_window: Duration = field(
        default=Duration(86400),
        metadata=_doc("a Message-ID delivered here within this time is not delivered again"),
    )


@dataclass(frozen=True, kw_only=True)
class MaildirDestinationConfig(DestinationConfig):
    """Files each message into a Maildir folder (tmp/, fsync, rename into new/)."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.MAIL, Kind.ARTICLE})
    protocol: Literal["maildir"] = "maildir"
    path: ConfigPath = field(metadata=_doc("the Maildir; created if missing"))


@dataclass(frozen=True, kw_only=True)
class SmtpDestinationConfig(DestinationConfig):
    """Relays mail to an SMTP server."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.MAIL})
    protocol: Literal["smtp"] = "smtp"
    connect: ClientEndpoint = field(metadata=_doc("server to relay to, e.g. tcp:127.0.0.1:25"))
    helo: str = field(default_factory=local_hostname, metadata=_doc("name sent in EHLO"))
    max_connections: int = field(default=10, metadata=_doc("connections open at once"))
    tls: Literal["none", "may", "require"] = field(
        default="may", metadata=_doc("STARTTLS: never, when offered, or always")
    )
    tls_verify: bool = field(default=False, metadata=_doc("verify the server's certificate"))
    ca: ConfigPath | None = field(default=None, metadata=_doc("CA file for tls_verify"))
    connect_timeout: Duration = field(default=Duration(30), metadata=_doc("wait to connect"))
    timeout: Duration = field(default=Duration(300), metadata=_doc("wait for each reply"))


@dataclass(frozen=True, kw_only=True)
class NntpDestinationConfig(DestinationConfig):
    """Posts articles to a news server: POST (reader), IHAVE or CHECK/TAKETHIS (transit peer)."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.ARTICLE})
    protocol: Literal["nntp"] = "nntp"
    connect: ClientEndpoint = field(
        metadata=_doc("news server, e.g. tcp:127.0.0.1:119 or ssl:news.example:563 (NNTPS)")
    )
    mode: Literal["post", "ihave", "stream"] = field(
        default="post",
        metadata=_doc("post: MODE READER + POST; ihave: IHAVE; stream: CHECK + TAKETHIS"),
    )
    user: str | None = field(default=None, metadata=_doc("AUTHINFO USER name (RFC 4643)"))
    password: str | None = field(default=None, metadata=_doc("AUTHINFO PASS password"))
    max_connections: int = field(default=4, metadata=_doc("connections open at once"))
    connect_timeout: Duration = field(default=Duration(30), metadata=_doc("wait to connect"))
    timeout: Duration = field(default=Duration(120), metadata=_doc("wait for each reply"))
    idle_timeout: Duration = field(
        default=Duration(30), metadata=_doc("close idle connections after")
    )

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"'max_connections' must be 1 or more, not {self.max_connections}")
        if self.password is not None and self.user is None:
            raise ValueError("'password' is set but 'user' is not")


@dataclass(frozen=True, kw_only=True)
class NntpListenerConfig(ListenerConfig):
    """A news server (RFC 3977) that peers feed (IHAVE, CHECK/TAKETHIS) and newsreaders POST to.

    Each article is routed like any message and acknowledged (235, 239, 240)
    only once it is in the spool.
    """

    kind: typing.ClassVar[Kind] = Kind.ARTICLE
    protocol: Literal["nntp"] = "nntp"
    hostname: str = field(
        default_factory=local_hostname,
        metadata=_doc("name in the greeting, and the path identity put into posted articles"),
    )
    max_size: Size = field(
        default=Size(10 * 1024 * 1024), metadata=_doc("largest article accepted (441, 437, 439)")
    )
    idle_timeout: Duration = field(default=Duration(300), metadata=_doc("drop idle clients after"))
    posting: bool = field(
        default=True, metadata=_doc("accept POST from newsreaders; false answers 440")
    )
    users: Mapping[str, str] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=_doc("AUTHINFO USER/PASS credentials: user name to password"),
    )
    users_file: ConfigPath | None = field(
        default=None,
        metadata=_doc("a file of user:password lines (# comments); edits apply at the next login"),
    )
    require_auth: bool = field(
        default=False,
        metadata=_doc("answer 480 to POST, IHAVE, CHECK and TAKETHIS until AUTHINFO succeeded"),
    )
    remember: int = field(
        default=100_000,
        metadata=_doc("message-ids of accepted articles kept in memory to refuse them again"),
    )

    def __post_init__(self) -> None:
        if self.require_auth and not self.users and self.users_file is None:
            raise ValueError("require_auth needs 'users' or 'users_file' to authenticate against")
        if self.remember < 0:
            raise ValueError(f"'remember' must be 0 or more, not {self.remember}")


@dataclass(frozen=True, kw_only=True)
class NntpPollerConfig(ListenerConfig):
    """Follows newsgroups on a news server (GROUP, OVER, ARTICLE) and routes each new article.

    It opens no socket of its own: it connects out to ``connect``.  A durable
    high-water mark per server and group, kept in the spool, makes every article
    go on exactly once, across restarts too.
    """

    kind: typing.ClassVar[Kind] = Kind.ARTICLE
    protocol: Literal["nntp-poll"] = "nntp-poll"
    listen: tuple[Endpoint, ...] = field(default=(), metadata={"yaml": None})
    allow: tuple[Network, ...] = field(default=(), metadata={"yaml": None})
    connect: ClientEndpoint = field(
        metadata=_doc("news server to read from, e.g. tcp:127.0.0.1:119 or ssl:host:563")
    )
    groups: tuple[str, ...] = field(metadata=_doc("newsgroups to follow, e.g. [local.test]"))
    user: str | None = field(default=None, metadata=_doc("AUTHINFO USER name (RFC 4643)"))
    password: str | None = field(default=None, metadata=_doc("AUTHINFO PASS password"))
    interval: Duration = field(default=Duration(60), metadata=_doc("time between polls"))
    batch: int = field(default=100, metadata=_doc("articles fetched per group and poll at most"))
    start: Literal["new", "oldest"] = field(
        default="new",
        metadata=_doc("on first sight of a group: only articles arriving later, or all it holds"),
    )
    connect_timeout: Duration = field(default=Duration(30), metadata=_doc("wait to connect"))
    timeout: Duration = field(default=Duration(120), metadata=_doc("wait for each reply"))

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("'groups' needs at least one newsgroup")
        for group in self.groups:
            if not group or any(c.isspace() or c in ",*?![]" for c in group):
                raise ValueError(f"{group!r} is not a newsgroup name")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError("a group appears twice in 'groups'")
        if self.batch < 1:
            raise ValueError(f"'batch' must be 1 or more, not {self.batch}")
        if self.interval <= 0:
            raise ValueError("'interval' must be longer than 0s")
        if self.password is not None and self.user is None:
            raise ValueError("'password' is set but 'user' is not")


@dataclass(frozen=True, kw_only=True)
class WebhookDestinationConfig(DestinationConfig):
    """POSTs each mail (or article) as JSON to a web hook URL (the mail_to_http conversion)."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.MAIL, Kind.ARTICLE})
    protocol: Literal["webhook"] = "webhook"
    url: WebhookUrl = field(metadata=_doc("where to POST, e.g. https://hooks.example/mail"))
    secret: str | None = field(
        default=None, metadata=_doc("sign each body with HMAC-SHA256 using this shared secret")
    )
    signature_header: str = field(
        default="X-Hub-Signature-256", metadata=_doc("header that carries sha256=<hex>")
    )
    timeout: Duration = field(default=Duration(30), metadata=_doc("per request, connect included"))
    attachment_limit: Size = field(
        default=Size(1024 * 1024),
        metadata=_doc("attachments up to this size are included in base64; all are listed"),
    )
    headers: Mapping[str, str] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=_doc("extra request header fields, e.g. Authorization"),
    )
    ca: ConfigPath | None = field(default=None, metadata=_doc("CA file to verify the server"))
    verify: bool = field(default=True, metadata=_doc("verify an https server's certificate"))


@dataclass(frozen=True, kw_only=True)
class HttpDestinationConfig(BaseDestinationConfig):
    """A reverse proxy: each request is streamed to one of the upstream servers, the answer back."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.HTTP})
    protocol: Literal["http"] = "http"
    url: tuple[HttpUrl, ...] = field(
        metadata=_doc("upstream base URL(s), e.g. http://127.0.0.1:8080; a path is put in front")
    )
    balance: Literal["round-robin", "least-connections"] = field(
        default="round-robin", metadata=_doc("how an upstream is chosen for each request")
    )
    fail_timeout: Duration = field(
        default=Duration(10), metadata=_doc("skip an upstream that failed for this long")
    )
    connect_timeout: Duration = field(default=Duration(5), metadata=_doc("wait to connect"))
    timeout: Duration = field(
        default=Duration(60),
        metadata=_doc("wait for the response header, and between reads of the body (504)"),
    )
    host: Literal["keep", "upstream"] = field(
        default="keep", metadata=_doc("send the client's Host, or the upstream URL's")
    )
    strip_prefix: str = field(
        default="", metadata=_doc("remove this path prefix before forwarding, e.g. /api")
    )
    keepalive: int = field(
        default=64, metadata=_doc("idle keep-alive connections kept per upstream")
    )
    keepalive_timeout: Duration = field(
        default=Duration(60),
        metadata=_doc(
            "close a kept connection that has been idle this long; keep it below the"
            " upstream's own idle timeout"
        ),
    )
    ca: ConfigPath | None = field(default=None, metadata=_doc("CA file to verify https upstreams"))
    verify: bool = field(default=True, metadata=_doc("verify an https upstream's certificate"))


LISTENER_TYPES: dict[str, type[ListenerConfig]] = {
    "smtp": SmtpListenerConfig,
    "dns": DnsListenerConfig,
    "doh": DohListenerConfig,
    "http": HttpListenerConfig,
    "nntp-poll": NntpPollerConfig,
    "nntp": NntpListenerConfig,
}
DESTINATION_TYPES: dict[str, type[BaseDestinationConfig]] = {
    "maildir": MaildirDestinationConfig,
    "smtp": SmtpDestinationConfig,
    "dns": DnsDestinationConfig,
    "doh": DohDestinationConfig,
    "http": HttpDestinationConfig,
    "nntp": NntpDestinationConfig,
    "webhook": WebhookDestinationConfig,
}


@dataclass(frozen=True, kw_only=True)
class Match:
    """Conditions a message must meet for its route to apply; all are optional."""

    rcpt: Pattern | None = field(default=None, metadata=_doc("envelope recipient (regex)"))
    sender: Pattern | None = field(default=None, metadata=_doc("envelope sender (regex)"))
    header: Mapping[str, Pattern] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=_doc("header name to regex; every one must match a field of that name"),
    )
    client: tuple[Network, ...] = field(default=(), metadata=_doc("client networks"))
    qname: tuple[QName, ...] = field(
        default=(), metadata=_doc("DNS names: www.example.test, or *.example.test for names below")
    )
    qname_regex: Pattern | None = field(default=None, metadata=_doc("DNS name (regex)"))
    qname_file: ConfigPath | None = field(
        default=None,
        metadata=_doc("a file of DNS names, one a line (# comments); re-read on reload"),
    )
    qtype: tuple[RRType, ...] = field(default=(), metadata=_doc("record types: A, AAAA ..."))
    qclass: RRClass | None = field(default=None, metadata=_doc("DNS class, e.g. IN"))
    host: tuple[str, ...] = field(
        default=(),
        metadata=_doc("HTTP: Host names (port ignored), or *.example.test for names below"),
    )
    path: Pattern | None = field(
        default=None, metadata=_doc("HTTP: request path without the query (regex)")
    )
    prefix: str | None = field(default=None, metadata=_doc("HTTP: request path prefix, plain text"))
    method: tuple[str, ...] = field(default=(), metadata=_doc("HTTP: methods, e.g. [GET, HEAD]"))
    file_names: tuple[QName, ...] = field(default=(), compare=True, metadata={"yaml": None})

    def group_names(self) -> set[str]:
        names: set[str] = set()
        for pattern in (self.rcpt, self.sender, self.path, *self.header.values()):
            if pattern is not None:
                names |= pattern.groups
        return names


# The match keys that make sense for each kind of message.
MATCH_KEYS: dict[Kind, frozenset[str]] = {
    Kind.MAIL: frozenset({"rcpt", "sender", "header", "client"}),
    Kind.ARTICLE: frozenset({"header", "client"}),
    Kind.DNS: frozenset({"client", "qname", "qname_regex", "qname_file", "qtype", "qclass"}),
    Kind.HTTP: frozenset({"header", "client", "host", "path", "prefix", "method"}),
}


@dataclass(frozen=True, kw_only=True)
class Route:
    """Where messages from some listeners go, and what is done to them on the way."""

    name: str = field(default="", metadata=_doc("shown in logs; defaults to the route's number"))
    from_: tuple[str, ...] = field(metadata=_yaml("from", "listener name(s)"))
    to: tuple[str, ...] = field(default=(), metadata=_doc("destination name(s); each gets a copy"))
    answer: tuple[Record, ...] = field(
        default=(), metadata=_doc("DNS: answer with these records instead of forwarding")
    )
    action: Literal["refuse", "nxdomain"] | None = field(
        default=None, metadata=_doc("DNS: answer REFUSED or NXDOMAIN")
    )
    cache: bool = field(default=True, metadata=_doc("DNS: cache the answers of this route"))
    cache_entries: int = field(default=10000, metadata=_doc("DNS: cache size (LRU)"))
    serve_stale: Duration = field(
        default=Duration(0),
        metadata=_doc("DNS: serve expired answers this long when every upstream fails"),
    )
    match: Match = field(default_factory=Match)
    transforms: tuple[str, ...] = field(default=(), metadata=_doc("applied in order"))
    options: Mapping[str, Any] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=_doc("for the transforms; '{group}' takes a named group of a match regex"),
    )
    continue_: bool = field(
        default=False, metadata=_yaml("continue", "let later routes match too (fan-out)")
    )
    where: Mapping[str, Location] = field(
        default_factory=lambda: types.MappingProxyType({}), compare=False, metadata={"yaml": None}
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole routes.yaml."""

    version: Literal[1] = field(metadata=_doc("format version of this file"))
    spool: ConfigPath | None = field(
        default=None,
        metadata=_doc(
            "the durable queue's folder (default: var/spool next to this file;"
            " $STATE_DIRECTORY/spool when systemd sets $STATE_DIRECTORY)"
        ),
    )
    admin: Endpoint | None = field(default=None, metadata=_doc("endpoint of /healthz, /readyz"))
    plugins: tuple[ConfigPath, ...] = field(default=(), metadata=_doc("folders of plugin modules"))
    shutdown_timeout: Duration = field(
        default=Duration(30), metadata=_doc("how long SIGTERM waits for work in flight")
    )
    listeners: Mapping[str, ListenerConfig] = field(
        default_factory=lambda: types.MappingProxyType({})
    )
    destinations: Mapping[str, BaseDestinationConfig] = field(
        default_factory=lambda: types.MappingProxyType({})
    )
    routes: tuple[Route, ...] = ()
    source: str = field(default="", compare=False, metadata={"yaml": None})


# --- conversion from YAML nodes --------------------------------------------------


def yaml_name(f: dataclasses.Field[Any]) -> str | None:
    if "yaml" in f.metadata:
        name: str | None = f.metadata["yaml"]
        return name
    return f.name


class _Reader:
    def __init__(self, filename: str, base: Path) -> None:
        self.filename = filename
        self.base = base
        self.problems: list[Problem] = []
        # Names declared in the file, valid or not, so one broken entry does not
        # also make every reference to it an error.
        self.declared: dict[str, set[str]] = {"listeners": set(), "destinations": set()}
        self._loader = _Constructor()

    def loc(self, node: yaml.Node) -> Location:
        mark = node.start_mark
        return Location(self.filename, mark.line + 1, mark.column + 1)

    def fail(self, node: yaml.Node, message: str) -> None:
        self.problems.append(Problem(self.loc(node), message))

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return _Invalid
        return self._loader.construct_scalar_value(node)

    def convert(self, node: yaml.Node, hint: Any, what: str) -> Any:
        """Convert ``node`` to ``hint``; on error record a problem and return _Invalid."""
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (types.UnionType, typing.Union):
            inner = [a for a in args if a is not type(None)]
            if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
                return None
            return self.convert(node, inner[0], what)
        if origin is tuple:
            items = node.value if isinstance(node, yaml.SequenceNode) else [node]
            out = [self.convert(item, args[0], what) for item in items]
            return _Invalid if _Invalid in out else tuple(out)
        if origin in (Mapping, dict) or hint is Mapping:
            return self.mapping(node, args[1] if args else Any, what)
        if origin is Literal:
            value = self.scalar(node)
            if value not in args:
                choices = ", ".join(repr(a) for a in args)
                hint_text = suggest(str(value), [str(a) for a in args])
                self.fail(node, f"{what}: expected one of {choices}, got {value!r}{hint_text}")
                return _Invalid
            return value
        if hint is Any:
            return _freeze(self._loader.construct_plain(node))
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self.dataclass(node, hint, what)
        return self.leaf(node, hint, what)

    def leaf(self, node: yaml.Node, hint: type, what: str) -> Any:
        value = self.scalar(node)
        if value is _Invalid:
            self.fail(node, f"{what}: expected a single value, got a {_node_kind(node)}")
            return _Invalid
        try:
            if hint is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"expected true or false, got {value!r}")
                return value
            if hint is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"expected a whole number, got {value!r}")
                return value
            if hint is str:
                if value is None or isinstance(value, (list, dict)):
                    raise ValueError("expected text")
                return str(value)
            if hint is ConfigPath:
                if value is None or not str(value).strip():
                    raise ValueError("expected a file or folder name")
                return ConfigPath(str((self.base / str(value)).resolve()))
            if hint in (
                Size, Duration, Endpoint, ClientEndpoint, Network, Pattern,
                QName, RRType, RRClass, Record, HostPort, HttpUrl, WebhookUrl,
            ):  # fmt: skip
                if value is None:
                    raise ValueError("expected a value, got nothing")
                if (
                    hint in (Size, Duration)
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    return hint(value)
                return hint.parse(str(value))
        except ValueError as exc:
            self.fail(node, f"{what}: {exc}")
            return _Invalid
        raise TypeError(f"no converter for {hint!r}")  # a programming error, not a user's

    def mapping(self, node: yaml.Node, value_hint: Any, what: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
                return types.MappingProxyType({})
            self.fail(
                node, f"{what}: expected a mapping of names to values, got a {_node_kind(node)}"
            )
            return _Invalid
        out: dict[str, Any] = {}
        ok = True
        for key_node, value_node in node.value:
            key = self.scalar(key_node)
            if not isinstance(key, str):
                self.fail(key_node, f"{what}: names must be text, got {key!r}")
                ok = False
                continue
            if key in out:
                self.fail(key_node, f"{what}: '{key}' appears twice")
                ok = False
                continue
            value = self.convert(value_node, value_hint, f"{what} '{key}'")
            ok = ok and value is not _Invalid
            out[key] = value
        return types.MappingProxyType(out) if ok else _Invalid

    def fields_of(
        self, node: yaml.MappingNode, what: str
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        seen: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node)
            if not isinstance(key, str):
                self.fail(key_node, f"{what}: keys must be text, got {key!r}")
                continue
            if key in seen:
                self.fail(key_node, f"{what}: '{key}' appears twice")
                continue
            seen[key] = (key_node, value_node)
        return seen

    def dataclass(
        self, node: yaml.Node, cls: type, what: str, extra: dict[str, Any] | None = None
    ) -> Any:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what}: expected a mapping, got a {_node_kind(node)}")
            return _Invalid
        given = self.fields_of(node, what)
        hints = _hints(cls)
        known = {yaml_name(f): f for f in dataclasses.fields(cls) if yaml_name(f) is not None}
        values: dict[str, Any] = dict(extra or {})
        where: dict[str, Location] = {"": self.loc(node)}
        ok = True
        for key, (key_node, value_node) in given.items():
            f = known.get(key)
            if f is None:
                hint = suggest(key, [str(k) for k in known])
                self.fail(key_node, f"{what}: unknown key '{key}'{hint}")
                ok = False
                continue
            value = self.convert(value_node, hints[f.name], f"{what}: '{key}'")
            where[f.name] = self.loc(value_node)
            if value is _Invalid:
                ok = False
            else:
                values[f.name] = value
        for name, f in known.items():
            missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if missing and f.name not in values and name not in given:
                self.fail(node, f"{what}: '{name}' is required")
                ok = False
        if not ok:
            return _Invalid
        if "where" in {f.name for f in dataclasses.fields(cls)}:
            values["where"] = types.MappingProxyType(where)
        try:
            return cls(**values)
        except ValueError as exc:  # a __post_init__ check across fields
            self.fail(node, f"{what}: {exc}")
            return _Invalid


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Constructor:
    """PyYAML's safe constructor, made once and reused for every value of a file."""

    def __init__(self) -> None:
        self._loader = yaml.SafeLoader("")

    def construct_scalar_value(self, node: yaml.ScalarNode) -> Any:
        return self._loader.construct_object(node, deep=True)

    def construct_plain(self, node: yaml.Node) -> Any:
        value = self._loader.construct_object(node, deep=True)
        self._loader.constructed_objects.clear()
        return value


class _InvalidType:
    def __repr__(self) -> str:
        return "<invalid>"


_Invalid: Any = _InvalidType()


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "single value"


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _by_protocol(
    reader: _Reader, node: yaml.Node, types_: dict[str, type[Any]], what: str
) -> Mapping[str, Any]:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return types.MappingProxyType({})
    if not isinstance(node, yaml.MappingNode):
        reader.fail(
            node, f"{what}: expected a mapping of names to {what}, got a {_node_kind(node)}"
        )
        return types.MappingProxyType({})
    out: dict[str, Any] = {}
    for name, (_, value_node) in reader.fields_of(node, what).items():
        reader.declared[what].add(name)
        label = f"{what[:-1]} '{name}'"
        if not isinstance(value_node, yaml.MappingNode):
            reader.fail(value_node, f"{label}: expected a mapping, got a {_node_kind(value_node)}")
            continue
        fields = reader.fields_of(value_node, label)
        if "protocol" not in fields:
            reader.fail(value_node, f"{label}: 'protocol' is required ({', '.join(types_)})")
            continue
        proto_node = fields["protocol"][1]
        proto = reader.scalar(proto_node)
        cls = types_.get(str(proto))
        if cls is None:
            reader.fail(
                proto_node,
                f"{label}: unknown protocol {proto!r} (known: {', '.join(sorted(types_))})"
                + suggest(str(proto), types_),
            )
            continue
        value = reader.dataclass(value_node, cls, label, extra={"name": name})
        if value is not _Invalid:
            out[name] = value
    return types.MappingProxyType(out)


def _routes(reader: _Reader, node: yaml.Node) -> tuple[Route, ...] | Any:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return ()
    if not isinstance(node, yaml.SequenceNode):
        reader.fail(node, f"routes: expected a list of routes, got a {_node_kind(node)}")
        return _Invalid
    out = []
    for index, item in enumerate(node.value, start=1):
        label = f"route {index}"
        if isinstance(item, yaml.MappingNode):
            for key_node, value_node in item.value:
                if reader.scalar(key_node) == "name" and isinstance(value_node, yaml.ScalarNode):
                    label = f"route '{value_node.value}'"
        out.append(reader.dataclass(item, Route, label))
    return _Invalid if _Invalid in out else tuple(out)


def parse(text: str, filename: str = "routes.yaml", base: Path | None = None) -> Config:
    """Parse and check a configuration text; raise ConfigError listing every problem found."""
    reader = _Reader(filename, base if base is not None else Path(filename).resolve().parent)
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(filename, mark.line + 1, mark.column + 1) if mark else None
        raise ConfigError([Problem(where, f"not valid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(None, f"{filename}: not valid YAML: {exc}")]) from None
    if root is None:
        raise ConfigError(
            [Problem(Location(filename, 1, 1), "the file is empty; expected 'version: 1'")]
        )
    if not isinstance(root, yaml.MappingNode):
        reader.fail(root, "expected a mapping with version, listeners, destinations and routes")
        raise ConfigError(reader.problems)

    given = reader.fields_of(root, "top level")
    special: dict[str, dict[str, Any]] = {
        "listeners": LISTENER_TYPES,
        "destinations": DESTINATION_TYPES,
        "routes": {},
    }
    parsed: dict[str, Any] = {}
    for key, types_ in special.items():
        if key in given and key == "routes":
            routes = _routes(reader, given[key][1])
            if routes is not _Invalid:
                parsed[key] = routes
        elif key in given:
            parsed[key] = _by_protocol(reader, given[key][1], types_, key)
    rest = yaml.MappingNode(
        root.tag,
        [(k, v) for k, v in root.value if reader.scalar(k) not in special],
        root.start_mark,
        root.end_mark,
    )
    config = reader.dataclass(rest, Config, "top level", extra={**parsed, "source": filename})
    if config is _Invalid:
        raise ConfigError(reader.problems)
    config = dataclasses.replace(config, routes=_check_references(reader, config))
    if config.spool is None:
        config = dataclasses.replace(config, spool=ConfigPath(str(default_spool(reader.base))))
    if reader.problems:
        raise ConfigError(reader.problems)
    return typing.cast(Config, config)


def default_spool(base: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Where the spool goes when the file names none.

    Under systemd with ``StateDirectory=`` ($STATE_DIRECTORY, several paths
    separated by colons), ``spool`` in the first of them; otherwise ``var/spool``
    next to the file.
    """
    env = os.environ if environ is None else environ
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "spool"
    return base / "var" / "spool"


def load(path: str | Path) -> Config:
    """Read and parse a configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(None, f"cannot read {p}: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(None, f"{p} is not UTF-8 text: {exc}")]) from None
    return parse(text, str(path), p.resolve().parent)


def _check_references(reader: _Reader, config: Config) -> tuple[Route, ...]:
    """Cross-checks that need the whole file: names, match keys, options' placeholders.

    Returns the routes with a name given to those that have none.
    """
    routes = []
    for index, route in enumerate(config.routes, start=1):
        here = route.where[""]
        label = f"route '{route.name}'" if route.name else f"route {index}"
        if not route.name:
            route = dataclasses.replace(route, name=f"#{index}")
        routes.append(route)
        kinds = set()
        for name in route.from_:
            listener = config.listeners.get(name)
            if listener is None and name in reader.declared["listeners"]:
                continue  # the listener itself is broken; that is reported already
            if listener is None:
                reader.problems.append(
                    Problem(
                        route.where.get("from_", here),
                        f"{label}: unknown listener '{name}'"
                        + suggest(name, reader.declared["listeners"]),
                    )
                )
            else:
                kinds.add(listener.kind)
        if Kind.DNS in kinds:
            route = _check_dns_route(reader, route, label, kinds)
            routes[-1] = route
        else:
            for key in ("answer", "action"):
                if kinds and getattr(route, key):
                    reader.problems.append(
                        Problem(
                            route.where.get(key, here),
                            f"{label}: '{key}' applies only to routes from DNS listeners",
                        )
                    )
            if not (route.to or route.answer or route.action):
                reader.problems.append(
                    Problem(route.where.get("to", here), f"{label}: 'to' names no destination")
                )
        if not route.from_:
            reader.problems.append(
                Problem(route.where.get("from_", here), f"{label}: 'from' names no listener")
            )
        for name in route.to:
            if name not in reader.declared["destinations"]:
                reader.problems.append(
                    Problem(
                        route.where.get("to", here),
                        f"{label}: unknown destination '{name}'"
                        + suggest(name, reader.declared["destinations"]),
                    )
                )
        proxies = [
            n for n in route.to if isinstance(config.destinations.get(n), HttpDestinationConfig)
        ]
        if proxies and (len(route.to) > 1 or route.transforms or route.continue_):
            reader.problems.append(
                Problem(
                    route.where.get("to", here),
                    f"{label}: destination '{proxies[0]}' is a reverse proxy; a route to it"
                    " takes no transforms, no other destination and no 'continue'",
                )
            )
        used = {
            f.name
            for f in dataclasses.fields(Match)
            if yaml_name(f) is not None and getattr(route.match, f.name) not in _UNSET
        }
        for kind in kinds:
            wrong = sorted(used - MATCH_KEYS[kind])
            if wrong:
                reader.problems.append(
                    Problem(
                        route.where.get("match", here),
                        f"{label}: match key(s) {', '.join(wrong)} do not apply to {kind} messages"
                        f" (use {', '.join(sorted(MATCH_KEYS[kind]))})",
                    )
                )
        groups = route.match.group_names()
        for placeholder in sorted(_placeholders(route.options)):
            if placeholder not in groups:
                known = ", ".join(sorted(groups)) or "none"
                reader.problems.append(
                    Problem(
                        route.where.get("options", here),
                        f"{label}: option placeholder '{{{placeholder}}}' is not a named group of"
                        f" the route's match patterns (named groups: {known})"
                        + suggest(placeholder, groups)
                        + (
                            f"; a field of a web hook's payload is written {{{{{placeholder}}}}}"
                            if "http_to_mail" in route.transforms
                            else ""
                        ),
                    )
                )
    names = [r.name for r in routes]
    for route in routes:
        if names.count(route.name) > 1 and not route.name.startswith("#"):
            reader.problems.append(
                Problem(route.where[""], f"route name '{route.name}' is used twice")
            )
            names = [n for n in names if n != route.name]
    return tuple(routes)


_UNSET: tuple[Any, ...] = (None, (), types.MappingProxyType({}))


def _check_dns_route(reader: _Reader, route: Route, label: str, kinds: set[Kind]) -> Route:
    """DNS routes: one action, no transforms, and the names of a qname_file loaded."""
    here = route.where[""]
    if len(kinds) > 1:
        reader.problems.append(
            Problem(
                route.where.get("from_", here),
                f"{label}: a route takes either DNS listeners or others, not both",
            )
        )
    chosen = [k for k in ("to", "answer", "action") if getattr(route, k)]
    if len(chosen) != 1:
        reader.problems.append(
            Problem(
                here,
                f"{label}: a DNS route needs exactly one of 'to' (forward), 'answer' (local"
                f" records) or 'action' (refuse, nxdomain); it has {', '.join(chosen) or 'none'}",
            )
        )
    if route.transforms:
        reader.problems.append(
            Problem(
                route.where.get("transforms", here),
                f"{label}: transforms do not apply to DNS routes",
            )
        )
    if route.match.qname_file is None:
        return route
    names, problems = read_name_file(route.match.qname_file)
    reader.problems.extend(problems)
    return dataclasses.replace(route, match=dataclasses.replace(route.match, file_names=names))


def read_name_file(path: str) -> tuple[tuple[QName, ...], list[Problem]]:
    """DNS names from a block-list style file: one a line, ``#`` starts a comment.

    A hosts-file line (``0.0.0.0 ads.example``) is taken by its last field.
    """
    problems: list[Problem] = []
    names: list[QName] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return (), [Problem(None, f"cannot read the name file {path}: {exc}")]
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            names.append(QName.parse(text.split()[-1]))
        except ValueError as exc:
            problems.append(Problem(Location(path, number, 1), str(exc)))
    return tuple(names), problems


def _placeholders(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, str):
        try:
            for _, name, _, _ in string.Formatter().parse(value):
                if name:
                    found.add(name.split(".")[0].split("[")[0])
        except ValueError:
            pass
    elif isinstance(value, Mapping):
        for v in value.values():
            found |= _placeholders(v)
    elif isinstance(value, tuple):
        for v in value:
            found |= _placeholders(v)
    return found


def interpolate(value: Any, groups: Mapping[str, str]) -> Any:
    """Fill '{name}' placeholders in option values from a match's named groups."""
    if isinstance(value, str):
        try:
            return value.format_map(_Defaulting(groups))
        except (ValueError, IndexError, AttributeError):
            return value
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: interpolate(v, groups) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return tuple(interpolate(v, groups) for v in value)
    return value


class _Defaulting(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


# --- JSON Schema ----------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of routes.yaml, for editors."""

    def one(hint: Any) -> dict[str, Any]:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (types.UnionType, typing.Union):
            inner = [one(a) for a in args if a is not type(None)]
            return {"anyOf": [*inner, {"type": "null"}]}
        if origin is tuple:
            item = one(args[0])
            return {"anyOf": [item, {"type": "array", "items": item}]}
        if origin in (Mapping, dict):
            return {"type": "object", "additionalProperties": one(args[1])}
        if origin is Literal:
            return {"enum": list(args)}
        if hint is Any:
            return {}
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return obj(hint)
        simple: dict[Any, dict[str, Any]] = {
            bool: {"type": "boolean"},
            int: {"type": "integer"},
            str: {"type": "string"},
            ConfigPath: {"type": "string", "description": "path, relative to this file"},
            Size: {
                "type": ["integer", "string"],
                "pattern": r"^\d+(\.\d+)?\s*([kKmMgG]i?[bB]?|[bB])?$",
            },
            Duration: {
                "type": ["number", "string"],
                "pattern": r"^(\d+(\.\d+)?\s*(ms|s|m|h|d|w)?\s*)+$",
            },
            Endpoint: {"type": "string", "pattern": "^(" + "|".join(_SERVER_ENDPOINTS) + "):"},
            ClientEndpoint: {
                "type": "string",
                "pattern": "^(" + "|".join(_CLIENT_ENDPOINTS) + "):",
            },
            Network: {"type": "string", "description": "IP network, e.g. 127.0.0.0/8"},
            Pattern: {"type": "string", "format": "regex"},
            QName: {"type": "string", "description": "DNS name, or *.suffix"},
            RRType: {"type": ["string", "integer"], "description": "record type, e.g. A"},
            RRClass: {"type": ["string", "integer"], "description": "DNS class, e.g. IN"},
            Record: {"type": "string", "description": "zone-file record line"},
            HostPort: {"type": "string", "description": "HOST:PORT"},
            HttpUrl: {"type": "string", "format": "uri"},
            WebhookUrl: {"type": "string", "format": "uri"},
        }
        return dict(simple[hint])

    def obj(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        props: dict[str, Any] = {}
        required = []
        for f in dataclasses.fields(cls):
            name = yaml_name(f)
            if name is None or name in skip:
                continue
            schema = one(hints[f.name])
            if f.metadata.get("doc"):
                schema["description"] = f.metadata["doc"]
            props[name] = schema
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(name)
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if cls.__doc__:
            out["description"] = cls.__doc__.strip().splitlines()[0]
        if required:
            out["required"] = required
        return out

    schema = obj(Config)
    schema["properties"]["listeners"] = {
        "type": "object",
        "additionalProperties": {"oneOf": [obj(c) for c in LISTENER_TYPES.values()]},
    }
    schema["properties"]["destinations"] = {
        "type": "object",
        "additionalProperties": {"oneOf": [obj(c) for c in DESTINATION_TYPES.values()]},
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gateway routes.yaml"
    return schema
