"""The settings of FTP listeners, as routes.yaml gives them."""

from __future__ import annotations

import ipaddress
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config import (
    ClientLimits,
    ConfigPath,
    DestinationConfig,
    Duration,
    FolderUrl,
    ListenerConfig,
    Network,
    Rate,
    Size,
    Value,
    doc,
)
from gateway.message import Kind
from gateway.tls import TlsConfig
from gateway.users import check_settings


class PortRange(Value):
    """Ports ``low-high`` (both taken), e.g. ``30000-30099``."""

    __slots__ = ("high", "low")
    schema: typing.ClassVar[dict[str, Any]] = {"type": "string", "pattern": r"^\d+\s*-\s*\d+$"}

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    @classmethod
    def parse(cls, text: str) -> PortRange:
        low, dash, high = str(text).partition("-")
        if not dash or not low.strip().isdigit() or not high.strip().isdigit():
            raise ValueError(f"expected a port range such as 30000-30099, got '{text}'")
        a, b = int(low), int(high)
        if not 1024 <= a <= b <= 65535:
            raise ValueError(f"the range '{text}' must go up from 1024 or more to 65535 at most")
        return cls(a, b)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PortRange) and (self.low, self.high) == (other.low, other.high)

    def __hash__(self) -> int:
        return hash((self.low, self.high))

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


@dataclass(frozen=True, kw_only=True)
class FtpLimits(ClientLimits):
    """Per client: connections, connection_rate, auth_failure_rate."""

    auth_failure_rate: Rate | None = field(
        default=None,
        metadata=doc("failed logins per client, e.g. 10/h; past it the login gets 421"),
    )


@dataclass(frozen=True, kw_only=True)
class FtpListenerConfig(ListenerConfig):
    """An FTP server: uploads are stored and delivered to the route's destinations,
    downloads and listings come from a route's folder."""

    kind: typing.ClassVar[Kind] = Kind.FILE
    protocol: Literal["ftp"] = "ftp"
    users: Mapping[str, str] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=doc("logins: user name to Argon2 hash (gateway passwd)"),
    )
    users_file: ConfigPath | None = field(
        default=None,
        metadata=doc(
            "a file of name:hash lines (gateway passwd -f); edits apply at the next login"
        ),
    )
    passive_ports: PortRange | None = field(
        default=None,
        metadata=doc(
            "ports offered for passive data connections, e.g. 30000-30099 (open them in the"
            " firewall); none: any free port"
        ),
    )
    passive_address: str | None = field(
        default=None,
        metadata=doc(
            "the IPv4 address PASV names (behind NAT); default: the address the client connected to"
        ),
    )
    active: bool = field(
        default=True,
        metadata=doc("take PORT/EPRT (the gateway connects back to the client's own address)"),
    )
    tls: TlsConfig | None = field(
        default=None,
        metadata=doc("certificate and key: AUTH TLS on tcp: endpoints, implicit TLS on tls: ones"),
    )
    login_without_tls: tuple[Network, ...] = field(
        default=(Network.parse("127.0.0.0/8"), Network.parse("::1")),
        metadata=doc(
            "clients that may log in without AUTH TLS (default: this machine); [] for none"
        ),
    )
    data_tls: bool = field(
        default=False,
        metadata=doc("after AUTH TLS, data connections must be protected too (PROT P)"),
    )
    max_size: Size = field(
        default=Size(1024**3),
        metadata=doc("the largest upload taken (552 beyond it)", positive=True),
    )
    max_connections: int = field(
        default=200,
        metadata=doc("control connections at once; more get 421", positive=True),
    )
    idle_timeout: Duration = field(
        default=Duration(300),
        metadata=doc("a client must send each command within this", positive=True),
    )
    data_timeout: Duration = field(
        default=Duration(300),
        metadata=doc("a data connection must open, and move a byte, within this", positive=True),
    )
    session_timeout: Duration = field(
        default=Duration(0), metadata=doc("longest session (0: no limit); then 421")
    )
    limits: FtpLimits = field(
        default_factory=FtpLimits,
        metadata=doc("per client: connections, connection_rate, auth_failure_rate"),
    )

    def connection_limit(self) -> int:
        return self.max_connections

    def client_limits(self) -> FtpLimits:
        return self.limits

    def tls_config(self) -> TlsConfig | None:
        return self.tls

    def __post_init__(self) -> None:
        if not self.users and self.users_file is None:
            raise ValueError(
                "an FTP listener needs 'users' or 'users_file' (there are no anonymous logins)"
            )
        check_settings(self.users, self.users_file, True)
        if self.passive_address is not None:
            try:
                ipaddress.IPv4Address(self.passive_address)
            except ValueError:
                raise ValueError(
                    f"'passive_address' is the IPv4 address PASV names, not"
                    f" '{self.passive_address}'"
                ) from None
        for endpoint in self.listen:
            if endpoint.lower().startswith("udp:"):
                raise ValueError(f"FTP listens on TCP: write 'tcp:21', not '{endpoint}'")


@dataclass(frozen=True, kw_only=True)
class FtpDestinationConfig(DestinationConfig):
    """An FTP server: each upload is sent under a temporary name, then renamed into place."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.FILE})
    protocol: Literal["ftp"] = "ftp"
    url: FolderUrl = field(
        metadata=doc("ftp://user@host:port/folder/ : files go below the folder by their name")
    )
    password: str = field(
        metadata=doc("the user's password (password_file: a file holding it)", secret=True)
    )
    tls: Literal["none", "may", "require"] = field(
        default="may",
        metadata=doc("AUTH TLS, with protected data connections: never, when offered, or always"),
    )
    tls_verify: bool = field(default=False, metadata=doc("verify the server's certificate"))
    ca: ConfigPath | None = field(default=None, metadata=doc("CA file for tls_verify"))
    overwrite: bool = field(
        default=False,
        metadata=doc("replace a file of the same name (else such an upload is a dead letter)"),
    )
    max_connections: int = field(
        default=4, metadata=doc("connections to the server at once", positive=True)
    )
    connect_timeout: Duration = field(
        default=Duration(30), metadata=doc("wait to connect and log in", positive=True)
    )
    timeout: Duration = field(
        default=Duration(120),
        metadata=doc("wait for each reply, and for each block to move", positive=True),
    )

    def takes_uploads(self) -> bool:
        return True

    @property
    def port(self) -> int:
        return self.url.port or 21

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.url.scheme != "ftp":
            raise ValueError(f"'url' must be ftp://user@host[:port]/folder/, not {self.url!r}")
        if self.tls_verify and self.tls == "none":
            raise ValueError("'tls_verify' needs TLS: set tls to may or require")
        if self.ca is not None and not self.tls_verify:
            raise ValueError("'ca' is for tls_verify: set tls_verify: true")
