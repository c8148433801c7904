"""Defects found reviewing the SMTP listener, checked against a real gateway process."""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.test_smtp_gateway import (
    maildir_messages,
    sink,  # noqa: F401  (a fixture the gateway fixture needs)
    start_gateway,
    wait_maildir,
)
from tests.peers import SmtpSink, SwaksExit, data_reply_code, sendmail_raw, swaks_send

REFUSING_PLUGIN = """
from gateway.plugins import Reject, transform

@transform("refuse")
def refuse(msg, options):
    raise Reject("refused by policy")
"""

REFUSING_ROUTE = """
  - name: refused
    from: mail-in
    match: {rcpt: '@refused\\.test$'}
    transforms: [refuse]
    to: box
"""


def _codes(reply: bytes) -> list[str]:
    text = reply.decode("latin-1")
    return [line[:3] for line in text.splitlines() if line[3:4] == " "]


def test_smuggled_transaction_after_bare_lf_dot_is_content(
    tmp_path: Path,
    sink: SmtpSink,  # noqa: F811
) -> None:
    """Defect: "\\n.\\n" (and "\\n.\\r\\n") ended the DATA, so a sender whose outbound MTA
    passes bare LFs through could append a second transaction with a forged sender to
    the message (SMTP smuggling). Only CRLF.CRLF may end it (RFC 5321 4.1.1.4)."""
    gw, port = start_gateway(tmp_path, sink.port)
    try:
        reply = sendmail_raw(
            port,
            b"EHLO relay.client.test\r\n"
            b"MAIL FROM:<mallory@client.test>\r\n"
            b"RCPT TO:<alice@local.test>\r\n"
            b"DATA\r\n"
            b"Subject: harmless\r\n\r\nhello\n.\n"
            b"MAIL FROM:<ceo@bank.test>\r\n"
            b"RCPT TO:<bob@local.test>\r\n"
            b"DATA\r\n"
            b"Subject: forged\r\n\r\npay now\n.\r\n"
            b"still the first message\r\n"
            b".\r\n"
            b"QUIT\r\n",
        )
        assert _codes(reply) == ["220", "250", "250", "250", "354", "250", "221"], reply
        [boxed] = wait_maildir(tmp_path, 1)
        assert boxed["Return-Path"] == "<mallory@client.test>"
        assert boxed.get_all("Delivered-To") == ["alice@local.test"]
        body = boxed.get_payload()
        assert isinstance(body, str)
        assert "MAIL FROM:<ceo@bank.test>" in body and "still the first message" in body
        time.sleep(0.5)
        assert len(maildir_messages(tmp_path)) == 1
        assert "bob@local.test" not in gw.log_text()
    finally:
        gw.stop()


def test_a_transform_refusal_is_a_5xx_and_the_session_goes_on(
    tmp_path: Path,
    sink: SmtpSink,  # noqa: F811
) -> None:
    """A transform's Reject is a permanent refusal in SMTP's words (550 5.7.1 for a
    policy refusal), never a success: nothing was stored. (It once was answered with a
    code the plugin chose, 250 included.)"""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "refusing.py").write_text(REFUSING_PLUGIN)
    gw, port = start_gateway(tmp_path, sink.port, extra_routes=REFUSING_ROUTE)
    try:
        code, transcript = swaks_send(port, "carol@refused.test")
        assert code == SwaksExit.MESSAGE_REJECTED, transcript
        assert data_reply_code(transcript) == 550, transcript
        assert "550 5.7.1 refused by policy" in transcript
        # The session's next message is handled as usual.
        code, transcript = swaks_send(port, "dave@local.test")
        assert code == SwaksExit.OK, transcript
        [boxed] = wait_maildir(tmp_path, 1)
        assert boxed.get_all("Delivered-To") == ["dave@local.test"]
    finally:
        gw.stop()


def test_recipient_probing_is_cut_off_after_max_errors(
    tmp_path: Path,
    sink: SmtpSink,  # noqa: F811
) -> None:
    """Defect: refused recipients did not count as errors: one connection could try
    recipients without end (directory harvesting). Postfix counts them toward
    smtpd_hard_error_limit (20) and ends the session with 421 4.7.0."""
    gw, port = start_gateway(tmp_path, sink.port)
    try:
        probes = b"".join(b"RCPT TO:<guess%d@elsewhere.test>\r\n" % n for n in range(40))
        reply = sendmail_raw(
            port, b"EHLO c.test\r\nMAIL FROM:<a@client.test>\r\n" + probes, until=421
        )
        codes = _codes(reply)
        assert codes == ["220", "250", "250"] + ["550"] * 20 + ["421"], reply
        assert b"421 4.7.0 gw.test Error: too many errors" in reply
    finally:
        gw.stop()
