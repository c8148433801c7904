"""The SMTP listener: the gateway's side of the SMTP server.

The protocol code in ``server.py`` parses the conversation; this module makes
the decisions: who may connect, which recipients some route takes (the gateway
is never an open relay), and what to answer once the message is handled.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.logger import Logger

from gateway.listening import StreamListener, duration_metric, message_metric, retry_after
from gateway.message import MailMessage, new_message_id
from gateway.ports import GatewayPort, Metric, Reason, Status, Verdict
from gateway.protocols._line_server import drain_sessions
from gateway.protocols.smtp.config import SmtpListenerConfig
from gateway.protocols.smtp.server import Reply, SmtpServerFactory, SmtpSession
from gateway.stats import Histogram
from gateway.users import Login, Users

log = Logger(namespace="gateway.smtp.listener")


def _received(
    config: SmtpListenerConfig, session: SmtpSession, qid: str, recipients: tuple[str, ...]
) -> bytes:
    helo = session.helo or "unknown"
    proto = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        proto += "S"
    if session.user:
        proto += "A"  # RFC 3848: ESMTPA, ESMTPSA
    lines = [f"Received: from {helo} ([{session.peer_host}])"]
    if session.cipher:
        lines.append(f"\t(using {session.cipher})")  # as Postfix records it
    lines.append(f"\tby {config.hostname} (gateway) with {proto} id {qid}")
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>")
    lines[-1] += f"; {_date(int(time.time()))}"
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


_dates: dict[int, str] = {}


def _date(second: int) -> str:
    """The RFC 5322 local date of ``second``, made once per second."""
    date = _dates.get(second)
    if date is None:
        if len(_dates) > 16:
            _dates.clear()
        date = _dates[second] = email.utils.formatdate(second, localtime=True)
    return date


# What the gateway's reasons are in SMTP (RFC 5321 codes, RFC 3463 enhanced status).
_PERMANENT: dict[Reason, tuple[int, str]] = {
    Reason.NO_ROUTE: (550, "5.1.1"),
    Reason.TOO_BIG: (552, "5.3.4"),
    Reason.POLICY: (550, "5.7.1"),
    Reason.BAD_MESSAGE: (550, "5.6.0"),
    Reason.BAD_ADDRESS: (553, "5.1.3"),
    Reason.UNSUPPORTED_FORMAT: (554, "5.6.1"),
    Reason.UNSUPPORTED_METHOD: (502, "5.5.1"),
    Reason.UNAUTHENTICATED: (530, "5.7.0"),
    Reason.MISCONFIGURED: (554, "5.3.5"),
    Reason.DUPLICATE: (554, "5.6.0"),
}
_TEMPORARY: dict[Reason, tuple[int, str]] = {
    Reason.UNAVAILABLE: (452, "4.3.1"),
    Reason.SHUTTING_DOWN: (421, "4.3.2"),
}


def reply_for(verdict: Verdict) -> Reply:
    """The SMTP reply to the end of DATA for a message the gateway did not take."""
    if verdict.status is Status.TEMPORARY:
        code, status = _TEMPORARY.get(verdict.reason, (451, "4.3.0"))
        return Reply(code, status, f"Try again later: {verdict.detail}")
    code, status = _PERMANENT.get(verdict.reason, (554, "5.0.0"))
    return Reply(code, status, verdict.detail)


def refusal(verdict: Verdict) -> str:
    """The reply a refused message gets, as one line (for route tests and dry runs)."""
    return " ".join(reply_for(verdict).to_bytes().decode("ascii").split())


def sender_specified_routing(recipient: str) -> bool:
    """Whether the address names another hop in its local part: user%host@, host!user@,
    "user@host"@ (RFC 1123 5.2.16's "percent hack", UUCP bang paths, quoted routes).

    Relayed on, such an address makes the next server send the mail wherever the
    sender chose: Postfix refuses it for relayed domains (allow_untrusted_routing).
    """
    local, at, _ = recipient.rpartition("@")
    if not at:
        return False
    return "%" in local or "!" in local or "@" in local


class SmtpListener(StreamListener[SmtpListenerConfig]):
    """One configured SMTP listener: its server factory, and the server's SmtpHandler."""

    def __init__(self, config: SmtpListenerConfig, gateway: GatewayPort, reactor: Any) -> None:
        super().__init__(config, gateway, reactor)
        # For /metrics: messages by the reply they got, and the time to that reply.
        self.rejected = 0
        self.tempfail = 0
        self.recipients_refused = 0
        self.duration = Histogram()
        self.users = Users(reactor, config.name)
        self.users.configure(config.users, config.users_file)
        self._factory = SmtpServerFactory(
            self,
            reactor=reactor,
            hostname=config.hostname,
            max_size=config.max_size,
            max_recipients=config.max_recipients,
            idle_timeout=config.idle_timeout,
            transfer_timeout=config.transfer_timeout,
            session_timeout=config.session_timeout,
            guard=self.guard,
            tls=self.tls,
            auth=self.users.available,
            require_auth=config.require_auth,
            auth_without_tls=config.auth_without_tls,
        )

    # --- Listener ---

    def factory(self) -> SmtpServerFactory:
        return self._factory

    def reconfigure(self, config: SmtpListenerConfig) -> None:
        super().reconfigure(config)
        factory = self._factory
        factory.hostname = config.hostname
        factory.max_size = config.max_size
        factory.max_recipients = config.max_recipients
        factory.idle_timeout = config.idle_timeout
        factory.transfer_timeout = config.transfer_timeout
        factory.session_timeout = config.session_timeout
        factory.tls = self.tls
        self.users.configure(config.users, config.users_file, strict=False)
        factory.auth = self.users.available
        factory.require_auth = config.require_auth
        factory.auth_without_tls = config.auth_without_tls

    async def drain(self, timeout: float) -> None:
        """Close idle sessions now; give busy ones ``timeout`` seconds to finish their message."""
        reply = Reply(421, "4.3.2", f"{self.config.hostname} Service shutting down")
        await drain_sessions(
            self.guard.connections,
            self.reactor,
            timeout,
            lambda session: session.close_with(reply),
        )

    def metrics(self) -> Iterable[Metric]:
        yield from super().metrics()
        name = self.name
        yield message_metric(name, self.accepted, self.rejected, self.tempfail)
        yield Metric(
            "gateway_listener_recipients_refused",
            "Recipients refused because no route takes them",
            "counter",
            ("listener",),
        ).add([name], self.recipients_refused)
        yield duration_metric(name, self.duration)

    # --- SmtpHandler ---

    def on_connect(self, session: SmtpSession) -> Reply | None:
        if self.gateway.stopping:
            return Reply(421, "4.3.2", f"{self.config.hostname} Service shutting down")
        return None

    def on_sender(
        self, session: SmtpSession, sender: str, params: Mapping[str, str | None]
    ) -> Reply | None:
        if self.gateway.stopping:
            # A 421 from the handler ends the session once it is sent.
            return Reply(421, "4.3.2", f"{self.config.hostname} Service shutting down")
        if session.user and not self.config.sender_allowed(session.user, sender):
            log.info(
                "listener {listener} refused sender {sender} from {client}: not owned by"
                " user {user}",
                listener=self.config.name,
                sender=sender,
                client=session.peer_host,
                user=session.user,
            )
            return Reply(
                553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by {session.user}"
            )
        return None

    async def on_auth(self, session: SmtpSession, user: str, password: str) -> Reply:
        host = session.peer_host
        login, wait = await self.users.log_in(self.guard, host, user, password)
        if login is Login.OK:
            return Reply(235, "2.7.0", "Authentication successful")
        if login is Login.LIMITED:
            # A client guessing passwords: no more guesses on this connection (421 closes).
            return Reply(
                421,
                "4.7.0",
                f"{self.config.hostname} Too many failed logins from {host},"
                f" try again in {retry_after(wait)} seconds",
            )
        return Reply(535, "5.7.8", "Authentication credentials invalid")

    def on_recipient(
        self, session: SmtpSession, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> Reply | None:
        if not self.config.allow_sender_routing and sender_specified_routing(recipient):
            self.recipients_refused += 1
            log.info(
                "listener {listener} refused recipient {rcpt} from {client}: sender-specified"
                " routing",
                listener=self.config.name,
                rcpt=recipient,
                client=session.peer_host,
            )
            return Reply(
                550, "5.7.1", f"<{recipient}>: Recipient address rejected: sender-specified routing"
            )
        if self.gateway.accepts_recipient(
            self.config.name, sender, recipient, session.peer_host, session.user
        ):
            return None
        self.recipients_refused += 1
        log.info(
            "listener {listener} refused recipient {rcpt} from {client}: no route",
            listener=self.config.name,
            rcpt=recipient,
            client=session.peer_host,
        )
        return Reply(
            550, "5.1.1", f"<{recipient}>: Recipient address rejected: no route for it here"
        )

    async def on_message(
        self, session: SmtpSession, sender: str, recipients: tuple[str, ...], data: bytes
    ) -> Reply:
        qid = new_message_id()
        message = MailMessage.from_bytes(
            _received(self.config, session, qid, recipients) + data,
            sender=sender,
            recipients=recipients,
            id=qid,
            listener=self.config.name,
            client=session.peer_host,
            user=session.user,
        )
        clock = self.gateway.seconds
        started = clock()
        verdict = await self.gateway.submit(message)
        self.duration.observe(clock() - started)
        if verdict.status is Status.DELIVERED:
            self.accepted += 1
            return Reply(250, "2.0.0", f"Ok: queued as {qid}")
        if verdict.status is Status.TEMPORARY:
            self.tempfail += 1
        else:
            self.rejected += 1
        return reply_for(verdict)
