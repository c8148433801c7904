"""Defects found reviewing the SMTP listener against RFC 5321 and Postfix's smtpd, in memory."""

from __future__ import annotations

import asyncio

import pytest

from gateway.ports import Reason, Status, Verdict
from gateway.protocols.smtp.codec import MailRequest, Reply, parse_mail_argument
from gateway.protocols.smtp.config import SmtpListenerConfig
from gateway.protocols.smtp.listener import SmtpListener
from gateway.protocols.smtp.server import SmtpSession
from tests.support.port import FakePort
from tests.unit.test_smtp_codec import TRANSACTION, Driver
from tests.unit.test_smtp_server import Conn, Handler

SMUGGLED = b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nforged\r\n"

# ----------------------------------------------------------------------------- SMTP smuggling


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r\n.\n"])
def test_bare_lf_dot_line_does_not_end_the_data(fake_end: bytes) -> None:
    """Defect: a "." line ending in a bare LF, or following a line that ended in a bare LF,
    ended the message (RFC 5321 4.1.1.4: only CRLF.CRLF does; Postfix's
    smtpd_forbid_bare_newline=normalize). An upstream MTA that passes such a
    sequence through as content let its sender smuggle a second, forged
    transaction into the gateway (SMTP smuggling, CVE-2023-51764 family)."""
    driver = Driver()
    replies = driver.feed(TRANSACTION + b"one" + fake_end + SMUGGLED + b".\r\n")
    assert [r.code for r in replies] == [250, 250, 354, 250]
    assert sum(isinstance(r, MailRequest) for r in driver.requests) == 1
    (message,) = driver.messages
    assert message.sender == "a@example.org"
    assert b"MAIL FROM:<ceo@bank.example>\n" in message.data
    assert message.data.endswith(b"forged\n")


def test_bare_lf_dot_line_does_not_end_the_data_byte_by_byte() -> None:
    """Defect: the same smuggling, with each byte arriving on its own (state across reads)."""
    driver = Driver()
    driver.feed(TRANSACTION)
    for byte in b"one\n.\r\n" + SMUGGLED + b".\r\n":
        driver.feed(bytes([byte]))
    (message,) = driver.messages
    assert message.data == b"one\n\n" + SMUGGLED.replace(b"\r\n", b"\n")
    assert len(driver.requests) == 3  # MAIL, RCPT, message: nothing from the smuggled part


def test_bare_cr_dot_never_ends_the_data() -> None:
    """Regression (smuggling): "\\r.\\r" and "\\r\\n.\\r" are content, not an end of data."""
    driver = Driver()
    driver.feed(TRANSACTION + b"one\r.\r" + SMUGGLED + b"two\r\n.\rx\r\n.\r\n")
    (message,) = driver.messages
    assert message.sender == "a@example.org"
    assert b"ceo@bank.example" in message.data
    assert message.data.endswith(b"two\n\rx\n")


def test_crlf_dot_crlf_still_ends_the_data_after_bare_lf_lines() -> None:
    """Regression: bare-LF lines are still taken as lines; a real CRLF.CRLF ends the data."""
    driver = Driver()
    assert driver.codes(TRANSACTION + b"a\nb\r\n.\r\nNOOP\r\n") == [250, 250, 354, 250, 250]
    assert [m.data for m in driver.messages] == [b"a\nb\n"]


def test_server_does_not_end_data_at_bare_lf_dot() -> None:
    """Defect: the server shell took "\\n.\\n" as the end of the data and asked the handler
    about the smuggled sender."""
    handler = Handler()
    conn = Conn(handler)
    conn.read()
    conn.send(TRANSACTION + b"Subject: hi\r\n\r\nbody\n.\n" + SMUGGLED)
    assert handler.names() == ["connect", "sender", "recipient"]
    conn.send(b".\r\n")
    assert handler.names() == ["connect", "sender", "recipient", "message"]
    assert b"ceo@bank.example" in handler.calls[-1][4]


# ----------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<a@" + b"b" * 64 + b".example>",
        b"MAIL FROM:<a@" + b"label." * 42 + b"example>",  # 259 octets
        b"MAIL FROM:<a@[IPv6:fe80::1%eth0]>",
        b"MAIL FROM:<@" + b"r" * 64 + b".example:a@example.org>",
    ],
)
def test_impossible_domains_are_bad_sender_syntax(line: bytes) -> None:
    """Defect: a domain label over 63 octets, a domain over 255 octets (RFC 5321 4.5.3.1.2,
    RFC 1035 2.3.4) and an IPv6 literal with a zone index (not in the RFC 5321 4.1.3
    grammar) were accepted; no route or DNS lookup can ever use them."""
    assert Driver().feed(line + b"\r\n") == [Reply(501, "5.1.7", "Bad sender address syntax")]


def test_longest_valid_domain_is_accepted() -> None:
    """Regression: 63-octet labels and a 255-octet domain are still fine."""
    domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 63])  # 255 octets
    assert parse_mail_argument(f"FROM:<u@{domain}>")[0] == f"u@{domain}"


def test_impossible_recipient_domain_is_bad_recipient_syntax() -> None:
    """Defect: RCPT took a domain with a 64-octet label (501 5.1.3, as for bad syntax)."""
    driver = Driver()
    driver.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert driver.feed(b"RCPT TO:<b@" + b"x" * 64 + b".example>\r\n") == [
        Reply(501, "5.1.3", "Bad recipient address syntax")
    ]


# ----------------------------------------------------------------------------- transaction


def test_duplicate_recipient_is_kept_once() -> None:
    """Defect: a recipient given twice (RCPT repeated, as clients retrying a 4xx do) was
    delivered twice; Postfix's cleanup drops duplicate recipients."""
    driver = Driver(max_recipients=2)
    codes = driver.codes(
        b"MAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<c@example.net>\r\n"
        b"DATA\r\nx\r\n.\r\n"
    )
    assert codes == [250, 250, 250, 250, 354, 250]
    assert [m.recipients for m in driver.messages] == [("b@example.net", "c@example.net")]


def test_a_duplicate_recipient_does_not_reset_the_error_count() -> None:
    """Regression: only an accepted message starts the error count afresh."""
    driver = Driver(max_errors=3)
    codes = driver.codes(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        + b"FOO\r\nRCPT TO:<b@example.net>\r\n" * 3
    )
    assert codes == [250, 250, 500, 250, 500, 250, 500, 421]


def test_refused_recipients_count_as_errors() -> None:
    """Defect: recipients the handler refused (550: no route) did not count toward
    max_errors, so one connection could probe recipients without end (directory
    harvesting); Postfix counts every failed command toward smtpd_hard_error_limit."""
    driver = Driver(max_errors=3)
    driver.on_recipient = lambda request: Reply(550, "5.1.1", "no route")
    codes = driver.codes(
        b"MAIL FROM:<a@example.org>\r\n"
        + b"".join(b"RCPT TO:<u%d@example.net>\r\n" % n for n in range(5))
    )
    assert codes == [250, 550, 550, 550, 421]
    assert driver.replies[-1] == Reply(421, "4.7.0", "mx.example Error: too many errors")
    assert driver.closed and len(driver.requests) == 4


def test_recipients_over_the_limit_are_not_errors() -> None:
    """Regression for the count above: 452 for recipients over max_recipients is no error,
    so a client that pipelined many recipients keeps its transaction (RFC 5321 4.5.3.1.10)."""
    driver = Driver(max_recipients=1, max_errors=3)
    codes = driver.codes(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        + b"".join(b"RCPT TO:<c%d@example.net>\r\n" % n for n in range(10))
        + b"DATA\r\nx\r\n.\r\n"
    )
    assert codes == [250, 250] + [452] * 10 + [354, 250]
    assert [m.recipients for m in driver.messages] == [("b@example.net",)]


def test_an_accepted_message_resets_the_error_count() -> None:
    """Defect: the error count never went down, so a long-lived relay connection was cut
    for mistakes spread over many good messages; Postfix's limits count errors "without
    delivering mail" and start afresh after each accepted message."""
    driver = Driver(max_errors=3)
    driver.on_recipient = lambda request: (
        Reply(550, "5.1.1", "no route") if "nobody" in request.recipient else None
    )
    for _ in range(5):
        codes = driver.codes(
            b"FOO\r\nMAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<nobody@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nx\r\n.\r\n"
        )
        assert codes == [500, 250, 550, 250, 354, 250]
    assert not driver.closed and len(driver.messages) == 5


def test_endless_junk_commands_end_the_session() -> None:
    """Defect: NOOP, RSET and VRFY restarted the idle timer for ever, so a client could hold
    a connection without sending mail; Postfix counts them as errors past
    smtpd_junk_command_limit (100), and closes at the hard error limit."""
    driver = Driver(max_errors=3, max_junk=5)
    codes = driver.codes(b"NOOP\r\nRSET\r\nVRFY <a@b.example>\r\n" * 3)
    assert codes == [250, 250, 252, 250, 250, 252, 250, 250, 421]
    assert driver.closed


def test_a_delivered_message_starts_the_junk_count_afresh() -> None:
    """Regression for the limit above: a relay that sends RSET or NOOP between its
    messages is never cut off (Postfix resets the count after mail is delivered)."""
    driver = Driver(max_errors=2, max_junk=2)
    for _ in range(20):
        codes = driver.codes(b"NOOP\r\nRSET\r\n" + TRANSACTION + b"x\r\n.\r\n")
        assert codes == [250, 250, 250, 250, 354, 250]
    assert not driver.closed and len(driver.messages) == 20


# ----------------------------------------------------------------------------- listener replies


def _answer(verdict: Verdict) -> Reply:
    config = SmtpListenerConfig(name="mail-in", listen=(), hostname="gw.test")
    gateway = FakePort(verdict=verdict)
    listener = SmtpListener(config, gateway, gateway.reactor)
    session = SmtpSession("192.0.2.7", 40000, "c.test", True, False)
    coroutine = listener.on_message(session, "a@example.org", ("b@example.net",), b"x\n")
    reply = asyncio.run(coroutine)  # type: ignore[arg-type]
    assert len(gateway.submitted) == 1
    return reply


@pytest.mark.parametrize("reason", list(Reason))
@pytest.mark.parametrize("status", [Status.PERMANENT, Status.TEMPORARY])
def test_every_refusal_is_answered_in_the_class_of_its_status(
    status: Status, reason: Reason
) -> None:
    """A message that was not stored is never acknowledged (2xx, 3xx), a permanent
    refusal is a 5xx and a temporary one a 4xx, and the enhanced status is of the same
    class as the reply code (RFC 3463 section 2), whatever the reason."""
    reply = _answer(Verdict(status, reason, "why"))
    klass = "5" if status is Status.PERMANENT else "4"
    assert str(reply.code).startswith(klass) and reply.status.startswith(klass + ".")
    assert b"why" in reply.to_bytes()


@pytest.mark.parametrize(
    ("reason", "code", "enhanced"),
    [
        (Reason.NO_ROUTE, 550, "5.1.1"),
        (Reason.POLICY, 550, "5.7.1"),
        (Reason.TOO_BIG, 552, "5.3.4"),
        (Reason.BAD_ADDRESS, 553, "5.1.3"),
        (Reason.MISCONFIGURED, 554, "5.3.5"),
    ],
)
def test_permanent_reasons_get_their_smtp_codes(reason: Reason, code: int, enhanced: str) -> None:
    reply = _answer(Verdict(Status.PERMANENT, reason, "why"))
    assert (reply.code, reply.status) == (code, enhanced)


def test_a_full_spool_is_452_and_other_temporary_failures_451() -> None:
    full = _answer(Verdict(Status.TEMPORARY, Reason.UNAVAILABLE, "disk full"))
    assert (full.code, full.status) == (452, "4.3.1")
    broken = _answer(Verdict(Status.TEMPORARY, Reason.FAILED, "a transform failed"))
    assert (broken.code, broken.status) == (451, "4.3.0")
