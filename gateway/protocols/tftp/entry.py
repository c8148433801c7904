"""The registry entry of TFTP: a listener whose read requests are routed to file sources."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, listener_entry
from gateway.protocols.tftp.config import TftpListenerConfig, TftpMatch, check_tftp_route
from gateway.protocols.tftp.listener import TftpSockets, tftp_dry_run

# The listener picks the route of a request itself (by name and client): no matcher.
PROTOCOLS = (
    ProtocolEntry(
        "tftp",
        listener=listener_entry(
            TftpListenerConfig,
            TftpSockets,
            match=TftpMatch,
            check_route=check_tftp_route,
            dry_run=tftp_dry_run,
        ),
    ),
)
