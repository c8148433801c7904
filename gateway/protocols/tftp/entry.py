"""The registry entry of TFTP: a listener whose reads are answered from file sources and
whose uploads are stored and delivered."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, listener_entry
from gateway.protocols.tftp.config import TftpListenerConfig, TftpMatch, check_tftp_route
from gateway.protocols.tftp.listener import TftpSockets, match_file, tftp_dry_run

# The listener picks the route of a read itself (by name and client); uploads go to the
# router, whose matcher is match_file.
PROTOCOLS = (
    ProtocolEntry(
        "tftp",
        listener=listener_entry(
            TftpListenerConfig,
            TftpSockets,
            match=TftpMatch,
            matcher=match_file,
            check_route=check_tftp_route,
            dry_run=tftp_dry_run,
        ),
    ),
)
