"""The registry entry of folders: a destination that serves files by name."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, destination_entry
from gateway.protocols.folder.config import FolderDestinationConfig
from gateway.protocols.folder.destination import FolderDestination

PROTOCOLS = (
    ProtocolEntry(
        "folder",
        destination=destination_entry(FolderDestinationConfig, FolderDestination, shape="files"),
    ),
)
