"""What every destination promises: deliver one message and say how it went.

Store-and-forward destinations (mail, news, web hooks) answer with an Outcome:
delivered, a temporary failure to retry, or a permanent one that cannot
succeed.  A destination never raises for a delivery problem; an exception
out of ``deliver`` is a bug and is treated as a temporary failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IReactorCore

from gateway.config import BaseDestinationConfig
from gateway.message import Kind, Message


class Status(enum.Enum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Outcome:
    status: Status
    detail: str = ""
    # For mail, on a temporary outcome: the recipients to try again (empty: all of them).
    failed: tuple[str, ...] = ()
    # For mail: recipients refused for good as (recipient, code, enhanced status, reason).
    rejected: tuple[tuple[str, int, str, str], ...] = ()
    # SMTP-style code and enhanced status of the decisive reply, when there is one.
    code: int = 0
    enhanced: str = ""
    # On a temporary outcome: seconds the destination asked to wait before the next try
    # (HTTP Retry-After); None leaves the wait to the back-off schedule.
    retry_after: float | None = None

    @classmethod
    def delivered(cls, detail: str = "") -> Outcome:
        return cls(Status.DELIVERED, detail)

    @classmethod
    def temporary(cls, detail: str, **kw: object) -> Outcome:
        return cls(Status.TEMPORARY, detail, **kw)  # type: ignore[arg-type]

    @classmethod
    def permanent(cls, detail: str, **kw: object) -> Outcome:
        return cls(Status.PERMANENT, detail, **kw)  # type: ignore[arg-type]

    @property
    def ok(self) -> bool:
        return self.status is Status.DELIVERED


class Destination(Protocol):
    name: str
    kinds: frozenset[Kind]

    async def deliver(self, message: Message) -> Outcome: ...

    async def close(self) -> None: ...


def build_destination(config: BaseDestinationConfig, reactor: IReactorCore) -> Destination:
    """The running destination for one configured destination."""
    if config.protocol == "maildir":
        from gateway.protocols.maildir.destination import MaildirDestination

        return MaildirDestination(config, reactor)  # type: ignore[arg-type]
    if config.protocol == "smtp":
        from gateway.protocols.smtp.destination import SmtpDestination

        return SmtpDestination(config, reactor)  # type: ignore[arg-type]
    if config.protocol == "dns":
        from gateway.protocols.dns.destination import DnsDestination

        return DnsDestination(config, reactor)  # type: ignore[arg-type]
    if config.protocol == "doh":
        from gateway.protocols.dns.destination import DohDestination

        return DohDestination(config, reactor)  # type: ignore[arg-type]
    if config.protocol == "nntp":
        from gateway.protocols.nntp.destination import NntpDestination

        return NntpDestination(config, reactor)  # type: ignore[arg-type]
    if config.protocol == "webhook":
        from gateway.protocols.http.webhook import WebhookDestination

        return WebhookDestination(config, reactor)  # type: ignore[arg-type]
    if config.protocol == "http":
        from gateway.protocols.http.proxy import HttpProxyDestination

        return HttpProxyDestination(config, reactor)  # type: ignore[arg-type]
    raise ValueError(f"no destination for protocol '{config.protocol}'")
