"""The settings of SMTP listeners and destinations, as routes.yaml gives them."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import (
    ClientEndpoint,
    ClientLimits,
    ConfigPath,
    DestinationConfig,
    Duration,
    ListenerConfig,
    Network,
    Rate,
    Size,
    doc,
)
from gateway.message import Kind, local_hostname
from gateway.tls import TlsConfig
from gateway.users import check_settings


@dataclass(frozen=True, kw_only=True)
class SmtpLimits(ClientLimits):
    """Per client, as Postfix's smtpd_client_*_limit: over a rate, 450 4.7.1."""

    message_rate: Rate | None = field(
        default=None, metadata=doc("MAIL FROM commands per client, e.g. 100/h")
    )
    recipient_rate: Rate | None = field(
        default=None, metadata=doc("RCPT TO commands per client, e.g. 1000/h")
    )
    auth_failure_rate: Rate | None = field(
        default=None,
        metadata=doc("failed AUTH per client, e.g. 10/h; past it AUTH gets 421 4.7.0"),
    )


@dataclass(frozen=True, kw_only=True)
class SmtpListenerConfig(ListenerConfig):
    """An ESMTP server that turns each received mail into a message."""

    kind: typing.ClassVar[Kind] = Kind.MAIL
    protocol: Literal["smtp"] = "smtp"
    hostname: str = field(default_factory=local_hostname, metadata=doc("name in the greeting"))
    max_size: Size = field(default=Size(10 * 1024 * 1024), metadata=doc("largest message accepted"))
    max_recipients: int = field(default=1000, metadata=doc("recipients per message", positive=True))
    idle_timeout: Duration = field(
        default=Duration(300),
        metadata=doc(
            "a client must send each whole command within this, and each read of DATA",
            positive=True,
        ),
    )
    transfer_timeout: Duration = field(
        default=Duration(600),
        metadata=doc("a whole message (DATA) must arrive within this", positive=True),
    )
    session_timeout: Duration = field(
        default=Duration(3600), metadata=doc("longest session (0: no limit); then 421 4.4.2")
    )
    max_connections: int = field(
        default=1000, metadata=doc("clients connected at once; more get 421 4.7.0", positive=True)
    )
    allow_sender_routing: bool = field(
        default=False,
        metadata=doc(
            "take recipients that route by themselves (user%host@, host!user@,"
            ' "user@host"@); refused with 550 5.7.1 otherwise'
        ),
    )
    limits: SmtpLimits = field(
        default_factory=SmtpLimits,
        metadata=doc("per client: connections, connection_rate, message_rate, recipient_rate"),
    )
    tls: TlsConfig | None = field(
        default=None,
        metadata=doc("certificate and key: STARTTLS on tcp: endpoints, TLS on tls: ones (465)"),
    )
    users: Mapping[str, str] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=doc("AUTH PLAIN/LOGIN logins: user name to Argon2 hash (gateway passwd)"),
    )
    users_file: ConfigPath | None = field(
        default=None,
        metadata=doc(
            "a file of name:hash lines that gateway passwd writes; edits apply at the next login"
        ),
    )
    require_auth: bool = field(
        default=False, metadata=doc("MAIL gets 530 5.7.0 until the client has logged in (AUTH)")
    )
    auth_without_tls: tuple[Network, ...] = field(
        default=(Network.parse("127.0.0.0/8"), Network.parse("::1")),
        metadata=doc(
            "clients that may log in before STARTTLS (default: this machine); [] for none"
        ),
    )
    senders: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=doc(
            "per user, the sender addresses (or @domains) it may use; others get 553 5.7.1"
            " (when set, a user not listed may use none)"
        ),
    )

    def connection_limit(self) -> int:
        return self.max_connections

    def client_limits(self) -> SmtpLimits:
        return self.limits

    def tls_config(self) -> TlsConfig | None:
        return self.tls

    def __post_init__(self) -> None:
        check_settings(self.users, self.users_file, self.require_auth)
        for user, addresses in self.senders.items():
            for address in addresses:
                _, at, domain = address.rpartition("@")
                if not at or not domain or any(c.isspace() for c in address):
                    raise ValueError(
                        f"senders of '{user}': {address!r} is neither an address"
                        " (user@example.test) nor a domain (@example.test)"
                    )

    def sender_allowed(self, user: str, sender: str) -> bool:
        """Whether ``user`` may send as ``sender`` (Postfix's reject_sender_login_mismatch)."""
        if not self.senders or not sender:
            return True
        owned = self.senders.get(user, ())
        domain = "@" + sender.rpartition("@")[2].lower()
        return any(a.lower() in (sender.lower(), domain) for a in owned)


@dataclass(frozen=True, kw_only=True)
class SmtpDestinationConfig(DestinationConfig):
    """Relays mail to an SMTP server."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.MAIL})
    protocol: Literal["smtp"] = "smtp"
    connect: ClientEndpoint = field(metadata=doc("server to relay to, e.g. tcp:127.0.0.1:25"))
    helo: str = field(default_factory=local_hostname, metadata=doc("name sent in EHLO"))
    max_connections: int = field(
        default=10, metadata=doc("connections open at once", positive=True)
    )
    tls: Literal["none", "may", "require"] = field(
        default="may", metadata=doc("STARTTLS: never, when offered, or always")
    )
    tls_verify: bool = field(default=False, metadata=doc("verify the server's certificate"))
    ca: ConfigPath | None = field(default=None, metadata=doc("CA file for tls_verify"))
    connect_timeout: Duration = field(
        default=Duration(30), metadata=doc("wait to connect", positive=True)
    )
    timeout: Duration = field(
        default=Duration(300), metadata=doc("wait for each reply", positive=True)
    )
