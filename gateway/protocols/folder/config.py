"""The settings of folder destinations, as routes.yaml gives them."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import ConfigPath, DestinationConfig, doc
from gateway.message import Kind


@dataclass(frozen=True, kw_only=True)
class FolderDestinationConfig(DestinationConfig):
    """A local folder whose files are served by name (a TFTP read request)."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.FILE})
    protocol: Literal["folder"] = "folder"
    path: ConfigPath = field(metadata=doc("the folder; names are looked up below it, never above"))
