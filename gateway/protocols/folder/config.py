"""The settings of folder destinations, as routes.yaml gives them."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import ConfigPath, DestinationConfig, doc
from gateway.message import Kind


@dataclass(frozen=True, kw_only=True)
class FolderDestinationConfig(DestinationConfig):
    """A local folder: its files are served by name (TFTP reads), uploads are saved in it."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.FILE})
    protocol: Literal["folder"] = "folder"
    path: ConfigPath = field(metadata=doc("the folder; names are looked up below it, never above"))
    uploads: bool = field(
        default=False,
        metadata=doc("take uploaded files (TFTP writes) into it; false: read-only"),
    )
    overwrite: bool = field(
        default=False,
        metadata=doc("replace a file of the same name (else such an upload is a dead letter)"),
    )

    def takes_uploads(self) -> bool:
        return self.uploads
