"""The settings of HTTP listeners, web hook and reverse proxy destinations, and HTTP match keys."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config import (
    BaseDestinationConfig,
    ClientLimits,
    ConfigPath,
    DestinationConfig,
    Duration,
    ListenerConfig,
    Pattern,
    Rate,
    Size,
    Value,
    doc,
)
from gateway.message import Kind
from gateway.tls import TlsConfig

# --- value types -------------------------------------------------------------------


class HttpUrl(str, Value):
    """An ``http://`` or ``https://`` base URL: ``http://127.0.0.1:8080`` or ``https://app/api``."""

    schema: typing.ClassVar[dict[str, Any]] = {"type": "string", "format": "uri"}

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


class WebhookUrl(str, Value):
    """The URL a web hook is POSTed to: ``http(s)://host[:port]/path[?query]``."""

    schema: typing.ClassVar[dict[str, Any]] = {"type": "string", "format": "uri"}

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


@dataclass(frozen=True, kw_only=True)
class HttpLimits(ClientLimits):
    """Per client, as nginx's limit_conn and limit_req: over a limit, 429 and Retry-After."""

    request_rate: Rate | None = field(default=None, metadata=doc("requests per client, e.g. 10/s"))


@dataclass(frozen=True, kw_only=True)
class HttpListenerConfig(ListenerConfig):
    """An HTTP/1.1 server (HTTPS on an ssl: endpoint): requests are proxied or become messages."""

    kind: typing.ClassVar[Kind] = Kind.HTTP
    protocol: Literal["http"] = "http"
    max_size: Size = field(
        default=Size(10 * 1024 * 1024), metadata=doc("largest request body accepted (413)")
    )
    max_header_size: Size = field(
        default=Size(16 * 1024), metadata=doc("request line and header fields together (431)")
    )
    header_timeout: Duration = field(
        default=Duration(10),
        metadata=doc("a client must send a whole request header within", positive=True),
    )
    idle_timeout: Duration = field(
        default=Duration(60),
        metadata=doc(
            "close a connection with no request, or a body that stalls, after", positive=True
        ),
    )
    body_timeout: Duration = field(
        default=Duration(300),
        metadata=doc(
            "a whole request body must arrive within this, however it trickles (408)", positive=True
        ),
    )
    max_connections: int = field(
        default=1000, metadata=doc("clients connected at once", positive=True)
    )
    limits: HttpLimits = field(
        default_factory=HttpLimits,
        metadata=doc("per client: connections, connection_rate, request_rate"),
    )
    tls: TlsConfig | None = field(
        default=None,
        metadata=doc("certificate and key for the tls: endpoints (HTTPS)"),
    )

    def connection_limit(self) -> int:
        return self.max_connections

    def client_limits(self) -> HttpLimits:
        return self.limits

    def tls_config(self) -> TlsConfig | None:
        return self.tls


@dataclass(frozen=True, kw_only=True)
class WebhookDestinationConfig(DestinationConfig):
    """POSTs each mail (or article) as JSON to a web hook URL (the mail_to_http conversion);
    sends each uploaded file to a web service (PUT at the URL plus its name, or POST)."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.MAIL, Kind.ARTICLE, Kind.FILE})
    protocol: Literal["webhook"] = "webhook"
    url: WebhookUrl = field(metadata=doc("where to POST, e.g. https://hooks.example/mail"))
    method: Literal["POST", "PUT"] = field(
        default="POST",
        metadata=doc(
            "for files: PUT each at the URL plus its name, or POST it to the URL as"
            " multipart/form-data (field 'file'); mail and articles are always POSTed"
        ),
    )
    secret: str | None = field(
        default=None,
        metadata=doc("sign each body with HMAC-SHA256 using this shared secret", secret=True),
    )
    signature_header: str = field(
        default="X-Hub-Signature-256", metadata=doc("header that carries sha256=<hex>")
    )
    timeout: Duration = field(
        default=Duration(30), metadata=doc("per request, connect included", positive=True)
    )
    attachment_limit: Size = field(
        default=Size(1024 * 1024),
        metadata=doc("attachments up to this size are included in base64; all are listed"),
    )
    headers: Mapping[str, str] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=doc("extra request header fields, e.g. Authorization"),
    )
    ca: ConfigPath | None = field(default=None, metadata=doc("CA file to verify the server"))
    verify: bool = field(default=True, metadata=doc("verify an https server's certificate"))

    def takes_uploads(self) -> bool:
        return True


@dataclass(frozen=True, kw_only=True)
class HttpDestinationConfig(BaseDestinationConfig):
    """A reverse proxy: each request is streamed to one of the upstream servers, the answer back;
    and a web server that files asked for by name (TFTP reads) are fetched from."""

    # file: a name asked for is fetched as the URL's path plus the name.
    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.HTTP, Kind.FILE})
    protocol: Literal["http"] = "http"
    url: tuple[HttpUrl, ...] = field(
        metadata=doc("upstream base URL(s), e.g. http://127.0.0.1:8080; a path is put in front")
    )
    balance: Literal["round-robin", "least-connections"] = field(
        default="round-robin", metadata=doc("how an upstream is chosen for each request")
    )
    fail_timeout: Duration = field(
        default=Duration(10), metadata=doc("skip an upstream that failed for this long")
    )
    connect_timeout: Duration = field(
        default=Duration(5), metadata=doc("wait to connect", positive=True)
    )
    timeout: Duration = field(
        default=Duration(60),
        metadata=doc(
            "wait for the response header, and between reads of the body (504)", positive=True
        ),
    )
    host: Literal["keep", "upstream"] = field(
        default="keep", metadata=doc("send the client's Host, or the upstream URL's")
    )
    strip_prefix: str = field(
        default="", metadata=doc("remove this path prefix before forwarding, e.g. /api")
    )
    keepalive: int = field(
        default=64, metadata=doc("idle keep-alive connections kept per upstream")
    )
    max_connections: int = field(
        default=256,
        metadata=doc(
            "connections to each upstream at once; more requests wait for one (503 after"
            " connect_timeout), as nginx's max_conns with a queue",
            positive=True,
        ),
    )
    keepalive_timeout: Duration = field(
        default=Duration(60),
        metadata=doc(
            "close a kept connection that has been idle this long; keep it below the"
            " upstream's own idle timeout"
        ),
    )
    ca: ConfigPath | None = field(default=None, metadata=doc("CA file to verify https upstreams"))
    verify: bool = field(default=True, metadata=doc("verify an https upstream's certificate"))


@dataclass(frozen=True, kw_only=True)
class HttpMatch:
    """The match keys of routes from HTTP listeners."""

    header: Mapping[str, Pattern] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=doc("header name to regex; every one must match a field of that name"),
    )
    host: tuple[str, ...] = field(
        default=(),
        metadata=doc("HTTP: Host names (port ignored), or *.example.test for names below"),
    )
    path: Pattern | None = field(
        default=None, metadata=doc("HTTP: request path without the query (regex)")
    )
    prefix: str | None = field(default=None, metadata=doc("HTTP: request path prefix, plain text"))
    method: tuple[str, ...] = field(default=(), metadata=doc("HTTP: methods, e.g. [GET, HEAD]"))
