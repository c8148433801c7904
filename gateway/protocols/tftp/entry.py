"""The registry entry of TFTP: a listener whose reads are answered from file sources and
whose uploads are stored and delivered."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, listener_entry
from gateway.protocols._files import FileMatch, check_file_route, match_file
from gateway.protocols.tftp.config import TftpListenerConfig
from gateway.protocols.tftp.listener import TftpSockets, tftp_dry_run

# The listener picks the route of a read itself (by name and client); uploads go to the
# router, whose matcher is match_file.
PROTOCOLS = (
    ProtocolEntry(
        "tftp",
        listener=listener_entry(
            TftpListenerConfig,
            TftpSockets,
            match=FileMatch,
            matcher=match_file,
            check_route=check_file_route,
            dry_run=tftp_dry_run,
        ),
    ),
)
