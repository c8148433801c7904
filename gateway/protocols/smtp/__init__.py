"""SMTP for the gateway: a sans-io codec, a Twisted server shell and a pooled Twisted client.

The Twisted-based names load on first use, so that ``codec`` imports without Twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .codec import Reply

if TYPE_CHECKING:
    from .client import RecipientResult, SmtpClientPool
    from .server import SmtpHandler, SmtpServerFactory, SmtpServerProtocol, SmtpSession

__all__ = [
    "RecipientResult",
    "Reply",
    "SmtpClientPool",
    "SmtpHandler",
    "SmtpServerFactory",
    "SmtpServerProtocol",
    "SmtpSession",
]

_LAZY = {
    "RecipientResult": ".client",
    "SmtpClientPool": ".client",
    "SmtpHandler": ".server",
    "SmtpServerFactory": ".server",
    "SmtpServerProtocol": ".server",
    "SmtpSession": ".server",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
