"""What the fuzzers drive: each harness takes arbitrary bytes and fails only on a bug.

A harness feeds the bytes to one parser the way the gateway does (in pieces,
answering the requests it raises) and lets through only the errors that
parser documents for bad input (a ParseError, a WireError, a ConfigError
...). Anything else escaping, a reply that is not valid on the wire, or an
answer that breaks the protocol's own rules is a crash. ``tests/fuzz/run.py``
runs them under atheris (coverage-guided); ``test_fuzz.py`` replays the
corpus and runs each one briefly.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

HARNESSES: dict[str, Callable[[bytes], None]] = {}


def harness(function: Callable[[bytes], None]) -> Callable[[bytes], None]:
    HARNESSES[function.__name__] = function
    return function


def pieces(data: bytes) -> Iterator[bytes]:
    """``data`` cut where its first octet says, so that every split point gets tried."""
    if not data:
        return
    step = data[0] % 17 + 1
    body = data[1:]
    for start in range(0, len(body), step):
        yield body[start : start + step]


def _check_wire_line(wire: bytes, *, utf8: bool = False) -> None:
    """CRLF-terminated lines with no stray CR or LF; ASCII (SMTP) or UTF-8 (NNTP, RFC 3977)."""
    assert wire.endswith(b"\r\n"), wire
    if utf8:
        wire.decode("utf-8")
    else:
        assert all(byte < 128 for byte in wire), wire
    for line in wire[:-2].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line, wire


# --------------------------------------------------------------------------- SMTP


@harness
def smtp_server(data: bytes) -> None:
    from gateway.protocols.smtp.codec import (
        AuthRequest,
        MailRequest,
        MessageReceived,
        RcptRequest,
        Reply,
        SendReply,
        ServerCodec,
    )

    flags = data[0] if data else 0
    codec = ServerCodec(
        hostname="gw.test",
        max_size=4096 if flags & 1 else 0,
        max_recipients=3,
        max_line_length=512,
        starttls=bool(flags & 2),
        require_tls=bool(flags & 2 and flags & 4),
        auth=bool(flags & 8),
        require_auth=bool(flags & 8 and flags & 16),
    )
    codec.auth_insecure = bool(flags & 32)
    answers = 0
    for piece in pieces(data):
        codec.receive_data(piece)
        while (event := codec.next_event()) is not None:
            if isinstance(event, SendReply):
                _check_wire_line(event.reply.to_bytes())
                if event.start_tls:
                    assert codec.tls and codec.buffered == 0
                continue
            answers += 1
            refuse = (flags >> 6) & 1 and answers % 2 == 0
            if isinstance(event, (MailRequest, RcptRequest)):
                codec.answer(Reply(550, "5.7.1", "no") if refuse else None)
            elif isinstance(event, AuthRequest):
                assert event.user.isprintable(), event
                codec.answer(Reply(535, "5.7.8", "no") if refuse else Reply(235, "2.7.0", "ok"))
            elif isinstance(event, MessageReceived):
                assert event.recipients and len(event.recipients) <= 3
                codec.answer(Reply(250, "2.0.0", "queued"))
            else:
                raise AssertionError(f"unknown event {event!r}")
        if codec.closed:
            break


@harness
def smtp_replies(data: bytes) -> None:
    from gateway.protocols.smtp.codec import ReplyParser, SmtpSyntaxError, parse_ehlo_extensions

    parser = ReplyParser(max_line_length=1024)
    try:
        for piece in pieces(data):
            for reply in parser.receive_data(piece):
                assert 200 <= reply.code <= 599 or 100 <= reply.code <= 199, reply
                if reply.code == 250:
                    parse_ehlo_extensions(reply)
    except SmtpSyntaxError:
        pass


# --------------------------------------------------------------------------- NNTP


@harness
def nntp_server(data: bytes) -> None:
    from gateway.protocols.nntp.codec import (
        ArticleReceived,
        AuthRequest,
        OfferRequest,
        Response,
        SendResponse,
        ServerCodec,
    )

    flags = data[0] if data else 0
    codec = ServerCodec(
        hostname="gw.test",
        posting=bool(flags & 1),
        auth_available=bool(flags & 2),
        auth_required=bool(flags & 2 and flags & 4),
        max_size=4096 if flags & 8 else 0,
        clock=lambda: 1_800_000_000.0,
        starttls=bool(flags & 16),
        require_tls=bool(flags & 16 and flags & 32),
    )
    answers = 0
    for piece in pieces(data):
        codec.receive_data(piece)
        while (event := codec.next_event()) is not None:
            if isinstance(event, SendResponse):
                _check_wire_line(event.response.to_bytes(), utf8=True)
                continue
            answers += 1
            refuse = (flags >> 6) & 1 and answers % 2 == 0
            if isinstance(event, AuthRequest):
                codec.answer(Response(481 if refuse else 281, "auth"))
            elif isinstance(event, OfferRequest):
                if event.command == "IHAVE":
                    codec.answer(Response(435 if refuse else 335, "offer"))
                else:
                    codec.answer(Response(438 if refuse else 238, f"{event.message_id} offer"))
            elif isinstance(event, ArticleReceived):
                assert flags & 8 == 0 or len(event.data) <= 4096 + 4096
                code = {"POST": 240, "IHAVE": 235, "TAKETHIS": 239}[event.command]
                text = f"{event.message_id} ok" if event.command == "TAKETHIS" else "ok"
                codec.answer(Response(code, text))
            else:
                raise AssertionError(f"unknown event {event!r}")
        if codec.closed:
            break


@harness
def nntp_replies(data: bytes) -> None:
    from twisted.internet.testing import StringTransport

    from gateway.protocols.nntp.client import _NntpClientProtocol

    keywords = ("", "ARTICLE", "GROUP", "OVER", "CAPABILITIES", "LIST", "POST", "TAKETHIS")
    protocol = _NntpClientProtocol(max_block_size=4096)
    protocol.makeConnection(StringTransport())
    failures: list[object] = []
    for index in range(data[0] % 6 if data else 0):
        waiter = protocol.expect(keywords[(data[index + 1] if index + 1 < len(data) else 0) % 8])
        waiter.addErrback(failures.append)
    for piece in pieces(data):
        protocol.dataReceived(piece)
    for failure in failures:
        name = type(failure.value).__name__  # type: ignore[attr-defined]
        assert name in ("_Malformed", "_Lost"), failure


# --------------------------------------------------------------------------- HTTP


@harness
def http_server(data: bytes) -> None:
    from gateway.protocols.http.codec import Head, ParseError, RequestReader

    reader = RequestReader(max_header_size=2048)
    try:
        for piece in pieces(data):
            reader.receive(piece)
            for _ in range(1000):
                event = reader.next_event()
                if event is None:
                    break
                if isinstance(event, Head):
                    assert event.method and event.target, event
        reader.receive_eof()
        for _ in range(1000):
            if reader.next_event() is None:
                break
    except ParseError as exc:
        assert 400 <= exc.status <= 599, exc


@harness
def http_client(data: bytes) -> None:
    from gateway.protocols.http.codec import Head, ParseError, ResponseReader

    reader = ResponseReader(max_header_size=2048)
    reader.expect((b"GET", b"HEAD", b"POST")[data[0] % 3 if data else 0])
    try:
        for piece in pieces(data):
            reader.receive(piece)
            for _ in range(1000):
                event = reader.next_event()
                if event is None:
                    break
                if isinstance(event, Head):
                    assert 100 <= event.status <= 999, event
        reader.receive_eof()
        for _ in range(1000):
            if reader.next_event() is None:
                break
    except ParseError as exc:
        assert 400 <= exc.status <= 599, exc


# --------------------------------------------------------------------------- DNS


@harness
def dns_wire(data: bytes) -> None:
    from gateway.protocols.dns import wire

    try:
        question = wire.parse_query(data)
    except wire.WireError as exc:
        if exc.header_ok:
            wire.error_response(data, wire.FORMERR, getattr(exc, "question", None))
    else:
        assert question.question_end <= len(data)
        refused = wire.error_response(data, wire.REFUSED, question)
        assert wire.parse_query(refused[:2] + bytes([refused[2] & 0x7F]) + refused[3:])
    for function in (
        wire.inspect_response,
        wire.parse_response_question,
        wire.ecs_scope,
        lambda d: wire.truncate(d, 512),
        lambda d: wire.without_option(d, 8),
    ):
        try:
            function(data)
        except wire.WireError:
            pass


# --------------------------------------------------------------------------- routes.yaml

_BASE = Path(tempfile.gettempdir()) / "gateway-fuzz-routes"


@harness
def routes_yaml(data: bytes) -> None:
    from gateway.config import ConfigError, parse

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        parse(text, "routes.yaml", _BASE)
    except ConfigError as exc:
        for problem in exc.problems:
            assert str(problem), exc
