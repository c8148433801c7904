"""Delivery status notifications (RFC 3464) for mail the gateway could not deliver.

A bounce goes to the envelope sender with an empty envelope sender of its own,
so a bounce is never bounced.  It carries a human-readable part, the
machine-readable ``message/delivery-status`` part and the original header.
"""

from __future__ import annotations

import email.utils
import secrets
import time
from collections.abc import Sequence

from gateway.message import MailMessage, new_message_id
from gateway.ports import Reason, RecipientFailure

# The RFC 3463 status of a failure whose far end said none, by the reason the gateway saw.
_STATUS = {
    Reason.NO_ROUTE: "5.1.1",
    Reason.TOO_BIG: "5.3.4",
    Reason.POLICY: "5.7.1",
    Reason.BAD_MESSAGE: "5.6.0",
    Reason.BAD_ADDRESS: "5.1.3",
    Reason.UNSUPPORTED_FORMAT: "5.6.1",
    Reason.UNAUTHENTICATED: "5.7.0",
    Reason.MISCONFIGURED: "5.3.5",
    Reason.UNAVAILABLE: "4.4.7",
}


def _status(failure: RecipientFailure) -> str:
    if failure.status[:1] in ("4", "5"):
        # A DSN reports final failure: a temporary status that expired is reported as
        # the 4.x.x it was (RFC 3464 allows it with Action: failed); keep it.
        return failure.status
    return _STATUS.get(failure.reason, "5.0.0")


def _clean(text: str) -> str:
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def make_bounce(
    original: MailMessage, failures: Sequence[RecipientFailure], hostname: str
) -> MailMessage:
    """A multipart/report DSN telling ``original.sender`` which recipients failed and why."""
    boundary = f"{new_message_id()}.{secrets.token_hex(6)}/{hostname}"
    now = email.utils.formatdate(localtime=True)
    arrival = email.utils.formatdate(original.received, localtime=True)
    listing = "\n".join(f"<{f.recipient}>: {_clean(f.detail)}" for f in failures)
    human = (
        f"This is the mail gateway at {hostname}.\n\n"
        "Your message could not be delivered to one or more recipients.\n"
        "The reasons are below; the message's header is attached.\n\n"
        f"{listing}\n"
    )
    per_recipient = []
    for f in failures:
        lines = [
            f"Final-Recipient: rfc822; {f.recipient}",
            f"Original-Recipient: rfc822; {f.recipient}",
            "Action: failed",
            f"Status: {_status(f)}",
        ]
        if f.diagnostic:
            lines.append(f"Diagnostic-Code: {_clean(f.diagnostic)}")
        else:
            lines.append(f"Diagnostic-Code: X-gateway; {_clean(f.detail)}")
        per_recipient.append("\n".join(lines))
    status_part = (
        f"Reporting-MTA: dns; {hostname}\n"
        f"X-Gateway-Queue-ID: {original.id}\n"
        f"Arrival-Date: {arrival}\n\n" + "\n\n".join(per_recipient) + "\n"
    )
    header = original.headers.to_bytes().decode("utf-8", "replace")
    text = (
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)\n"
        f"To: {original.sender}\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        f"Date: {now}\n"
        f"Message-ID: <{new_message_id()}.{int(time.time())}@{hostname}>\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"\n'
        "\n"
        "This is a MIME-encapsulated message.\n\n"
        f"--{boundary}\n"
        "Content-Description: Notification\n"
        "Content-Type: text/plain; charset=utf-8\n\n"
        f"{human}\n"
        f"--{boundary}\n"
        "Content-Description: Delivery report\n"
        "Content-Type: message/delivery-status\n\n"
        f"{status_part}\n"
        f"--{boundary}\n"
        "Content-Description: Undelivered Message Headers\n"
        "Content-Type: text/rfc822-headers\n\n"
        f"{header}\n"
        f"--{boundary}--\n"
    )
    return MailMessage.from_bytes(
        text.encode("utf-8"),
        sender="",
        recipients=[original.sender],
        listener=original.listener,
        client="127.0.0.1",
    )
