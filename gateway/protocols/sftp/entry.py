"""The registry entry of SFTP: a destination that takes uploaded files."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, destination_entry
from gateway.protocols.sftp.config import SftpDestinationConfig
from gateway.protocols.sftp.destination import SftpDestination

PROTOCOLS = (
    ProtocolEntry("sftp", destination=destination_entry(SftpDestinationConfig, SftpDestination)),
)
