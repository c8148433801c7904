"""The registry entry of SMTP: an ESMTP listener and a relaying destination."""

from __future__ import annotations

from gateway.ports import ProtocolEntry, destination_entry, listener_entry
from gateway.protocols.smtp.config import SmtpDestinationConfig, SmtpListenerConfig
from gateway.protocols.smtp.destination import SmtpDestination
from gateway.protocols.smtp.listener import SmtpListener, refusal
from gateway.routing import MailMatch, match_mail

PROTOCOLS = (
    ProtocolEntry(
        "smtp",
        listener=listener_entry(
            SmtpListenerConfig, SmtpListener, match=MailMatch, matcher=match_mail, refusal=refusal
        ),
        destination=destination_entry(SmtpDestinationConfig, SmtpDestination),
    ),
)
