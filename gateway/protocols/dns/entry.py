"""The registry entries of DNS: DNS (UDP and TCP) and DNS over HTTPS, listeners and destinations."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, destination_entry, listener_entry
from gateway.protocols.dns.config import (
    DnsDestinationConfig,
    DnsListenerConfig,
    DnsMatch,
    DnsRoute,
    DohDestinationConfig,
    DohListenerConfig,
    check_dns_route,
)
from gateway.protocols.dns.destination import DnsDestination, DohDestination
from gateway.protocols.dns.dry_run import dns_dry_run
from gateway.protocols.dns.listener import DnsSockets, DohSockets

# Routes from DNS listeners are chosen by the listener itself (DnsRoutes), not by the
# router: no matcher.
PROTOCOLS = (
    ProtocolEntry(
        "dns",
        listener=listener_entry(
            DnsListenerConfig,
            DnsSockets,
            match=DnsMatch,
            route=DnsRoute,
            check_route=check_dns_route,
            dry_run=dns_dry_run,
        ),
        destination=destination_entry(DnsDestinationConfig, DnsDestination, shape="resolve"),
    ),
    ProtocolEntry(
        "doh",
        listener=listener_entry(
            DohListenerConfig,
            DohSockets,
            match=DnsMatch,
            route=DnsRoute,
            check_route=check_dns_route,
            dry_run=dns_dry_run,
        ),
        destination=destination_entry(DohDestinationConfig, DohDestination, shape="resolve"),
    ),
)
