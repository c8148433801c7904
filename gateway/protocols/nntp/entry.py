"""The registry entries of NNTP: a news server listener, a group poller, a posting destination."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, destination_entry, listener_entry
from gateway.protocols.nntp.config import (
    NntpDestinationConfig,
    NntpListenerConfig,
    NntpPollerConfig,
)
from gateway.protocols.nntp.destination import NntpDestination
from gateway.protocols.nntp.listener import NntpListener, refusal
from gateway.protocols.nntp.poller import NntpPoller
from gateway.routing import ArticleMatch, match_article

PROTOCOLS = (
    ProtocolEntry(
        "nntp",
        listener=listener_entry(
            NntpListenerConfig,
            NntpListener,
            match=ArticleMatch,
            matcher=match_article,
            refusal=refusal,
        ),
        destination=destination_entry(NntpDestinationConfig, NntpDestination),
    ),
    ProtocolEntry(
        "nntp-poll",
        listener=listener_entry(
            NntpPollerConfig, NntpPoller, match=ArticleMatch, matcher=match_article, refusal=refusal
        ),
    ),
)
