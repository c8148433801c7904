"""Tests for the sans-io SMTP codec: replies, parsers, dot-stuffing and the server state machine."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocols.smtp.codec import (
    AddressSyntaxError,
    MailRequest,
    MessageReceived,
    ParameterSyntaxError,
    RcptRequest,
    Reply,
    ReplyParser,
    SendReply,
    ServerCodec,
    SmtpSyntaxError,
    encode_message,
    is_valid_address,
    message_size,
    parse_command,
    parse_ehlo_extensions,
    parse_mail_argument,
    parse_rcpt_argument,
)


class Driver:
    """Runs a ServerCodec the way the Twisted shell does, answering requests from callables."""

    def __init__(self, codec: ServerCodec | None = None, **options: int) -> None:
        self.codec = codec or ServerCodec(
            hostname="mx.example", max_size=options.pop("max_size", 1000), **options
        )
        self.replies: list[Reply] = []
        self.messages: list[MessageReceived] = []
        self.requests: list[MailRequest | RcptRequest | MessageReceived] = []
        self.closed = False
        self.on_sender: Callable[[MailRequest], Reply | None] = lambda request: None
        self.on_recipient: Callable[[RcptRequest], Reply | None] = lambda request: None

    def feed(self, data: bytes) -> list[Reply]:
        start = len(self.replies)
        self.codec.receive_data(data)
        while (event := self.codec.next_event()) is not None:
            if isinstance(event, SendReply):
                self.replies.append(event.reply)
                self.closed = self.closed or event.close
                continue
            self.requests.append(event)
            if isinstance(event, MailRequest):
                self.codec.answer(self.on_sender(event))
            elif isinstance(event, RcptRequest):
                self.codec.answer(self.on_recipient(event))
            else:
                self.messages.append(event)
                self.codec.answer(Reply(250, "2.0.0", "Ok: queued"))
        return self.replies[start:]

    def codes(self, data: bytes) -> list[int]:
        return [reply.code for reply in self.feed(data)]


TRANSACTION = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


# ----------------------------------------------------------------------------- replies


def test_reply_single_line() -> None:
    assert Reply(250, "2.0.0", "Ok").to_bytes() == b"250 2.0.0 Ok\r\n"


def test_reply_multi_line_repeats_code_and_status() -> None:
    reply = Reply(250, "2.0.0", "line1\nline2\nline3")
    assert reply.to_bytes() == b"250-2.0.0 line1\r\n250-2.0.0 line2\r\n250 2.0.0 line3\r\n"


def test_reply_without_status_and_without_text() -> None:
    assert Reply(220, "", "mx.example ESMTP").to_bytes() == b"220 mx.example ESMTP\r\n"
    assert Reply(250, "", "").to_bytes() == b"250\r\n"


def test_reply_never_puts_8bit_or_stray_cr_on_the_wire() -> None:
    wire = Reply(550, "5.1.1", "unknown user \u00e9\r").to_bytes()
    assert wire == b"550 5.1.1 unknown user ?\r\n"


def test_reply_parser_multi_line_across_chunks() -> None:
    parser = ReplyParser()
    assert parser.receive_data(b"250-mx.example\r\n250-PIPE") == []
    assert parser.pending
    replies = parser.receive_data(b"LINING\r\n250 SIZE 100\r\n220 2.0.0 Ready\r\n")
    assert replies == [
        Reply(250, "", "mx.example\nPIPELINING\nSIZE 100"),
        Reply(220, "2.0.0", "Ready"),
    ]
    assert not parser.pending


def test_reply_parser_extracts_enhanced_status_only_when_class_matches() -> None:
    parser = ReplyParser()
    assert parser.receive_data(b"550 5.1.1 No such user\r\n") == [
        Reply(550, "5.1.1", "No such user")
    ]
    assert parser.receive_data(b"550 2.1.1 odd\r\n") == [Reply(550, "", "2.1.1 odd")]
    assert parser.receive_data(b"451-4.3.0 a\r\n451 4.3.0 b\r\n") == [Reply(451, "4.3.0", "a\nb")]
    assert parser.receive_data(b"250\n") == [Reply(250, "", "")]


@pytest.mark.parametrize(
    "line", [b"hello\r\n", b"25\r\n", b"250x\r\n", b"650 too high\r\n", b"\r\n"]
)
def test_reply_parser_rejects_malformed_lines(line: bytes) -> None:
    with pytest.raises(SmtpSyntaxError):
        ReplyParser().receive_data(line)


def test_reply_parser_limits_line_length() -> None:
    with pytest.raises(SmtpSyntaxError):
        ReplyParser(max_line_length=100).receive_data(b"250 " + b"x" * 200)


def test_ehlo_extensions() -> None:
    reply = Reply(250, "", "mx.example\npipelining\nSIZE 1000\n8BITMIME\nAUTH PLAIN LOGIN")
    assert parse_ehlo_extensions(reply) == {
        "PIPELINING": "",
        "SIZE": "1000",
        "8BITMIME": "",
        "AUTH": "PLAIN LOGIN",
    }


_LINE = st.from_regex(r"[A-Za-z][A-Za-z0-9 .,:<>]{0,40}[A-Za-z0-9]", fullmatch=True)


@given(
    code=st.integers(200, 599),
    lines=st.lists(_LINE, min_size=1, max_size=5),
    with_status=st.booleans(),
)
def test_reply_round_trip(code: int, lines: list[str], with_status: bool) -> None:
    status = f"{str(code)[0]}.1.2" if with_status and str(code)[0] in "245" else ""
    reply = Reply(code, status, "\n".join(lines))
    assert ReplyParser().receive_data(reply.to_bytes()) == [reply]


@given(st.binary(max_size=300))
def test_reply_parser_raises_only_its_error(data: bytes) -> None:
    try:
        ReplyParser().receive_data(data)
    except SmtpSyntaxError:
        pass


# ----------------------------------------------------------------------------- commands


def test_parse_command_is_case_insensitive_and_tolerant() -> None:
    assert parse_command(b"mail FROM:<a@b>") == parse_command(b"MAIL FROM:<a@b>")
    assert parse_command(b"Ehlo\tclient.example  ").argument == "client.example"
    assert parse_command(b"\xffhelo x").verb == "\xffhelo"  # never a known verb
    assert parse_command(b"  \t ").verb == ""
    assert parse_command(b"").verb == ""


def test_parse_mail_argument_forms() -> None:
    assert parse_mail_argument("FROM:<>") == ("", {})
    assert parse_mail_argument("from:<a@example.org>") == ("a@example.org", {})
    assert parse_mail_argument("FROM: <a@example.org>") == ("a@example.org", {})
    assert parse_mail_argument("FROM:a@example.org SIZE=5") == ("a@example.org", {"SIZE": "5"})
    assert parse_mail_argument('FROM:<"john doe"@example.org>')[0] == '"john doe"@example.org'
    assert parse_mail_argument('FROM:<"a>b\\"c"@example.org>')[0] == '"a>b\\"c"@example.org'
    assert parse_mail_argument("FROM:<@relay.example,@b.example:u@example.org>")[0] == (
        "u@example.org"
    )
    assert parse_mail_argument("FROM:<u@[192.0.2.1]> body=8bitmime size=10") == (
        "u@[192.0.2.1]",
        {"BODY": "8bitmime", "SIZE": "10"},
    )
    assert parse_mail_argument("FROM:<u@[IPv6:2001:db8::1]> RET")[1] == {"RET": None}


@pytest.mark.parametrize(
    "argument",
    [
        "FROM:<a@example.org",
        "FROM:<a>",
        "FROM:<a@>",
        "FROM:<@example.org>",
        "FROM:<a b@example.org>",
        "FROM:<a@exa mple.org>",
        "FROM:<a@-example.org>",
        "FROM:<a@[300.1.1.1]>",
        "FROM:<a@[IPv6:zz::1]>",
        "FROM:<\u00e9@example.org>",
        "FROM:<a@example.org>x",
        'FROM:<"unterminated@example.org>',
        "FROM:<@relay.example u@example.org>",
        "FROM:",
        "FROM:<<a@example.org>>",
    ],
)
def test_parse_mail_argument_rejects_bad_addresses(argument: str) -> None:
    with pytest.raises(AddressSyntaxError):
        parse_mail_argument(argument)


@pytest.mark.parametrize(
    "argument",
    [
        "<a@example.org>",
        "TO:<a@example.org>",
        "FROM:<a@b.example> SIZE=",
        "FROM:<a@b.c> A=1 a=2",
        "FROM:<a@b.c> -X=1",
        "FROM:<a@b.c> X=a=b",
    ],
)
def test_parse_mail_argument_rejects_bad_keyword_or_params(argument: str) -> None:
    with pytest.raises(ParameterSyntaxError):
        parse_mail_argument(argument)


def test_parse_rcpt_argument() -> None:
    assert parse_rcpt_argument("TO:<postmaster>") == ("postmaster", {})
    assert parse_rcpt_argument("to:<PostMaster>") == ("postmaster", {})
    assert parse_rcpt_argument("TO:<postmaster@example.org>")[0] == "postmaster@example.org"
    with pytest.raises(AddressSyntaxError):
        parse_rcpt_argument("TO:<>")
    with pytest.raises(AddressSyntaxError):
        parse_rcpt_argument("TO:<bob>")


def test_is_valid_address_allows_utf8_only_when_asked() -> None:
    assert not is_valid_address("j\u00f6rg@example.org")
    assert is_valid_address("j\u00f6rg@b\u00fccher.example", utf8=True)
    assert not is_valid_address("a@b\r\nRCPT TO:<c@d>", utf8=True)


@given(st.text(max_size=80))
def test_address_parsers_raise_only_syntax_errors(text: str) -> None:
    for parse in (parse_mail_argument, parse_rcpt_argument):
        for prefix in ("", "FROM:", "TO:", "FROM:<", "TO:<"):
            try:
                parse(prefix + text)
            except SmtpSyntaxError:
                pass


# ----------------------------------------------------------------------------- dot-stuffing


def test_encode_message_stuffs_dots_and_terminates() -> None:
    assert encode_message(b"a\n.b\n..c\n.\n") == b"a\r\n..b\r\n...c\r\n..\r\n.\r\n"
    assert encode_message(b"no final newline") == b"no final newline\r\n.\r\n"
    assert encode_message(b"") == b".\r\n"


def test_message_size_counts_crlf_not_stuffing() -> None:
    assert message_size(b"ab\n.c\n") == len(b"ab\r\n.c\r\n")
    assert message_size(b"ab") == 4
    assert message_size(b"") == 0


def _expected(body: bytes) -> bytes:
    return body if not body or body.endswith(b"\n") else body + b"\n"


def _receive(wire: bytes, cuts: list[int], max_size: int) -> Driver:
    driver = Driver(max_size=max_size)
    driver.feed(TRANSACTION)
    assert driver.replies[-1].code == 354
    points = sorted({cut % (len(wire) + 1) for cut in cuts})
    start = 0
    for point in [*points, len(wire)]:
        driver.feed(wire[start:point])
        start = point
    return driver


_BODY = st.binary(max_size=400) | st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"..", b"a", b".\r\n", b"\n.\n"]), max_size=40
).map(b"".join)


@given(body=_BODY, cuts=st.lists(st.integers(0, 10_000), max_size=8))
@settings(max_examples=300)
def test_any_body_survives_stuffing_and_unstuffing(body: bytes, cuts: list[int]) -> None:
    driver = _receive(encode_message(body), cuts, max_size=0)
    assert [message.data for message in driver.messages] == [_expected(body)]
    assert driver.replies[-1] == Reply(250, "2.0.0", "Ok: queued")


@given(body=_BODY.filter(bool), cuts=st.lists(st.integers(0, 10_000), max_size=4))
def test_size_limit_is_exact(body: bytes, cuts: list[int]) -> None:
    size = message_size(body)
    fits = _receive(encode_message(body), cuts, max_size=size)
    assert [message.data for message in fits.messages] == [_expected(body)]
    too_big = _receive(encode_message(body), cuts, max_size=size - 1) if size > 1 else None
    if too_big is not None:
        assert too_big.messages == []
        assert too_big.replies[-1].code == 552


# ----------------------------------------------------------------------------- server state machine


def test_ehlo_advertises_exactly_what_is_supported() -> None:
    driver = Driver(max_size=10_240_000)
    (reply,) = driver.feed(b"EHLO client.example\r\n")
    assert reply.to_bytes() == (
        b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
        b"250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
    )
    assert driver.codec.helo == "client.example" and driver.codec.esmtp


def test_helo_works_and_mail_needs_no_helo() -> None:
    driver = Driver()
    assert driver.feed(b"HELO client.example\r\n") == [Reply(250, "", "mx.example")]
    assert not driver.codec.esmtp
    fresh = Driver()
    assert fresh.codes(TRANSACTION) == [250, 250, 354]


def test_full_transaction_and_message_content() -> None:
    driver = Driver()
    replies = driver.feed(TRANSACTION + b"Subject: x\r\n\r\n..dot\r\nbare\nend\r\n.\r\nQUIT\r\n")
    assert [(r.code, r.status) for r in replies] == [
        (250, "2.1.0"),
        (250, "2.1.5"),
        (354, ""),
        (250, "2.0.0"),
        (221, "2.0.0"),
    ]
    assert replies[2].text == "End data with <CR><LF>.<CR><LF>"
    (message,) = driver.messages
    assert message.sender == "a@example.org"
    assert message.recipients == ("b@example.net",)
    assert message.data == b"Subject: x\n\n.dot\nbare\nend\n"
    assert driver.closed and driver.codec.closed


def test_bare_lf_dot_does_not_end_the_data() -> None:
    # Only CRLF "." CRLF ends it (SMTP smuggling; tests/unit/test_smtp_review.py has more).
    driver = Driver()
    driver.feed(TRANSACTION + b"one\n.\n")
    assert driver.messages == []
    driver.feed(b"two\r\n.\r\n")
    assert [m.data for m in driver.messages] == [b"one\n\ntwo\n"]


def test_input_after_quit_is_ignored() -> None:
    driver = Driver()
    assert driver.codes(b"QUIT\r\nNOOP\r\n") == [221]
    assert driver.codes(b"NOOP\r\n") == []


@pytest.mark.parametrize(
    ("line", "code", "status"),
    [
        (b"NOOP", 250, "2.0.0"),
        (b"NOOP whatever", 250, "2.0.0"),
        (b"RSET", 250, "2.0.0"),
        (b"RSET now", 501, "5.5.4"),
        (b"VRFY bob", 252, "2.0.0"),
        (b"VRFY", 501, "5.5.4"),
        (b"HELP", 214, "2.0.0"),
        (b"QUIT", 221, "2.0.0"),
        (b"", 500, "5.5.2"),
        (b"   ", 500, "5.5.2"),
        (b"FOO bar", 500, "5.5.2"),
        (b"STARTTLS", 502, "5.5.1"),
        (b"\xff\xfe", 500, "5.5.2"),
        (b"HELO", 501, "5.5.4"),
        (b"EHLO h\xe9llo", 501, "5.5.4"),
        (b"RCPT TO:<b@example.net>", 503, "5.5.1"),
        (b"DATA", 503, "5.5.1"),
        (b"MAIL TO:<a@example.org>", 501, "5.5.4"),
        (b"MAIL FROM:<a b>", 501, "5.1.7"),
        (b"MAIL FROM:<\xe9@example.org>", 501, "5.1.7"),
        (b"MAIL FROM:<a@example.org> SIZE=abc", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> SIZE", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> BODY=BINARYMIME", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> AUTH=<>", 555, "5.5.4"),
        (b"MAIL FROM:<a@example.org> SIZE=1001", 552, "5.3.4"),
        (b"MAIL FROM:<a@example.org> SIZE=1000 BODY=8bitmime", 250, "2.1.0"),
        (b"MAIL FROM:<>", 250, "2.1.0"),
    ],
)
def test_single_command_replies(line: bytes, code: int, status: str) -> None:
    (reply,) = Driver(max_size=1000).feed(line + b"\r\n")
    assert (reply.code, reply.status) == (code, status)


def test_size_rejection_text() -> None:
    (reply,) = Driver(max_size=10).feed(b"MAIL FROM:<a@example.org> SIZE=11\r\n")
    assert reply == Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")


def test_mail_params_reach_the_handler_upper_cased() -> None:
    driver = Driver()
    driver.feed(b"MAIL FROM:<a@example.org> size=10 body=7BIT\r\n")
    assert driver.requests == [MailRequest("a@example.org", {"SIZE": "10", "BODY": "7BIT"})]


def test_nested_mail() -> None:
    driver = Driver()
    assert driver.codes(b"MAIL FROM:<a@example.org>\r\nMAIL FROM:<c@example.org>\r\n") == [250, 503]
    assert driver.replies[-1].text == "Error: nested MAIL command"


def test_rcpt_errors() -> None:
    driver = Driver()
    driver.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert driver.feed(b"RCPT TO:<bob>\r\n") == [
        Reply(501, "5.1.3", "Bad recipient address syntax")
    ]
    assert driver.codes(b"RCPT <b@example.net>\r\n") == [501]
    assert driver.codes(b"RCPT TO:<b@example.net> NOTIFY=NEVER\r\n") == [555]
    assert driver.codes(b"RCPT TO:<Postmaster>\r\n") == [250]
    assert driver.requests[-1] == RcptRequest("a@example.org", "postmaster", {})


def test_too_many_recipients() -> None:
    driver = Driver(max_recipients=2)
    driver.feed(b"MAIL FROM:<a@example.org>\r\n")
    codes = driver.codes(
        b"RCPT TO:<b1@example.net>\r\nRCPT TO:<b2@example.net>\r\nRCPT TO:<b3@example.net>\r\n"
    )
    assert codes == [250, 250, 452]
    assert driver.replies[-1] == Reply(452, "4.5.3", "Too many recipients")


def test_data_without_recipients() -> None:
    driver = Driver()
    driver.on_recipient = lambda request: Reply(550, "5.1.1", "no such user")
    assert driver.codes(b"MAIL FROM:<a@example.org>\r\nDATA\r\n") == [250, 503]
    assert driver.codes(b"RCPT TO:<b@example.net>\r\nDATA\r\n") == [550, 554]
    assert driver.replies[-1] == Reply(554, "5.5.1", "Error: no valid recipients")


def test_data_with_argument() -> None:
    driver = Driver()
    assert driver.codes(TRANSACTION.replace(b"DATA", b"DATA now")) == [250, 250, 501]


def test_refused_sender_opens_no_transaction() -> None:
    driver = Driver()
    driver.on_sender = lambda request: Reply(550, "5.7.1", "go away")
    assert driver.codes(TRANSACTION) == [550, 503, 503]


def test_rset_and_ehlo_reset_the_transaction() -> None:
    for reset in (b"RSET\r\n", b"EHLO again\r\n", b"HELO again\r\n"):
        driver = Driver()
        codes = driver.codes(
            b"MAIL FROM:<a@example.org>\r\n" + reset + b"RCPT TO:<b@example.net>\r\n"
        )
        assert codes == [250, 250, 503]


def test_handler_421_closes_the_session() -> None:
    driver = Driver()
    driver.on_sender = lambda request: Reply(421, "4.3.2", "mx.example shutting down")
    assert driver.codes(TRANSACTION) == [421]
    assert driver.closed


def test_message_over_max_size_is_discarded_while_streaming() -> None:
    driver = Driver(max_size=100)
    driver.feed(TRANSACTION)
    for _ in range(1000):
        driver.feed(b"x" * 98 + b"\r\n")
    # Nothing is kept once the limit is passed.
    assert driver.codec._sink is None
    assert driver.feed(b".\r\nNOOP\r\n") == [
        Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"),
        Reply(250, "2.0.0", "Ok"),
    ]
    assert driver.messages == []
    assert driver.codes(b"RCPT TO:<b@example.net>\r\n") == [503]


def test_long_data_lines_are_accepted() -> None:
    driver = Driver(max_size=100_000)
    line = b"y" * 50_000
    driver.feed(TRANSACTION + line[:20_000])
    driver.feed(line[20_000:] + b"\r\n.\r\n")
    assert [m.data for m in driver.messages] == [line + b"\n"]


def test_line_too_long_then_session_continues() -> None:
    driver = Driver()
    assert driver.codes(b"NOOP " + b"x" * 2043 + b"\r\n") == [250]
    assert driver.codes(b"NOOP " + b"x" * 2044 + b"\r\n") == [500]
    assert driver.replies[-1] == Reply(500, "5.5.2", "Error: line too long")
    driver.feed(b"NOOP " + b"x" * 5000)
    assert driver.codec._buffer == bytearray()
    assert driver.codes(b"x" * 5000 + b"\r\nNOOP\r\n") == [500, 250]


def test_too_many_errors_closes_with_421() -> None:
    driver = Driver(max_errors=3)
    codes = driver.codes(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert codes == [500, 500, 500, 421]
    assert driver.replies[-1] == Reply(421, "4.7.0", "mx.example Error: too many errors")
    assert driver.closed


def test_pipelined_input_waits_for_the_answer() -> None:
    codec = ServerCodec(hostname="mx.example", max_size=1000)
    codec.receive_data(TRANSACTION)
    assert codec.next_event() == MailRequest("a@example.org", {})
    assert codec.next_event() is None
    assert codec.next_event() is None
    codec.answer(None)
    assert codec.next_event() == SendReply(Reply(250, "2.1.0", "Ok"))
    assert isinstance(codec.next_event(), RcptRequest)
    assert codec.next_event() is None
    codec.answer(None)
    assert codec.next_event() == SendReply(Reply(250, "2.1.5", "Ok"))
    assert codec.next_event() == SendReply(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))


def test_answer_without_request_and_message_without_reply() -> None:
    codec = ServerCodec(hostname="mx.example", max_size=1000)
    with pytest.raises(RuntimeError):
        codec.answer(None)
    codec.receive_data(TRANSACTION + b".\r\n")
    while not isinstance(event := codec.next_event(), MessageReceived):
        if not isinstance(event, SendReply):
            codec.answer(None)
    with pytest.raises(ValueError):
        codec.answer(None)


def test_timeout_and_abort_replies() -> None:
    codec = ServerCodec(hostname="mx.example", max_size=1000)
    assert codec.timeout() == Reply(421, "4.4.2", "mx.example Error: timeout exceeded")
    assert codec.closed
    assert ServerCodec(hostname="h", max_size=1).abort().code == 421


_COMMAND_LINE = st.one_of(
    st.binary(max_size=60),
    st.tuples(
        st.sampled_from(
            [
                b"MAIL FROM:",
                b"RCPT TO:",
                b"DATA",
                b"EHLO",
                b"HELO",
                b"RSET",
                b"VRFY",
                b"mail from:<",
                b"rcpt to:<",
                b"NOOP",
                b"QUIT",
            ]
        ),
        st.binary(max_size=40),
    ).map(b"".join),
)


@given(st.lists(_COMMAND_LINE, max_size=30), st.sampled_from([b"\r\n", b"\n"]))
@settings(max_examples=300)
def test_random_command_lines_never_raise(lines: list[bytes], ending: bytes) -> None:
    driver = Driver(max_errors=1000)
    for line in lines:
        for reply in driver.feed(line.replace(b"\n", b"") + ending):
            assert reply.code in {
                214,
                221,
                250,
                252,
                354,
                421,
                452,
                500,
                501,
                502,
                503,
                552,
                554,
                555,
            }
            assert reply.status or reply.code in (250, 354)


@given(st.lists(st.binary(max_size=200), max_size=20))
def test_random_byte_streams_never_raise(chunks: list[bytes]) -> None:
    driver = Driver(max_errors=5)
    for chunk in chunks:
        driver.feed(chunk)


def test_codec_imports_without_twisted() -> None:
    code = (
        "import sys, gateway.protocols.smtp.codec as c; "
        "assert not [m for m in sys.modules if m.startswith('twisted')], 'twisted imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


SMUGGLED = b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nforged\r\n"


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
