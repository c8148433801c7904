"""The registry entries of HTTP: a listener (reverse proxy and web hooks in), a reverse proxy
destination, and the web hook destination (mail and articles POSTed as JSON)."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, destination_entry, listener_entry
from gateway.protocols.http.config import (
    HttpDestinationConfig,
    HttpListenerConfig,
    HttpMatch,
    WebhookDestinationConfig,
)
from gateway.protocols.http.listener import HttpSockets, refusal
from gateway.protocols.http.proxy import HttpProxyDestination
from gateway.protocols.http.routes import http_dry_run, match_request
from gateway.protocols.http.webhook import WebhookDestination, preview

PROTOCOLS = (
    ProtocolEntry(
        "http",
        listener=listener_entry(
            HttpListenerConfig,
            HttpSockets,
            match=HttpMatch,
            matcher=match_request,
            dry_run=http_dry_run,
            refusal=refusal,
        ),
        destination=destination_entry(
            HttpDestinationConfig, HttpProxyDestination, shape="proxy", serves_files=True
        ),
    ),
    ProtocolEntry(
        "webhook",
        destination=destination_entry(
            WebhookDestinationConfig, WebhookDestination, preview=preview
        ),
    ),
)
