"""The settings of Maildir destinations, as routes.yaml gives them."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import ConfigPath, DestinationConfig, doc
from gateway.message import Kind


@dataclass(frozen=True, kw_only=True)
class MaildirDestinationConfig(DestinationConfig):
    """Files each message into a Maildir folder (tmp/, fsync, rename into new/)."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.MAIL, Kind.ARTICLE})
    protocol: Literal["maildir"] = "maildir"
    path: ConfigPath = field(metadata=doc("the Maildir; created if missing"))
