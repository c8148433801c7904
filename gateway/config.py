"""routes.yaml, parsed once into frozen, typed values.

The file is read with PyYAML's node API so that every value keeps its line and
column; the dataclasses below are both the parser's schema and the source of
``gateway schema``.  Nothing after start-up sees raw YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import functools
import ipaddress
import os
import re
import socket
import string
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.message import Kind
from gateway.protocols import AddedKey, registry

if typing.TYPE_CHECKING:
    from gateway.ports import DestinationEntry, ListenerEntry
    from gateway.tls import TlsConfig

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


class Value:
    """A value type written in its own syntax: ``parse`` reads it, ``schema`` describes it.

    Protocols declare their own (DNS names, URLs) the same way; the reader and
    ``gateway schema`` take any subclass.
    """

    __slots__ = ()
    schema: typing.ClassVar[dict[str, Any]] = {"type": "string"}

    @classmethod
    def parse(cls, text: str) -> Any:
        raise NotImplementedError


class Size(int, Value):
    """A size in bytes written with a unit: 512, 10k, 10KiB, 10MB, 1GiB."""

    schema: typing.ClassVar[dict[str, Any]] = {
        "type": ["integer", "string"],
        "pattern": r"^\d+(\.\d+)?\s*([kKmMgG]i?[bB]?|[bB])?$",
    }

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


class SizeRange(Value):
    """Sizes a match takes: ``<10MiB``, ``<=1k``, ``>1GB``, ``>=512``, or ``1k-10MiB`` (both
    ends taken)."""

    __slots__ = ("high", "low", "text")
    schema: typing.ClassVar[dict[str, Any]] = {
        "type": "string",
        "pattern": r"^\s*(<=?|>=?)?\s*\d[^-]*(-\s*\d.*)?$",
    }

    def __init__(self, text: str, low: int, high: int | None) -> None:
        self.text = text
        self.low = low  # the smallest size taken
        self.high = high  # the largest, None: no limit

    @classmethod
    def parse(cls, text: str) -> SizeRange:
        rest = str(text).strip()
        try:
            for sign in ("<=", ">=", "<", ">"):
                if rest.startswith(sign):
                    size = Size.parse(rest[len(sign) :])
                    low, high = {
                        "<=": (0, int(size)),
                        "<": (0, int(size) - 1),
                        ">=": (int(size), None),
                        ">": (int(size) + 1, None),
                    }[sign]
                    return cls(rest, low, high)
            first, dash, last = rest.partition("-")
            if dash:
                low, high = int(Size.parse(first)), int(Size.parse(last))
                if low > high:
                    raise ValueError(f"the range '{text}' is empty (write the smaller size first)")
                return cls(rest, low, high)
        except ValueError as exc:
            if "empty" in str(exc):
                raise
        raise ValueError(f"expected sizes such as '<10MiB', '>=1k' or '1k-10MiB', got '{text}'")

    def __contains__(self, size: object) -> bool:
        return (
            isinstance(size, int) and self.low <= size and (self.high is None or size <= self.high)
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SizeRange) and (self.low, self.high) == (other.low, other.high)

    def __hash__(self) -> int:
        return hash((self.low, self.high))

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"SizeRange({self.text!r})"


class Duration(float, Value):
    """A duration in seconds with a unit: 250ms, 2s, 5m, 1h, 5d; a bare number is seconds."""

    schema: typing.ClassVar[dict[str, Any]] = {
        "type": ["number", "string"],
        "pattern": r"^(\d+(\.\d+)?\s*(ms|s|m|h|d|w)?\s*)+$",
    }

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


class Rate(Value):
    """Events per unit of time: ``60/m``, ``10/s``, ``1000/h``."""

    __slots__ = ("count", "per")
    schema: typing.ClassVar[dict[str, Any]] = {
        "type": "string",
        "pattern": r"^\d+\s*/\s*(s|m|h)$",
        "description": "events per second, minute or hour, e.g. 60/m",
    }
    _UNITS: typing.ClassVar[dict[str, float]] = {"s": 1.0, "m": 60.0, "h": 3600.0}

    def __init__(self, count: int, per: float) -> None:
        self.count = count
        self.per = per

    @classmethod
    def parse(cls, text: str) -> Rate:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(s|m|h)\s*", text)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"expected a rate such as 60/m, 10/s or 1000/h, got '{text}'")
        return cls(int(m.group(1)), cls._UNITS[m.group(2)])

    @property
    def per_second(self) -> float:
        return self.count / self.per

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rate) and (self.count, self.per) == (other.count, other.per)

    def __hash__(self) -> int:
        return hash((self.count, self.per))

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.per]
        return f"{self.count}/{unit}"

    def __repr__(self) -> str:
        return f"Rate({self})"


_SERVER_ENDPOINTS = ("tcp", "tcp6", "ssl", "unix", "systemd", "udp", "tls")
_CLIENT_ENDPOINTS = ("tcp", "tcp6", "ssl", "unix", "tls", "udp")


class Endpoint(str, Value):
    """A Twisted server endpoint string, plus ``udp:PORT[:interface=ADDR]`` for UDP.

    Sockets passed by systemd (socket activation): ``systemd:domain=INET6:index=N``
    or ``systemd:domain=INET6:name=NAME`` (Twisted's) for TCP, and
    ``udp:systemd:index=N`` or ``udp:systemd:name=NAME`` (ours) for UDP.
    """

    kinds: typing.ClassVar[tuple[str, ...]] = _SERVER_ENDPOINTS
    schema: typing.ClassVar[dict[str, Any]] = {
        "type": "string",
        "pattern": "^(" + "|".join(_SERVER_ENDPOINTS) + "):",
    }
    binds: typing.ClassVar[bool] = True  # a socket of this machine: its interface is checked

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
            _, interface = udp_endpoint_args(text)
            if cls.binds:
                _check_interface(text, interface, socket.SOCK_DGRAM)
        elif kind == "systemd":
            systemd_endpoint_args(text)
        else:
            cls._check_with_twisted(text)
        return cls(text)

    @staticmethod
    def _check_with_twisted(text: str) -> None:
        from twisted.internet import endpoints
        from twisted.internet.testing import MemoryReactor

        under = text
        if text.lower().startswith("tls:"):
            from gateway.tls import tls_endpoint

            under = tls_endpoint(text)  # TLS with the tls: block on a plain endpoint
            if under.lower().startswith("systemd:"):
                systemd_endpoint_args(under)
                return
        try:
            endpoint = endpoints.serverFromString(MemoryReactor(), under)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ValueError(_endpoint_problem(text, exc, _SERVER_OPTIONS)) from None
        _check_port(text, endpoint)
        _check_interface(text, str(getattr(endpoint, "_interface", "") or ""), socket.SOCK_STREAM)

    @property
    def is_udp(self) -> bool:
        return self.lower().startswith("udp:")


class ClientEndpoint(Endpoint):
    """A Twisted client endpoint string such as ``tcp:127.0.0.1:25``."""

    kinds = _CLIENT_ENDPOINTS
    schema: typing.ClassVar[dict[str, Any]] = {
        "type": "string",
        "pattern": "^(" + "|".join(_CLIENT_ENDPOINTS) + "):",
    }
    binds = False

    @staticmethod
    def _check_with_twisted(text: str) -> None:
        from twisted.internet import endpoints
        from twisted.internet.testing import MemoryReactor

        try:
            endpoint = endpoints.clientFromString(MemoryReactor(), text)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ValueError(_endpoint_problem(text, exc, _CLIENT_OPTIONS)) from None
        _check_port(text, endpoint, lowest=1)
        if getattr(endpoint, "_host", None) == "":
            raise ValueError(
                _ipv6_problem(text)
                or f"endpoint '{text}': the host is missing (tcp:HOST:PORT, e.g. tcp:127.0.0.1:25)"
            )


# The options of Twisted's endpoint strings the gateway's users write, for suggestions.
_SERVER_OPTIONS = ("port", "interface", "backlog", "privateKey", "certKey", "extraCertChain",
                   "dhParameters", "sslmethod", "mode", "lockfile")  # fmt: skip
_CLIENT_OPTIONS = ("host", "port", "timeout", "bindAddress", "path", "checkPID")


def _check_interface(text: str, interface: str, kind: int) -> None:
    """An endpoint's interface must be an address of this machine: bind a probe to it."""
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return  # none, or a name: resolved when the socket opens
    if address.is_unspecified:
        return
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, kind) as probe:
            probe.bind((str(address), 0))
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
            raise ValueError(
                f"endpoint '{text}': {address} is not an address of this machine"
                " ('ip address' lists them); listen on one of those, or on every address"
                " by leaving interface= out"
            ) from None


_IPV6_OPTION = re.compile(r"(interface|host|bindAddress)=((?:[0-9A-Fa-f]{0,4}:){2,}[0-9A-Fa-f.]*)")


def _ipv6_problem(text: str) -> str | None:
    """The classic mistake of an IPv6 address with bare colons inside an endpoint."""
    unescaped = _IPV6_OPTION.search(text)
    if not unescaped:
        return None
    name, address = unescaped.groups()
    if address.endswith(":") and not address.endswith("::"):
        address = address[:-1]  # the colon before the next option
    fixed = text.replace(f"{name}={address}", f"{name}=" + address.replace(":", "\\:"), 1)
    return (
        f"endpoint '{text}': the colons of an IPv6 address in an endpoint are escaped"
        f" with a backslash: write '{fixed}' (in single quotes in YAML)"
    )


def _endpoint_problem(text: str, exc: Exception, options: tuple[str, ...]) -> str:
    """Twisted's complaint about an endpoint string, in the gateway's words."""
    message = str(exc)
    unescaped = _ipv6_problem(text)
    if unescaped:
        return unescaped
    unknown = re.search(r"unexpected keyword argument '(\w+)'", message)
    if unknown:
        name = unknown.group(1)
        return f"endpoint '{text}': unknown option '{name}'{suggest(name, list(options))}"
    if "missing" in message and "required positional argument" in message:
        needed = re.findall(r"'(\w+)'", message)
        return f"endpoint '{text}': the {' and the '.join(needed) or 'address'} is missing"
    if isinstance(exc, ValueError) and "invalid literal for int()" in message:
        return f"endpoint '{text}': the port must be a number"
    return f"invalid endpoint '{text}': {message}"


def _check_port(text: str, endpoint: object, lowest: int = 0) -> None:
    """A listener may take port 0 (any free one); a server to connect to has a real port."""
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not lowest <= port <= 65535:
        raise ValueError(f"endpoint '{text}': port {port} is not a port number ({lowest} to 65535)")


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


class Network(Value):
    """An IP network such as 127.0.0.0/8 or ::1 (a bare address is a /32 or /128)."""

    __slots__ = ("net",)
    schema: typing.ClassVar[dict[str, Any]] = {
        "type": "string",
        "description": "IP network, e.g. 127.0.0.0/8",
    }

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


class HostPort(str, Value):
    """``HOST:PORT`` or ``[IPv6]:PORT`` (port 53 when left out)."""

    schema: typing.ClassVar[dict[str, Any]] = {"type": "string", "description": "HOST:PORT"}

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


class FolderUrl(str, Value):
    """A folder on a file server: ``scheme://user@host[:port]/folder/`` (SFTP, FTP), with
    no password in it; ``port`` is None when the URL names none."""

    schema: typing.ClassVar[dict[str, Any]] = {"type": "string", "format": "uri"}
    scheme: str
    user: str
    host: str
    port: int | None
    folder: str  # as the server names it, without the final "/" ("" for the login folder)

    @classmethod
    def parse(cls, text: str) -> FolderUrl:
        from urllib.parse import unquote, urlsplit

        value = str(text).strip()
        example = "sftp://backup@host:22/incoming/ or ftp://archive@host/scans/"
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid URL '{text}': {exc}") from None
        if not parts.scheme or not parts.hostname or not parts.username:
            raise ValueError(f"expected a URL such as {example}, got '{text}'")
        if parts.password is not None:
            raise ValueError(
                f"the URL '{parts.scheme}://{parts.username}@{parts.hostname}...' holds a"
                " password: give it in its own setting (a file), not in the URL"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"a file server's URL has no query or fragment, got '{text}'")
        obj = cls(value)
        obj.scheme = parts.scheme.lower()
        obj.user = unquote(parts.username)
        obj.host = parts.hostname
        obj.port = port
        obj.folder = unquote(parts.path).rstrip("/")
        return obj


class ConfigPath(str):
    """A file or folder; relative paths are taken from the configuration file's folder."""

    schema: typing.ClassVar[dict[str, Any]] = {
        "type": "string",
        "description": "path, relative to this file",
    }


class Pattern(str, Value):
    """A regular expression, searched case-insensitively (as Postfix's regexp tables do)."""

    compiled: re.Pattern[str]
    schema: typing.ClassVar[dict[str, Any]] = {"type": "string", "format": "regex"}

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


# --- the schema ----------------------------------------------------------------
#
# The bases below are what every listener and destination has; each protocol
# package declares its own subclasses (``gateway/protocols/<name>/config.py``)
# and the registry (``gateway.protocols``) says which ``protocol:`` names them.


def yaml_key(name: str, doc: str = "") -> dict[str, str]:
    """Field metadata: the key's name in the file (when not the field's) and its help."""
    return {"yaml": name, "doc": doc}


def doc(text: str, *, positive: bool = False, secret: bool = False) -> dict[str, Any]:
    """Field metadata: the key's help, shown by ``gateway schema``; ``positive``: a number
    (count, size, duration) that must be more than 0 (0 would mean nothing there);
    ``secret``: a password or key, which may also come from ``KEY_file:`` (a file holding
    it) or from ``${ENV_VAR}``, so that routes.yaml can be committed."""
    out: dict[str, Any] = {"doc": text}
    if positive:
        out["positive"] = True
    if secret:
        out["secret"] = True
    return out


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def secret_value(text: str, environ: Mapping[str, str] | None = None) -> str:
    """A secret with each ``${NAME}`` replaced by that environment variable (ValueError
    naming a variable that is not set)."""
    env = os.environ if environ is None else environ

    def value(found: re.Match[str]) -> str:
        name = found.group(1)
        if name not in env:
            raise ValueError(f"the environment variable {name} is not set")
        return env[name]

    return _ENV_REFERENCE.sub(value, text)


def read_secret_file(path: Path) -> str:
    """A secret kept in a file of its own: its text without the final line break."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {(exc.strerror or str(exc)).lower()}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r")


HIDDEN: dict[str, None] = {"yaml": None}  # field metadata: not a key of the file


@dataclass(frozen=True, kw_only=True)
class ClientLimits:
    """Limits per client, as Postfix's anvil and nginx's limit_conn and limit_req keep them.

    A client is an IPv4 address, or the /64 an IPv6 address is in (one host
    usually has a whole /64).  A rate lets a burst of its own size through,
    then its average.  Protocols add the rates of what their clients do
    (messages, recipients, articles, requests) in a subclass.
    """

    connections: int = field(
        default=0, metadata=doc("connections open at once per client (0: no limit)")
    )
    connection_rate: Rate | None = field(
        default=None, metadata=doc("new connections per client, e.g. 60/m (none: no limit)")
    )

    def __post_init__(self) -> None:
        if self.connections < 0:
            raise ValueError(f"'connections' must be 0 (no limit) or more, not {self.connections}")

    def rates(self) -> dict[str, Rate]:
        """The rates set, by key (connection_rate, message_rate ...)."""
        return {
            f.name: value
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Rate)
        }


@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    """Fields every listener has; ``kind`` is the kind of message it produces."""

    name: str = field(default="", metadata=HIDDEN)
    protocol: str
    listen: tuple[Endpoint, ...] = field(metadata=doc("endpoint string(s) to accept on"))
    allow: tuple[Network, ...] = field(
        default=(), metadata=doc("client networks allowed to connect; empty means any")
    )
    kind: typing.ClassVar[Kind]

    def connection_limit(self) -> int:
        """Connections open at once before new ones are refused (the listener's own key)."""
        return 1000

    def client_limits(self) -> ClientLimits:
        """The limits per client (the listener's ``limits:`` key); none by default."""
        return _NO_LIMITS

    def tls_config(self) -> TlsConfig | None:
        """The listener's ``tls:`` block, for protocols that have one."""
        return None

    def check(self, config: Config) -> list[tuple[str, str]]:
        """Checks that need the whole file: (key, problem) pairs (subclasses add theirs)."""
        if self.tls_config() is not None:
            return []
        return [
            (
                "listen",
                f"'{endpoint}' speaks TLS with the listener's tls: block, and it has none"
                + (" (this protocol has no tls: block)" if "tls" not in _field_names(self) else ""),
            )
            for endpoint in self.listen
            if endpoint.lower().startswith("tls:")
        ]


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


_NO_LIMITS = ClientLimits()


@dataclass(frozen=True, kw_only=True)
class BaseDestinationConfig:
    """Fields every destination has."""

    name: str = field(default="", metadata=HIDDEN)
    protocol: str
    kinds: typing.ClassVar[frozenset[Kind]]  # the kinds of message it takes

    def takes_uploads(self) -> bool:
        """Whether uploaded files (file messages) may be delivered to it."""
        return False


@dataclass(frozen=True, kw_only=True)
class DestinationConfig(BaseDestinationConfig):
    """A store-and-forward destination: the delivery settings apply to spooled messages."""

    concurrency: int = field(
        default=10, metadata=doc("deliveries in progress at once", positive=True)
    )
    retry_min: Duration = field(
        default=Duration(60), metadata=doc("first retry after a temporary failure", positive=True)
    )
    retry_max: Duration = field(
        default=Duration(3600), metadata=doc("longest wait between tries", positive=True)
    )
    max_age: Duration = field(
        default=Duration(5 * 86400),
        metadata=doc("give up (dead letter, bounce) after", positive=True),
    )
    duplicate_window: Duration = field(
        default=Duration(86400),
        metadata=doc("a Message-ID delivered here within this time is not delivered again"),
    )

    def __post_init__(self) -> None:
        if self.retry_min > self.retry_max:
            raise ValueError(
                f"'retry_min' ({self.retry_min:g}s) is longer than 'retry_max'"
                f" ({self.retry_max:g}s): the first wait would exceed the longest"
            )


_V = typing.TypeVar("_V")


class _Keys:
    """Keys a protocol adds to ``match:`` or to a route, parsed, with a typed view per protocol."""

    values: Mapping[str, Any]

    def view(self, cls: type[_V]) -> _V:
        """The keys as ``cls`` (a protocol's frozen dataclass of them), made once per class."""
        try:
            return typing.cast(_V, self.__dict__["_views"][cls])
        except KeyError:
            pass
        views: dict[type, Any] = self.__dict__.setdefault("_views", {})
        names = {f.name for f in dataclasses.fields(typing.cast(Any, cls))}
        found = views[cls] = cls(**{k: v for k, v in self.values.items() if k in names})
        return found


@dataclass(frozen=True, kw_only=True)
class Match(_Keys):
    """Conditions a message must meet for its route to apply; all are optional.

    ``client`` applies to every listener; the other keys are declared by the
    protocols (``rcpt``, ``sender``, ``header`` for mail, ``qname`` for DNS ...)
    and kept in ``values``; ``view(cls)`` gives them typed.
    """

    client: tuple[Network, ...] = field(default=(), metadata=doc("client networks"))
    authenticated: bool | None = field(
        default=None, metadata=doc("true: the client logged in (SMTP AUTH, AUTHINFO); false: not")
    )
    user: tuple[str, ...] = field(default=(), metadata=doc("name(s) the client logged in as"))
    values: Mapping[str, Any] = field(
        default_factory=lambda: types.MappingProxyType({}), metadata=HIDDEN
    )

    def used(self) -> set[str]:
        """The keys this match gives."""
        common = {
            "client": bool(self.client),
            "authenticated": self.authenticated is not None,
            "user": bool(self.user),
        }
        return set(self.values) | {key for key, given in common.items() if given}

    def group_names(self) -> set[str]:
        """Named groups of every regular expression among the keys."""
        names: set[str] = set()
        for value in self.values.values():
            for item in value.values() if isinstance(value, Mapping) else (value,):
                if isinstance(item, Pattern):
                    names |= item.groups
        return names

    def with_values(self, **values: Any) -> Match:
        return dataclasses.replace(self, values=types.MappingProxyType({**self.values, **values}))


@dataclass(frozen=True, kw_only=True)
class Route(_Keys):
    """Where messages from some listeners go, and what is done to them on the way.

    Keys a protocol adds to its routes (DNS: ``answer``, ``action``, ``cache``
    ...) are kept in ``values``; ``view(cls)`` gives them typed.
    """

    name: str = field(default="", metadata=doc("shown in logs; defaults to the route's number"))
    from_: tuple[str, ...] = field(metadata=yaml_key("from", "listener name(s)"))
    to: tuple[str, ...] = field(default=(), metadata=doc("destination name(s); each gets a copy"))
    match: Match = field(default_factory=Match)
    transforms: tuple[str, ...] = field(default=(), metadata=doc("applied in order"))
    options: Mapping[str, Any] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=doc("for the transforms; '{group}' takes a named group of a match regex"),
    )
    continue_: bool = field(
        default=False, metadata=yaml_key("continue", "let later routes match too (fan-out)")
    )
    values: Mapping[str, Any] = field(
        default_factory=lambda: types.MappingProxyType({}), metadata=HIDDEN
    )
    where: Mapping[str, Location] = field(
        default_factory=lambda: types.MappingProxyType({}), compare=False, metadata=HIDDEN
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole routes.yaml."""

    version: Literal[1] = field(metadata=doc("format version of this file"))
    spool: ConfigPath | None = field(
        default=None,
        metadata=doc(
            "the durable queue's folder (default: var/spool next to this file;"
            " $STATE_DIRECTORY/spool when systemd sets $STATE_DIRECTORY)"
        ),
    )
    admin: Endpoint | None = field(
        default=None, metadata=doc("endpoint of the dashboard, /metrics, /healthz, /readyz")
    )
    admin_token: str = field(
        default="",
        metadata=doc(
            "the token the dashboard asks for before it shows, retries or drops a queued"
            " delivery (admin_token_file: a file holding it); without one it only lists them",
            secret=True,
        ),
    )
    plugins: tuple[ConfigPath, ...] = field(default=(), metadata=doc("folders of plugin modules"))
    shutdown_timeout: Duration = field(
        default=Duration(30), metadata=doc("how long SIGTERM waits for work in flight")
    )
    listeners: Mapping[str, ListenerConfig] = field(
        default_factory=lambda: types.MappingProxyType({})
    )
    destinations: Mapping[str, BaseDestinationConfig] = field(
        default_factory=lambda: types.MappingProxyType({})
    )
    routes: tuple[Route, ...] = ()
    source: str = field(default="", compare=False, metadata={"yaml": None})
    # What is allowed but probably not meant (see _warnings): `gateway check` prints
    # these, the gateway logs them; neither fails.
    warnings: tuple[Problem, ...] = field(default=(), compare=False, metadata={"yaml": None})


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
        self.registry = registry()
        # The keys protocols add to match: and to routes, with their types.
        self.added_keys: dict[type, Mapping[str, AddedKey]] = {
            Match: self.registry.match_keys,
            Route: self.registry.route_keys,
        }
        # Names declared in the file, valid or not, so one broken entry does not
        # also make every reference to it an error.
        self.declared: dict[str, set[str]] = {"listeners": set(), "destinations": set()}
        # Where some values are, for checks across the file: a listener's 'listen', 'admin'.
        self.where: dict[str, Location] = {}
        # Secrets written in the file itself (not KEY_file, not ${ENV}), for a warning.
        self.inline_secrets: list[tuple[Location, str]] = []
        self._loader = _Constructor()

    def loc(self, node: yaml.Node) -> Location:
        mark = node.start_mark
        return Location(self.filename, mark.line + 1, mark.column + 1)

    def fail(self, node: yaml.Node, message: str) -> None:
        self.problems.append(Problem(self.loc(node), message))

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return _Invalid
        try:
            return self._loader.construct_scalar_value(node)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            # An explicit tag whose value does not fit it: !!int abc, !!binary ...
            problem = getattr(exc, "problem", None) or str(exc)
            self.fail(node, f"cannot read {node.value!r} as {node.tag}: {problem}")
            return _Invalid

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
                numbers = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
                if isinstance(value, str) and any(value.strip() == str(a) for a in numbers):
                    self.fail(
                        node,
                        f"{what}: expected the number {value.strip()}, got the text"
                        f" {value!r}; write it without quotes",
                    )
                    return _Invalid
                hint_text = suggest(str(value), [str(a) for a in args])
                self.fail(node, f"{what}: expected one of {choices}, got {value!r}{hint_text}")
                return _Invalid
            return value
        if hint is Any:
            try:
                return _freeze(self._loader.construct_plain(node))
            except (yaml.YAMLError, ValueError, TypeError) as exc:
                problem = getattr(exc, "problem", None) or str(exc)
                self.fail(node, f"{what}: cannot read this value: {problem}")
                return _Invalid
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
                if isinstance(value, bool):
                    raise ValueError(
                        f"YAML reads {node.value} as {str(value).lower()}, not as text;"
                        f" put it in quotes: '{node.value}'"
                    )
                return str(value)
            if hint is ConfigPath:
                if value is None or not str(value).strip():
                    raise ValueError("expected a file or folder name")
                return ConfigPath(str((self.base / str(value)).resolve()))
            if issubclass(hint, Value):
                if value is None:
                    raise ValueError("expected a value, got nothing")
                if (
                    hint in (Size, Duration)
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    if value < 0:
                        raise ValueError(f"expected 0 or more, got {value}")
                    return hint(value)
                return hint.parse(str(value))
        except ValueError as exc:
            self.fail(node, f"{what}: {exc}")
            return _Invalid
        raise TypeError(f"no converter for {hint!r}")  # a programming error, not a user's

    def _secret(self, value: str, node: yaml.Node, what: str) -> Any:
        """A secret given in the file: ${ENV} filled in; an inline one noted for a warning."""
        if _ENV_REFERENCE.search(value):
            try:
                return secret_value(value)
            except ValueError as exc:
                self.fail(node, f"{what}: {exc}")
                return _Invalid
        if value:
            self.inline_secrets.append((self.loc(node), what))
        return value

    def _secret_files(
        self,
        given: dict[str, tuple[yaml.Node, yaml.Node]],
        known: Mapping[str | None, dataclasses.Field[Any]],
        what: str,
    ) -> dict[str, Any]:
        """``KEY_file: path`` for each secret KEY: the file's text (taken out of ``given``)."""
        found: dict[str, Any] = {}
        for name, f in known.items():
            key = f"{name}_file"
            if not f.metadata.get("secret") or key not in given:
                continue
            key_node, value_node = given.pop(key)
            if name in given:
                self.fail(key_node, f"{what}: give '{name}' or '{key}', not both")
                found[str(name)] = _Invalid
                continue
            path = self.scalar(value_node)
            if not isinstance(path, str) or not path.strip():
                self.fail(value_node, f"{what}: '{key}': expected a file name")
                found[str(name)] = _Invalid
                continue
            try:
                found[str(name)] = read_secret_file(self.base / path)
            except ValueError as exc:
                self.fail(value_node, f"{what}: '{key}': {exc}")
                found[str(name)] = _Invalid
        return found

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
        """``cls`` from a mapping; for Match and Route, keys the protocols add go to ``values``."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what}: expected a mapping, got a {_node_kind(node)}")
            return _Invalid
        given = self.fields_of(node, what)
        hints = _hints(cls)
        known = {yaml_name(f): f for f in dataclasses.fields(cls) if yaml_name(f) is not None}
        from_files = self._secret_files(given, known, what)
        added = self.added_keys.get(cls, {})
        values: dict[str, Any] = dict(extra or {})
        more: dict[str, Any] = {}
        where: dict[str, Location] = {"": self.loc(node)}
        ok = True
        for key, (key_node, value_node) in given.items():
            f = known.get(key)
            if f is None and key in added:
                value = self.convert(value_node, added[key].hint, f"{what}: '{key}'")
                where[key] = self.loc(value_node)
                if value is _Invalid:
                    ok = False
                else:
                    more[key] = value
                continue
            if f is None:
                hint = suggest(key, [*map(str, known), *added])
                self.fail(key_node, f"{what}: unknown key '{key}'{hint}")
                ok = False
                continue
            value = self.convert(value_node, hints[f.name], f"{what}: '{key}'")
            where[f.name] = self.loc(value_node)
            if f.metadata.get("secret") and isinstance(value, str):
                value = self._secret(value, value_node, f"{what}: '{key}'")
            if (
                f.metadata.get("positive")
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and value <= 0
            ):
                self.fail(
                    value_node, f"{what}: '{key}' must be more than 0, not {value_node.value}"
                )
                value = _Invalid
            if isinstance(value_node, yaml.MappingNode):
                # Each key of a mapping, and its value, for checks made later (options).
                for sub_key, sub_value in value_node.value:
                    name = self.scalar(sub_key)
                    if isinstance(name, str):
                        where[f"{f.name}.{name}"] = self.loc(sub_key)
                        where[f"{f.name}.{name}="] = self.loc(sub_value)
            if value is _Invalid:
                ok = False
            else:
                values[f.name] = value
        for name, secret in from_files.items():
            if secret is _Invalid:
                ok = False
            else:
                values[known[name].name] = secret
        if more:
            values["values"] = types.MappingProxyType(more)
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
            # At the value it names (an exception with a ``key``), else at the mapping.
            at = where.get(getattr(exc, "key", "") or "")
            self.problems.append(Problem(at or self.loc(node), f"{what}: {exc}"))
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
        listen = fields.get("listen")
        reader.where[f"{what}.{name}"] = reader.loc(listen[1] if listen else value_node)
        for key, (_, field_node) in fields.items():
            reader.where[f"{what}.{name}.{key}"] = reader.loc(field_node)
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


# Values a file may hold once its aliases (*name) are expanded: far beyond any real routes
# file, far below what an alias bomb ("billion laughs") would make the reader walk.
MAX_EXPANDED_NODES = 200_000
_YAML_TAG = "tag:yaml.org,2002:"


def _check_nodes(reader: _Reader, root: yaml.Node) -> None:
    """Refuse tags PyYAML's safe loader cannot make (``!foo``), and aliases that expand
    too far, before anything is built from the file."""
    sizes: dict[int, int] = {}  # node -> values below it, aliases expanded (each counted once)
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if not done and id(node) in entered:  # an alias inside its own anchor's value
            reader.fail(node, "an alias (*name) refers to the value it is part of")
            sizes[id(node)] = MAX_EXPANDED_NODES + 1
            continue
        entered.add(id(node))
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        if not done:
            if not node.tag.startswith(_YAML_TAG):
                reader.fail(
                    node,
                    f"unknown YAML tag '{node.tag}': routes.yaml is plain YAML; remove the tag"
                    " (quote the value if it starts with '!')",
                )
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        sizes[id(node)] = min(MAX_EXPANDED_NODES + 1, 1 + sum(sizes[id(c)] for c in children))
    if sizes[id(root)] > MAX_EXPANDED_NODES:
        reader.fail(
            root,
            f"the file's aliases (*name) expand to more than {MAX_EXPANDED_NODES:,} values;"
            " that is not a routes file",
        )


def _first(
    given: Mapping[str, tuple[yaml.Node, yaml.Node]], key: Any, node: yaml.Node, skip: Any
) -> bool:
    """Whether ``node`` is the first occurrence of a text key not in ``skip``."""
    return isinstance(key, str) and key not in skip and key in given and given[key][0] is node


def yaml_problem(exc: yaml.MarkedYAMLError, filename: str, text: str) -> Problem:
    """A YAML syntax error at the line where the mistake is, in plain words.

    The parser notices an unclosed quote or bracket, or a key without its colon,
    only further on (often at the end of the file); the place it started is the
    one to show, with what the parser saw and where.
    """

    def at(mark: Any) -> Location | None:
        return Location(filename, mark.line + 1, mark.column + 1) if mark is not None else None

    context, problem = exc.context or "", exc.problem or str(exc)
    start, noticed = exc.context_mark, exc.problem_mark
    seen = f" (noticed at line {noticed.line + 1})" if noticed is not None else ""
    line = (
        text.splitlines()[start.line]
        if start is not None and start.line < len(text.splitlines())
        else ""
    )
    if "quoted scalar" in context and start is not None:
        quote = line[start.column : start.column + 1] or "quote"
        return Problem(
            at(start),
            f"not valid YAML: the {quote} opened here is never closed{seen}; end the value"
            f" with a matching {quote}",
        )
    if "simple key" in context and start is not None:
        return Problem(
            at(start),
            f"not valid YAML: this line has no ':' after its key{seen}; write 'key: value'",
        )
    if ("flow mapping" in context or "flow sequence" in context) and start is not None:
        close = "}" if "mapping" in context else "]"
        return Problem(
            at(start),
            f"not valid YAML: the '{line[start.column : start.column + 1] or close}' opened"
            f" here is not closed with '{close}', or a ',' is missing between its items{seen}",
        )
    where = at(noticed) or at(start)
    if noticed is not None and noticed.index >= len(text.rstrip()):
        return Problem(
            at(start) or where,
            f"not valid YAML: the file ends in the middle of a value ({problem}); look for"
            " a '[' or '{' that is never closed",
        )
    if "tab character" in problem:
        return Problem(where, "not valid YAML: a tab; YAML indents with spaces only")
    if "cannot start any token" in problem and noticed is not None:
        char = text.splitlines()[noticed.line][noticed.column : noticed.column + 1]
        if char == "\t":
            return Problem(where, "not valid YAML: a tab; YAML indents with spaces only")
        if char in "@`":
            return Problem(
                where, f"not valid YAML: a value cannot start with '{char}'; put it in quotes"
            )
    if "mapping values are not allowed" in problem:
        return Problem(
            where,
            "not valid YAML: a ': ' inside a value; put the value in quotes"
            " (an IPv6 address such as ::1 too: '::1')",
        )
    if "did not find expected node content" in problem or "expected <block end>" in problem:
        return Problem(
            where,
            f"not valid YAML: {problem}; check this line's indentation against the lines"
            " above it, and quote a value that starts with ':', '[', '{', '*', '&' or '!'"
            " (an IPv6 address such as ::1: '::1')",
        )
    if "did not find expected key" in problem:
        return Problem(
            where,
            "not valid YAML: this line's indentation does not match the lines above it"
            " (YAML nests by indentation: keys of one mapping start in the same column)",
        )
    return Problem(where, f"not valid YAML: {problem}")


def parse(
    text: str, filename: str = "routes.yaml", base: Path | None = None, *, folders: bool = False
) -> Config:
    """Parse and check a configuration text; raise ConfigError listing every problem found.

    ``folders``: also check that the plugin folders exist and that the spool folder
    can be created or written (``load`` does: the file is meant for this machine).
    """
    reader = _Reader(filename, base if base is not None else Path(filename).resolve().parent)
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([yaml_problem(exc, filename, text)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(None, f"{filename}: not valid YAML: {exc}")]) from None
    if root is None:
        raise ConfigError(
            [Problem(Location(filename, 1, 1), "the file is empty; expected 'version: 1'")]
        )
    if not isinstance(root, yaml.MappingNode):
        reader.fail(root, "expected a mapping with version, listeners, destinations and routes")
        raise ConfigError(reader.problems)
    _check_nodes(reader, root)
    if reader.problems:
        raise ConfigError(reader.problems)

    given = reader.fields_of(root, "top level")
    special: dict[str, dict[str, Any]] = {
        "listeners": {n: e.config for n, e in reader.registry.listeners.items()},
        "destinations": {n: e.config for n, e in reader.registry.destinations.items()},
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
        # Each key once (a second one, or one that is not text, was reported above).
        [(k, v) for k, v in root.value if _first(given, reader.scalar(k), k, special)],
        root.start_mark,
        root.end_mark,
    )
    config = reader.dataclass(rest, Config, "top level", extra={**parsed, "source": filename})
    if config is _Invalid:
        raise ConfigError(reader.problems)
    config = dataclasses.replace(config, routes=_check_references(reader, config))
    if "admin" in given:
        reader.where["admin"] = reader.loc(given["admin"][1])
    _check_addresses(reader, config)
    for name, listener in config.listeners.items():
        for key, message in listener.check(config):
            # At the value the problem is about (users_file, say), else at the listener.
            where = reader.where.get(f"listeners.{name}.{key}") or reader.where.get(
                f"listeners.{name}"
            )
            reader.problems.append(Problem(where, f"listener '{name}': {message}"))
    if config.spool is None:
        config = dataclasses.replace(config, spool=ConfigPath(str(default_spool(reader.base))))
    if folders:
        _check_folders(reader, config, given)
    if reader.problems:
        raise ConfigError(reader.problems)
    return typing.cast(Config, dataclasses.replace(config, warnings=_warnings(reader, config)))


def readable_by_others(filename: str) -> bool:
    """Whether a file's mode lets every user read it (False when it is not on disk)."""
    try:
        return bool(os.stat(filename).st_mode & 0o004)
    except OSError:
        return False  # not a file on disk (a text parsed in memory)


def used_names(config: Config) -> tuple[set[str], set[str]]:
    """The listeners some route takes from, and the destinations some route sends to."""
    return (
        {name for route in config.routes for name in route.from_},
        {name for route in config.routes for name in route.to},
    )


def _warnings(reader: _Reader, config: Any) -> tuple[Problem, ...]:
    """Listeners no route takes from, destinations no route sends to, no listener at all."""
    found: list[Problem] = []
    used_from, used_to = used_names(config)
    for name in config.listeners:
        if name not in used_from:
            found.append(
                Problem(
                    reader.where.get(f"listeners.{name}"),
                    f"listener '{name}' is used by no route: it accepts connections but"
                    " refuses or drops everything; add a route 'from: "
                    f"{name}' or remove it",
                )
            )
    for name in config.destinations:
        if name not in used_to:
            found.append(
                Problem(
                    reader.where.get(f"destinations.{name}"),
                    f"destination '{name}' is used by no route: nothing is ever sent there",
                )
            )
    if not config.listeners:
        found.append(
            Problem(
                Location(reader.filename, 1, 1),
                "the file has no listeners: the gateway would start and take no traffic",
            )
        )
    if reader.inline_secrets and readable_by_others(reader.filename):
        for where, what in reader.inline_secrets:
            found.append(
                Problem(
                    where,
                    f"{what}: a secret written in a file others may read; keep it in a file"
                    " of its own (KEY_file: path) or in the environment (${NAME}), or make"
                    " this file readable by its owner only",
                )
            )
    from gateway.graph import shadowed_routes

    for shadow in shadowed_routes(config.routes):
        found.append(
            Problem(
                shadow.route.where.get(""),
                f"route '{shadow.route.name}' never matches: route '{shadow.by.name}' before"
                " it takes everything it would from the same listeners ("
                + ("no match" if not shadow.by.match.used() else "the same conditions or fewer")
                + ", no continue)",
            )
        )
    return tuple(found)


def _check_folders(
    reader: _Reader, config: Any, given: Mapping[str, tuple[yaml.Node, yaml.Node]]
) -> None:
    if "plugins" in given:
        node = given["plugins"][1]
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        for folder, item in zip(config.plugins, items, strict=False):
            _check_folder(reader, Path(folder), "plugin folder", reader.loc(item))
    spool_at = reader.loc(given["spool"][1]) if "spool" in given else None
    _check_spool(reader, Path(str(config.spool)), spool_at)


def _check_folder(reader: _Reader, folder: Path, what: str, where: Location | None) -> None:
    if not folder.exists():
        reader.problems.append(Problem(where, f"{what} {folder} does not exist"))
    elif not folder.is_dir():
        reader.problems.append(Problem(where, f"{what} {folder} is not a folder"))
    elif not os.access(folder, os.R_OK | os.X_OK):
        reader.problems.append(Problem(where, f"{what} {folder} cannot be read by this user"))


def _check_spool(reader: _Reader, folder: Path, where: Location | None) -> None:
    """The spool folder must be one this user can create, or write in: tried for real."""
    what = "the spool folder" if where is not None else "the spool folder (the default)"
    fix = "; name another with 'spool:' or give this user the right to write there"
    try:
        if folder.exists():
            if not folder.is_dir():
                raise OSError(f"{folder} is not a folder")
            with tempfile.TemporaryFile(dir=folder, prefix=".gateway-check-"):
                pass
            return
        parent = folder.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise OSError(f"{parent} is not a folder")
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".gateway-check-"))
    except OSError as exc:
        text = exc.strerror.lower() if exc.strerror else str(exc)
        named = f" ({exc.filename})" if exc.filename and exc.strerror else ""
        reader.problems.append(
            Problem(where, f"{what} {folder} cannot be created or written: {text}{named}{fix}")
        )


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
    return parse(text, str(path), p.resolve().parent, folders=True)


class RouteContext:
    """What a protocol's route check gets: the route's label, its listeners and a way to object."""

    def __init__(
        self, reader: _Reader, config: Config, route: Route, label: str, kinds: set[Kind]
    ) -> None:
        self._reader = reader
        self.config = config
        self.route = route
        self.label = label
        self.kinds = kinds  # of the route's listeners

    def destination_entry(self, name: str) -> DestinationEntry | None:
        """The registry entry of destination ``name``'s protocol; None if there is none."""
        destination = self.config.destinations.get(name)
        if destination is None:
            return None
        return self._reader.registry.destinations[destination.protocol]

    def problem(self, key: str, message: str) -> None:
        """Report ``message`` (prefixed with the route's label) at the route's ``key``."""
        where = self.route.where.get(key, self.route.where.get(""))
        self._reader.problems.append(Problem(where, f"{self.label}: {message}"))

    def problems(self, problems: typing.Iterable[Problem]) -> None:
        """Report problems found elsewhere (in a file the route names, say) as they are."""
        self._reader.problems.extend(problems)


# A protocol's check of the routes from its listeners: reports through the context,
# returns the route (completed, say with the names of a file it names).
RouteCheck = typing.Callable[[Route, RouteContext], Route]


def require_destination(route: Route, context: RouteContext) -> Route:
    """The check of routes whose protocol has none of its own: 'to' must name something."""
    if not route.to:
        context.problem("to", "'to' names no destination")
    return route


def _check_references(reader: _Reader, config: Config) -> tuple[Route, ...]:
    """Cross-checks that need the whole file: names, match keys, options' placeholders.

    Returns the routes with a name given to those that have none, as the
    protocols' route checks completed them.
    """
    registry = reader.registry
    routes = []
    for index, route in enumerate(config.routes, start=1):
        here = route.where[""]
        label = f"route '{route.name}'" if route.name else f"route {index}"
        if not route.name:
            route = dataclasses.replace(route, name=f"#{index}")
        kinds = set()
        protocols: dict[str, ListenerEntry] = {}
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
                protocols[listener.protocol] = registry.listeners[listener.protocol]
        context = RouteContext(reader, config, route, label, kinds)
        for key in sorted(set(route.values) & set(registry.route_keys)):
            owners = registry.route_keys[key].owners
            if protocols and not set(protocols) <= set(owners):
                context.problem(
                    key, f"'{key}' applies only to routes from {', '.join(owners)} listeners"
                )
        checks = {entry.check_route or require_destination for entry in protocols.values()}
        if not protocols:
            checks.add(require_destination)
        for check in sorted(checks, key=lambda c: c.__qualname__):
            route = check(route, context)
            context.route = route
        routes.append(route)
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
            n
            for n in route.to
            if n in config.destinations
            and registry.destinations[config.destinations[n].protocol].shape == "proxy"
        ]
        if proxies and (len(route.to) > 1 or route.transforms or route.continue_):
            reader.problems.append(
                Problem(
                    route.where.get("to", here),
                    f"{label}: destination '{proxies[0]}' is a reverse proxy; a route to it"
                    " takes no transforms, no other destination and no 'continue'",
                )
            )
        used = route.match.used() & {"client", *registry.match_keys}
        for protocol, entry in sorted(protocols.items()):
            allowed = registry.match_keys_of(protocol)
            wrong = sorted(used - allowed)
            if wrong:
                kind = entry.config.kind
                reader.problems.append(
                    Problem(
                        route.where.get("match", here),
                        f"{label}: match key(s) {', '.join(wrong)} do not apply to {kind} messages"
                        f" (use {', '.join(sorted(allowed))})",
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
    first: dict[str, Route] = {}
    for route in routes:
        earlier = first.setdefault(route.name, route)
        if earlier is not route:
            reader.problems.append(
                Problem(
                    route.where.get("name", route.where[""]),
                    f"route name '{route.name}' is used twice (first at {earlier.where['']})",
                )
            )
    return tuple(routes)


def socket_address(endpoint: str) -> tuple[str, str, str] | None:
    """(transport, host, port) an endpoint binds, to find two that clash; None if unknown.

    A host of "" is every address of the family: "0.0.0.0" for IPv4, "::" for both
    (Linux binds IPv6 wildcard sockets for IPv4 too).  systemd's sockets are
    bound already, and port 0 is any free port: neither clashes.
    """
    kind = endpoint.split(":", 1)[0].lower()
    if kind == "tls":
        from gateway.tls import tls_endpoint

        return socket_address(tls_endpoint(endpoint))
    if kind == "systemd" or endpoint.lower().startswith("udp:systemd:"):
        return None
    if kind == "unix":
        path = endpoint.split(":", 2)[1] if endpoint.count(":") else ""
        return ("unix", "", path.replace("\\:", ":"))
    parts = re.split(r"(?<!\\):", endpoint)
    if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) == 0:
        return None
    options = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
    host = options.get("interface", "").replace("\\:", ":")
    if kind == "udp":
        return ("udp", host or "0.0.0.0", parts[1])
    return ("tcp", host or ("::" if kind == "tcp6" else "0.0.0.0"), parts[1])


def clash(a: tuple[str, str, str], b: tuple[str, str, str]) -> bool:
    """Whether two socket addresses (see socket_address) cannot both be bound."""
    if a[0] != b[0] or a[2] != b[2]:
        return False
    if a[0] == "unix" or a[1] == b[1]:
        return True
    hosts = {a[1], b[1]}
    if "::" in hosts:
        return True  # every address, IPv4 included
    if "0.0.0.0" in hosts:
        other = (hosts - {"0.0.0.0"}).pop()
        return ":" not in other  # an IPv4 address
    return False


def _check_addresses(reader: _Reader, config: Config) -> None:
    """Two listeners (or a listener and the admin site) that would bind the same socket."""
    seen: list[tuple[tuple[str, str, str], str, str, Location | None]] = []
    sockets: list[tuple[str, str, Location | None]] = []
    if config.admin is not None:
        sockets.append(("the admin site", str(config.admin), reader.where.get("admin")))
    for name, listener in config.listeners.items():
        for listen in listener.listen:
            at = reader.where.get(f"listeners.{name}")
            sockets.append((f"listener '{name}'", str(listen), at))
    for owner, endpoint, where in sockets:
        address = socket_address(endpoint)
        if address is None:
            continue
        for other in seen:
            if clash(address, other[0]):
                earlier = f" at {other[3]}" if other[3] else ""
                what = ("path", "path") if address[0] == "unix" else ("address and port", "port")
                reader.problems.append(
                    Problem(
                        where,
                        f"{owner} ({endpoint}) and {other[1]}{earlier} ({other[2]}) would"
                        f" listen on the same {what[0]}; give one of them another {what[1]}",
                    )
                )
                break
        seen.append((address, owner, endpoint, where))


def _placeholders(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, str):
        value = _ENV_REFERENCE.sub("", value)  # ${NAME}: a secret from the environment
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


def json_schema(options: Mapping[str, tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of routes.yaml, for editors.

    ``options`` are the transforms' route options: name -> (transform, schema).
    """

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
        }
        if hint in simple:
            return dict(simple[hint])
        schema: dict[str, Any] = hint.schema  # a Value type or ConfigPath
        return dict(schema)

    def obj(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        props: dict[str, Any] = {}
        for added_name, key in sorted(added.get(cls, {}).items()):
            schema = one(key.hint)
            description = key.field.metadata.get("doc")
            if description:
                owners = ", ".join(key.owners)
                schema["description"] = f"{description} ({owners})"
            props[added_name] = schema
        required = []
        for f in dataclasses.fields(cls):
            name = yaml_name(f)
            if name is None or name in skip:
                continue
            schema = one(hints[f.name])
            if f.metadata.get("doc"):
                schema["description"] = f.metadata["doc"]
            props[name] = schema
            if f.metadata.get("secret"):
                props[f"{name}_file"] = {
                    "type": "string",
                    "description": f"a file holding '{name}' (instead of '{name}' itself)",
                }
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(name)
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if cls.__doc__:
            out["description"] = cls.__doc__.strip().splitlines()[0]
        if required:
            out["required"] = required
        return out

    known = registry()
    added: dict[type, Mapping[str, AddedKey]] = {
        Match: known.match_keys,
        Route: known.route_keys,
    }
    schema = obj(Config)
    schema["properties"]["listeners"] = {
        "type": "object",
        "additionalProperties": {"oneOf": [obj(e.config) for e in known.listeners.values()]},
    }
    schema["properties"]["destinations"] = {
        "type": "object",
        "additionalProperties": {"oneOf": [obj(e.config) for e in known.destinations.values()]},
    }
    if options:
        route = schema["properties"]["routes"]
        route_schema = route["anyOf"][-1]["items"] if "anyOf" in route else route
        properties = {}
        for name, (transform, option) in sorted(options.items()):
            described = dict(option)
            help_text = described.get("description", "")
            described["description"] = f"{transform}: {help_text}".rstrip(": ")
            properties[name] = described
            if described.pop("secret", False):
                properties[f"{name}_file"] = {
                    "type": "string",
                    "description": f"{transform}: a file holding '{name}'",
                }
        route_schema["properties"]["options"] = {
            "type": "object",
            "description": "for the transforms; '{group}' takes a named group of a match regex",
            "properties": properties,
        }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gateway routes.yaml"
    return schema
