"""The registry entry of Maildir: a destination that files messages into a folder."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, destination_entry
from gateway.protocols.maildir.config import MaildirDestinationConfig
from gateway.protocols.maildir.destination import MaildirDestination

PROTOCOLS = (
    ProtocolEntry(
        "maildir", destination=destination_entry(MaildirDestinationConfig, MaildirDestination)
    ),
)
