"""Destinations at run time: built from their settings by their protocol's registry entry.

What a destination is (store-and-forward ``Deliverer``, request/response
``Resolver``, streaming ``Proxy``) and what it answers (``Outcome``) are the
core's ports, in ``gateway.ports``.
"""

from __future__ import annotations

from typing import Any

from gateway.config import BaseDestinationConfig
from gateway.ports import Deliverer, Destination, Outcome, Proxy, Resolver, Status
from gateway.protocols import registry

__all__ = [
    "Deliverer",
    "Destination",
    "Outcome",
    "Proxy",
    "Resolver",
    "Status",
    "build_destination",
]


def build_destination(config: BaseDestinationConfig, reactor: Any) -> Destination:
    """The running destination for one configured destination."""
    return registry().destination(config.protocol).build(config, reactor)
