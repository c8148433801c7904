"""The registry entries of the echo protocol (installed through the entry point)."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, destination_entry, listener_entry

from .config import EchoFileConfig, EchoListenerConfig, EchoMatch
from .destination import EchoFile
from .listener import EchoListener, match_line
from .message import LINE_KIND

PROTOCOLS = (
    ProtocolEntry(
        "echo",
        listener=listener_entry(
            EchoListenerConfig, EchoListener, match=EchoMatch, matcher=match_line
        ),
        kinds=(LINE_KIND,),
    ),
    ProtocolEntry("echo-file", destination=destination_entry(EchoFileConfig, EchoFile)),
)
