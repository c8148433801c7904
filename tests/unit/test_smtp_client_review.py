"""Review of the outbound SMTP client: misbehaving peers and awkward data, in memory."""

from __future__ import annotations

import re

from tests.unit.test_smtp_client import Env, Script, ScriptedFactory, codes


def _one_outcome(result: object) -> int:
    flags = [getattr(result, name) for name in ("delivered", "temporary", "permanent")]
    return sum(bool(flag) for flag in flags)


def test_data_answered_250_is_not_delivered() -> None:
    """Defect: a 2xx reply to DATA (the message was never sent) was counted as delivered."""
    script = Script()
    script.replies[b"DATA"] = b"250 2.0.0 Ok\r\n"
    env = Env(ScriptedFactory(script))
    (result,) = env.send()
    assert not result.delivered and result.temporary
    assert env.server().body == []


def test_unexpected_reply_classes_are_temporary() -> None:
    """Defect: 1xx/3xx replies (RFC 5321 4.2.1: not valid there) counted as delivered."""
    for stage, reply in (
        ("greeting", b"120 2.0.0 come back later\r\n"),
        ("MAIL", b"354 go ahead\r\n"),
        ("RCPT", b"354 go ahead\r\n"),
        ("end", b"354 what\r\n"),
    ):
        script = Script(extensions=[b"SIZE 100000"])
        if stage == "greeting":
            script.greeting = reply
        elif stage == "end":
            script.end_of_data = reply
        else:
            script.replies[stage.encode()] = reply
        env = Env(ScriptedFactory(script))
        (result,) = env.send()
        assert _one_outcome(result) == 1, (stage, result)
        assert result.temporary and not result.delivered, (stage, result)


def test_inconsistent_multiline_reply_is_not_success() -> None:
    """Defect: "250-...\\r\\n550 ..." was read as 250 (first line); RFC 5321 4.2.1 needs one code."""
    env = Env(ScriptedFactory(Script(end_of_data=b"250-2.0.0 fine\r\n550 5.7.1 refused\r\n")))
    (result,) = env.send()
    assert not result.delivered and result.temporary


def _wire_body(env: Env) -> bytes:
    data = b"".join(env.server().chunks)
    return data.split(b"DATA\r\n", 1)[1]


def test_bare_cr_and_crlf_are_sent_as_crlf() -> None:
    """Defect: bare CR and CRLF line ends in a stored message went out as bare CR (RFC 5321 2.3.8)."""
    env = Env(ScriptedFactory(Script()))
    data = b"Subject: x\r\n\r\none\rtwo\r\n.dot\rthree\n"
    assert codes(env.send(data=data)) == [250]
    wire = _wire_body(env)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None, wire
    assert wire == b"Subject: x\r\n\r\none\r\ntwo\r\n..dot\r\nthree\r\n.\r\n"
    size = int(re.search(rb"SIZE=(\d+)", b"".join(env.server().chunks)).group(1))  # type: ignore[union-attr]
    assert size == len(b"Subject: x\r\n\r\none\r\ntwo\r\n.dot\r\nthree\r\n")


def test_long_lines_are_folded_like_postfix() -> None:
    """Defect: lines over 998 octets went out unchanged (RFC 5321 4.5.3.1.6); they are now folded."""
    env = Env(ScriptedFactory(Script()))
    long = b"x" * 2500
    assert codes(env.send(data=b"Subject: l\n\n" + long + b"\nend")) == [250]
    wire = _wire_body(env)
    lines = wire.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    assert b"".join(line.lstrip(b" ") for line in lines[2:-3]) == long
    assert lines[-3:] == [b"end", b".", b""]


def test_final_reply_waits_ten_minutes() -> None:
    """Defect: the reply after the data timed out with command_timeout (5 min), not 10 (RFC 5321 4.5.3.2.6)."""
    script = Script(end_of_data=None)
    env = Env(ScriptedFactory(script), command_timeout=300)
    sending = env.start()
    env.endpoint.pump()
    env.clock.advance(400)
    env.endpoint.pump()
    assert not sending.called
    env.server().transport.write(b"250 2.0.0 Ok: queued\r\n")
    assert codes(env.wait(sending)) == [250]


def test_reused_connection_closed_by_server_retries_on_a_new_one() -> None:
    """Defect: a pooled session that the server had timed out (421 to MAIL) failed the next message."""
    mail_replies = iter([b"250 2.1.0 Ok\r\n", b"421 4.4.2 timeout exceeded\r\n"])
    script = Script()

    class Replies(dict[bytes, bytes | None]):
        def get(self, key: bytes, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
            if key == b"MAIL":
                return next(mail_replies, b"250 2.1.0 Ok\r\n")
            return super().get(key, default)

    script.replies = Replies(script.replies)
    env = Env(ScriptedFactory(script))
    assert codes(env.send()) == [250]
    assert codes(env.send()) == [250]
    assert env.endpoint.connects == 2
    assert len(env.server().body) > 0


def test_reused_connection_lost_before_mail_reply_retries() -> None:
    """Defect: a pooled session closed by the server just as MAIL went out lost the message's try."""
    script = Script(extensions=[b"SIZE 100000"])
    env = Env(ScriptedFactory(script))
    assert codes(env.send()) == [250]
    script.replies[b"MAIL"] = None
    sending = env.start()
    env.endpoint.pump()
    script.replies[b"MAIL"] = b"250 2.1.0 Ok\r\n"
    env.server().transport.loseConnection()
    assert codes(env.wait(sending)) == [250]
    assert env.endpoint.connects == 2
