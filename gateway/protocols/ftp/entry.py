"""The registry entry of FTP: a listener whose uploads are stored and delivered, and whose
downloads and listings come from file sources; a destination that uploads to a server."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, destination_entry, listener_entry
from gateway.protocols._files import FileMatch, check_file_route, file_dry_run, match_file
from gateway.protocols.ftp.config import FtpDestinationConfig, FtpListenerConfig
from gateway.protocols.ftp.destination import FtpDestination
from gateway.protocols.ftp.listener import FtpListener, refusal

PROTOCOLS = (
    ProtocolEntry(
        "ftp",
        listener=listener_entry(
            FtpListenerConfig,
            FtpListener,
            match=FileMatch,
            matcher=match_file,
            check_route=check_file_route,
            dry_run=file_dry_run(
                "FTP",
                not_allowed="421 not allowed from this address",
                not_found="550 no such file",
                too_big="552 exceeded storage allocation",
            ),
            refusal=refusal,
        ),
        destination=destination_entry(FtpDestinationConfig, FtpDestination, serves_files=True),
    ),
)
