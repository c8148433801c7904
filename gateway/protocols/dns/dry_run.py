"""``gateway route --dry-run`` for DNS and DoH listeners: which route a query takes, and
what that route answers, without a packet sent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype

from gateway.config import Route, client_allowed
from gateway.ports import Explained, Sample
from gateway.protocols.dns.config import DnsRoute
from gateway.protocols.dns.listener import LocalZone
from gateway.protocols.dns.routes import DnsRoutes


def dns_dry_run(
    config: Any, routes: tuple[Route, ...], shapes: Mapping[str, str], sample: Sample
) -> Explained:
    if not sample.name:
        raise ValueError("give the query to route: --query NAME [TYPE]")
    try:
        qname = dns.name.from_text(sample.name).to_text().lower()
        qtype = dns.rdatatype.from_text(sample.type.upper())
    except (dns.exception.DNSException, ValueError) as exc:
        raise ValueError(f"not a DNS query: {sample.name} {sample.type}: {exc}") from None
    question = f"{qname} {dns.rdatatype.to_text(qtype)} from {sample.client}"
    allow = config.allow
    if allow and not client_allowed(allow, sample.client):
        return Explained(
            None,
            (f"{question}: the client is not in the listener's 'allow' list; answered REFUSED",),
            refused="REFUSED",
        )
    route = DnsRoutes(routes).select(qname, qtype, dns.rdataclass.IN, sample.client)
    if route is None:
        return Explained(
            None, (f"{question}: no route takes it; answered REFUSED",), refused="REFUSED"
        )
    keys = route.view(DnsRoute)
    head = f"{question}: route '{route.name}'"
    if keys.action is not None:
        code = "REFUSED" if keys.action == "refuse" else "NXDOMAIN"
        return Explained(route.name, (f"{head} answers {code}",), answer=code)
    if keys.answer:
        wanted = dns.rdatatype.to_text(qtype)
        lines = [f"{head} answers from its own records:"]
        # The listener's own index of the records (LocalZone), as it answers from it.
        found = LocalZone(keys.answer).rrsets.get((qname, int(qtype)), [])
        matching = [rrset.to_text() for rrset in found]
        lines += [f"  {r}" for r in matching] or [
            f"  none of its records is {qname} {wanted}: NOERROR with no answer, or NXDOMAIN"
            " when it has no record of that name"
        ]
        return Explained(route.name, tuple(lines), answer="\n".join(matching))
    cache = "with its cache" if keys.cache else "without a cache"
    return Explained(
        route.name,
        (f"{head} forwards it to {', '.join(route.to)} (in that order), {cache}",),
        destinations=route.to,
    )
