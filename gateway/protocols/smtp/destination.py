"""The SMTP destination: relays mail through a pool of client connections.

Replies map to outcomes the way an MTA reads them: 2xx delivered, 4xx (and no
reply at all) temporary, 5xx permanent.  Recipients are judged one by one, so
an outcome names the recipients that still need delivering.
"""

from __future__ import annotations

from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorCore

from gateway.message import Kind, MailMessage, Message
from gateway.ports import Deliverer, Outcome, Reason, RecipientFailure
from gateway.protocols.smtp.client import RecipientResult, SmtpClientPool
from gateway.protocols.smtp.config import SmtpDestinationConfig


def _describe(server: str, result: RecipientResult) -> str:
    if result.code == 0:
        return f"{server}: {result.text}"
    status = f" {result.status}" if result.status else ""
    return f"{server} answered {result.code}{status} {result.text}"


def _diagnostic(result: RecipientResult) -> str:
    """The server's reply as a DSN's Diagnostic-Code (RFC 3464 section 2.3.6)."""
    if result.code == 0:
        return ""
    status = f" {result.status}" if result.status else ""
    return f"smtp; {result.code}{status} {result.text}"


class SmtpDestination(Deliverer):
    kinds = frozenset({Kind.MAIL})

    def __init__(self, config: SmtpDestinationConfig, reactor: IReactorCore) -> None:
        self.config = config
        self.name = config.name
        self.pool = SmtpClientPool(
            reactor,
            clientFromString(reactor, str(config.connect)),  # type: ignore[no-untyped-call]
            helo=config.helo,
            max_connections=config.max_connections,
            tls=config.tls,
            tls_verify=config.tls_verify,
            ca_file=config.ca,
            connect_timeout=config.connect_timeout,
            command_timeout=config.timeout,
        )

    async def deliver(self, message: Message) -> Outcome:
        if not isinstance(message, MailMessage):
            return Outcome.permanent(f"SMTP takes mail, not {message.kind}")
        if not message.recipients:
            return Outcome.delivered("no recipients left")
        results = await self.pool.send(message.sender, message.recipients, message.to_bytes())
        temporary = [r for r in results if r.temporary]
        permanent = [r for r in results if r.permanent]
        if not temporary and not permanent:
            return Outcome.delivered(_describe(self.config.connect, results[0]))
        worst = temporary[0] if temporary else permanent[0]
        failed = tuple(r.recipient for r in temporary + permanent)
        detail = _describe(self.config.connect, worst)
        if len(failed) < len(results):
            detail += f" (for {', '.join(failed)}; the other recipients were delivered)"
        rejected = tuple(
            RecipientFailure(
                r.recipient,
                Reason.REFUSED,
                _describe(self.config.connect, r),
                r.status,
                _diagnostic(r),
            )
            for r in permanent
        )
        if temporary:
            return Outcome.temporary(
                detail,
                failed=tuple(r.recipient for r in temporary),
                rejected=rejected,
                diagnostic=_diagnostic(worst),
            )
        return Outcome.permanent(
            detail, rejected=rejected, diagnostic=_diagnostic(worst), dsn_status=worst.status
        )

    async def close(self) -> None:
        await self.pool.close()
