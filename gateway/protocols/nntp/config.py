"""The settings of NNTP listeners, pollers and destinations, as routes.yaml gives them."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import (
    HIDDEN,
    ClientEndpoint,
    ClientLimits,
    ConfigPath,
    DestinationConfig,
    Duration,
    Endpoint,
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
class NntpDestinationConfig(DestinationConfig):
    """Posts articles to a news server: POST (reader), IHAVE or CHECK/TAKETHIS (transit peer)."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.ARTICLE})
    protocol: Literal["nntp"] = "nntp"
    connect: ClientEndpoint = field(
        metadata=doc("news server, e.g. tcp:127.0.0.1:119 or ssl:news.example:563 (NNTPS)")
    )
    mode: Literal["post", "ihave", "stream"] = field(
        default="post",
        metadata=doc("post: MODE READER + POST; ihave: IHAVE; stream: CHECK + TAKETHIS"),
    )
    user: str | None = field(default=None, metadata=doc("AUTHINFO USER name (RFC 4643)"))
    password: str | None = field(default=None, metadata=doc("AUTHINFO PASS password", secret=True))
    max_connections: int = field(default=4, metadata=doc("connections open at once", positive=True))
    connect_timeout: Duration = field(
        default=Duration(30), metadata=doc("wait to connect", positive=True)
    )
    timeout: Duration = field(
        default=Duration(120), metadata=doc("wait for each reply", positive=True)
    )
    idle_timeout: Duration = field(
        default=Duration(30), metadata=doc("close idle connections after", positive=True)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_connections < 1:
            raise ValueError(f"'max_connections' must be 1 or more, not {self.max_connections}")
        if self.password is not None and self.user is None:
            raise ValueError("'password' is set but 'user' is not")


@dataclass(frozen=True, kw_only=True)
class NntpLimits(ClientLimits):
    """Per client: over article_rate, IHAVE gets 436, CHECK 431, POST 441; TAKETHIS 400."""

    article_rate: Rate | None = field(
        default=None, metadata=doc("articles offered or posted per client, e.g. 50/s")
    )
    auth_failure_rate: Rate | None = field(
        default=None,
        metadata=doc("failed AUTHINFO logins per client, e.g. 10/h; past it AUTHINFO gets 400"),
    )


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
        metadata=doc("name in the greeting, and the path identity put into posted articles"),
    )
    max_size: Size = field(
        default=Size(10 * 1024 * 1024), metadata=doc("largest article accepted (441, 437, 439)")
    )
    idle_timeout: Duration = field(
        default=Duration(300),
        metadata=doc(
            "a client must send each whole command within this, and each read of an article",
            positive=True,
        ),
    )
    transfer_timeout: Duration = field(
        default=Duration(600),
        metadata=doc("a whole article must arrive within this", positive=True),
    )
    session_timeout: Duration = field(
        default=Duration(0), metadata=doc("longest session (0: no limit); then 400")
    )
    posting: bool = field(
        default=True, metadata=doc("accept POST from newsreaders; false answers 440")
    )
    users: Mapping[str, str] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=doc("AUTHINFO USER/PASS logins: user name to Argon2 hash (gateway passwd)"),
    )
    users_file: ConfigPath | None = field(
        default=None,
        metadata=doc(
            "a file of name:hash lines that gateway passwd writes; edits apply at the next login"
        ),
    )
    require_auth: bool = field(
        default=False,
        metadata=doc("answer 480 to POST, IHAVE, CHECK and TAKETHIS until AUTHINFO succeeded"),
    )
    remember: int = field(
        default=100_000,
        metadata=doc("message-ids of accepted articles kept in memory to refuse them again"),
    )
    max_connections: int = field(
        default=1000, metadata=doc("clients connected at once; more get 400", positive=True)
    )
    limits: NntpLimits = field(
        default_factory=NntpLimits,
        metadata=doc("per client: connections, connection_rate, article_rate"),
    )
    tls: TlsConfig | None = field(
        default=None,
        metadata=doc("certificate and key: STARTTLS on tcp: endpoints, TLS on tls: ones (563)"),
    )

    def connection_limit(self) -> int:
        return self.max_connections

    def client_limits(self) -> NntpLimits:
        return self.limits

    def tls_config(self) -> TlsConfig | None:
        return self.tls

    def __post_init__(self) -> None:
        check_settings(self.users, self.users_file, self.require_auth)
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
    listen: tuple[Endpoint, ...] = field(default=(), metadata=HIDDEN)
    allow: tuple[Network, ...] = field(default=(), metadata=HIDDEN)
    connect: ClientEndpoint = field(
        metadata=doc("news server to read from, e.g. tcp:127.0.0.1:119 or ssl:host:563")
    )
    groups: tuple[str, ...] = field(metadata=doc("newsgroups to follow, e.g. [local.test]"))
    user: str | None = field(default=None, metadata=doc("AUTHINFO USER name (RFC 4643)"))
    password: str | None = field(default=None, metadata=doc("AUTHINFO PASS password", secret=True))
    interval: Duration = field(
        default=Duration(60), metadata=doc("time between polls", positive=True)
    )
    batch: int = field(default=100, metadata=doc("articles fetched per group and poll at most"))
    start: Literal["new", "oldest"] = field(
        default="new",
        metadata=doc("on first sight of a group: only articles arriving later, or all it holds"),
    )
    connect_timeout: Duration = field(
        default=Duration(30), metadata=doc("wait to connect", positive=True)
    )
    timeout: Duration = field(
        default=Duration(120), metadata=doc("wait for each reply", positive=True)
    )

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
