"""NNTP for the gateway: a sans-io codec (``codec``), and Twisted shells built on it.

``codec`` imports without Twisted; see its docstring for the API.  The
Twisted-based server names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .codec import (
    ArticleReceived,
    AuthRequest,
    Block,
    Command,
    LineTooLong,
    NntpError,
    NntpSyntaxError,
    OfferRequest,
    Response,
    SendResponse,
    ServerCodec,
    StreamReader,
    decode_block,
    encode_block,
    encode_lines,
    format_command,
    is_message_id,
    normalise_block,
    parse_capabilities,
    parse_command,
    parse_response,
    response_has_block,
)

if TYPE_CHECKING:
    from .server import NntpHandler, NntpServerFactory, NntpServerProtocol, NntpSession

__all__ = [
    "ArticleReceived",
    "AuthRequest",
    "Block",
    "Command",
    "LineTooLong",
    "NntpError",
    "NntpHandler",
    "NntpServerFactory",
    "NntpServerProtocol",
    "NntpSession",
    "NntpSyntaxError",
    "OfferRequest",
    "Response",
    "SendResponse",
    "ServerCodec",
    "StreamReader",
    "decode_block",
    "encode_block",
    "encode_lines",
    "format_command",
    "is_message_id",
    "normalise_block",
    "parse_capabilities",
    "parse_command",
    "parse_response",
    "response_has_block",
]

_LAZY = {
    "NntpHandler": ".server",
    "NntpServerFactory": ".server",
    "NntpServerProtocol": ".server",
    "NntpSession": ".server",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
