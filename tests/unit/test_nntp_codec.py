"""The sans-io NNTP codec: lines, commands, responses, data blocks and their limits."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocols.nntp.codec import (
    ArticleReceived,
    Block,
    Command,
    LineTooLong,
    NntpError,
    NntpSyntaxError,
    Response,
    SendResponse,
    ServerCodec,
    StreamReader,
    decode_block,
    encode_block,
    encode_lines,
    format_command,
    is_message_id,
    normalise_block,
    parse_capabilities,
    parse_command,
    parse_response,
    response_has_block,
)

# Article-like bytes: lots of line breaks, dots, CRs and 8-bit bytes.
_ARTICLE_BYTES = st.lists(
    st.sampled_from([b"\n", b".", b"\r", b"..", b"a", b"\xff", b" ", b"\r\n", b".\n", b"\x00"])
    | st.binary(max_size=20),
    max_size=60,
).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    last = 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def _read_all_blocks(reader: StreamReader, pieces: list[bytes], count: int = 1) -> list[Block]:
    """Feed the pieces, reading up to ``count`` blocks; later bytes stay buffered."""
    blocks: list[Block] = []
    for piece in pieces:
        reader.receive_data(piece)
        while len(blocks) < count and (block := reader.read_block()) is not None:
            blocks.append(block)
    return blocks


# --------------------------------------------------------------------------- blocks


def test_encode_block_stuffs_dots_and_uses_crlf() -> None:
    assert encode_block(b".a\nb\n..\n.\n") == b"..a\r\nb\r\n...\r\n..\r\n.\r\n"
    assert encode_block(b"") == b".\r\n"
    assert encode_block(b"\n") == b"\r\n.\r\n"


def test_final_line_without_newline_gets_one() -> None:
    assert encode_block(b"abc") == b"abc\r\n.\r\n"
    assert decode_block(encode_block(b"abc")) == b"abc\n"
    assert normalise_block(b"abc") == b"abc\n"
    assert normalise_block(b"") == b""


def test_cr_before_lf_survives() -> None:
    assert encode_block(b"a\r\n") == b"a\r\r\n.\r\n"
    assert decode_block(b"a\r\r\n.\r\n") == b"a\r\n"


def test_decode_accepts_bare_lf_and_unstuffs() -> None:
    assert decode_block(b"..x\n.y\nz\r\n.\n") == b".x\ny\nz\n"


def test_decode_block_errors() -> None:
    with pytest.raises(NntpError, match="terminating"):
        decode_block(b"abc\r\n")
    with pytest.raises(NntpError, match="follow"):
        decode_block(b".\r\nextra")


def test_dot_lines_that_are_not_the_terminator() -> None:
    # ".\r" followed by more text is not the end; "." alone at the end of a chunk waits.
    reader = StreamReader()
    reader.receive_data(b"a\r\n.")
    assert reader.read_block() is None
    reader.receive_data(b"\rX\r\n")
    assert reader.read_block() is None
    reader.receive_data(b".\r")
    assert reader.read_block() is None
    reader.receive_data(b"\nQUIT\r\n")
    block = reader.read_block()
    assert block == Block(b"a\n\rX\n", 5)
    assert reader.read_line() == b"QUIT"


@settings(max_examples=400, deadline=None)
@given(_ARTICLE_BYTES)
def test_any_article_round_trips(data: bytes) -> None:
    wire = encode_block(data)
    assert decode_block(wire) == normalise_block(data)
    # The terminator is the only line that is a single dot.
    assert wire.endswith(b".\r\n")
    lines = wire[:-3].split(b"\r\n")
    assert b"." not in lines[:-1]


@settings(max_examples=300, deadline=None)
@given(st.lists(_ARTICLE_BYTES, min_size=1, max_size=4), st.lists(st.integers(0, 10_000)))
def test_any_split_gives_the_same_blocks(articles: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_block(a) + b"TAKETHIS <x@y>\r\n" for a in articles)
    reader = StreamReader()
    results: list[bytes] = []
    lines: list[bytes] = []
    expect_block = True
    for piece in _split(stream, cuts):
        reader.receive_data(piece)
        while True:
            if expect_block:
                block = reader.read_block()
                if block is None:
                    break
                assert block.ok
                results.append(block.data)
            else:
                line = reader.read_line()
                if line is None:
                    break
                lines.append(line)
            expect_block = not expect_block
    assert results == [normalise_block(a) for a in articles]
    assert lines == [b"TAKETHIS <x@y>"] * len(articles)
    assert reader.buffered == 0


@settings(max_examples=200, deadline=None)
@given(_ARTICLE_BYTES, st.integers(1, 40), st.lists(st.integers(0, 10_000)))
def test_size_limit_refuses_but_reads_the_whole_block(
    data: bytes, limit: int, cuts: list[int]
) -> None:
    stream = encode_block(data) + b"QUIT\r\n"
    reader = StreamReader(max_block_size=limit)
    blocks = _read_all_blocks(reader, _split(stream, cuts))
    assert len(blocks) == 1
    expected = normalise_block(data)
    if len(expected) > limit:
        assert blocks[0].too_large
        assert blocks[0].data == b""
    else:
        assert blocks[0] == Block(expected, len(expected))
    assert reader.read_line() == b"QUIT"


def test_block_line_limit() -> None:
    reader = StreamReader(max_block_line_length=10)
    reader.receive_data(encode_block(b"short\n" + b"x" * 11 + b"\nend\n") + b"NEXT\r\n")
    block = reader.read_block()
    assert block is not None
    assert block.line_too_long and not block.ok and block.data == b""
    assert reader.read_line() == b"NEXT"
    reader.receive_data(encode_block(b"y" * 10 + b"\n"))
    block = reader.read_block()
    assert block == Block(b"y" * 10 + b"\n", 11)


def test_refused_long_line_is_not_buffered() -> None:
    reader = StreamReader(max_block_size=1000)
    reader.receive_data(b"head\r\n")
    assert reader.read_block() is None
    for _ in range(100):
        reader.receive_data(b"z" * 10_000)
        assert reader.read_block() is None
        assert reader.buffered < 20_000
    reader.receive_data(b"\r\n.\r\nQUIT\r\n")
    block = reader.read_block()
    assert block is not None and block.too_large
    assert block.size > 1_000_000
    assert reader.read_line() == b"QUIT"


def test_large_article_is_linear() -> None:
    line = b"0123456789" * 7 + b"\n"
    article = b".start\n" + line * (5 * 1024 * 1024 // len(line)) + b"..\n"
    wire = encode_block(article)
    started = time.perf_counter()
    reader = StreamReader(max_block_size=10 * 1024 * 1024)
    blocks = _read_all_blocks(reader, [wire[i : i + 16384] for i in range(0, len(wire), 16384)])
    elapsed = time.perf_counter() - started
    assert blocks == [Block(article, len(article))]
    assert elapsed < 5.0


def test_single_huge_line_is_linear() -> None:
    article = b"y" * (5 * 1024 * 1024) + b"\n"
    wire = encode_block(article)
    started = time.perf_counter()
    reader = StreamReader()
    blocks = _read_all_blocks(reader, [wire[i : i + 4096] for i in range(0, len(wire), 4096)])
    assert blocks == [Block(article, len(article))]
    assert time.perf_counter() - started < 5.0


def test_encode_lines() -> None:
    assert encode_lines(["VERSION 2", ".odd"]) == b"VERSION 2\r\n..odd\r\n.\r\n"


# --------------------------------------------------------------------------- lines


def test_read_line_crlf_and_bare_lf() -> None:
    reader = StreamReader()
    reader.receive_data(b"MODE READER\r\nQUIT\nDA")
    assert reader.read_line() == b"MODE READER"
    assert reader.read_line() == b"QUIT"
    assert reader.read_line() is None
    reader.receive_data(b"TE\r\n")
    assert reader.read_line() == b"DATE"


def test_line_limit_counts_crlf() -> None:
    reader = StreamReader()
    reader.receive_data(b"x" * 510 + b"\r\n" + b"y" * 511 + b"\r\nNEXT\r\n")
    assert reader.read_line() == b"x" * 510
    with pytest.raises(LineTooLong) as info:
        reader.read_line()
    assert info.value.limit == 512
    assert reader.read_line() == b"NEXT"


def test_over_long_partial_line_is_dropped_not_buffered() -> None:
    reader = StreamReader(max_line_length=100)
    reader.receive_data(b"a" * 150)
    with pytest.raises(LineTooLong):
        reader.read_line()
    assert reader.buffered == 0
    for _ in range(50):
        reader.receive_data(b"b" * 1000)
        assert reader.read_line() is None
        assert reader.buffered == 0
    reader.receive_data(b"bbb\r\nHELP\r\n")
    assert reader.read_line() == b"HELP"
    assert reader.read_line() is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=8),
    st.lists(st.integers(0, 10_000)),
)
def test_lines_any_split(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\r\n" for line in lines)
    reader = StreamReader()
    got: list[bytes] = []
    for piece in _split(stream, cuts):
        reader.receive_data(piece)
        while (line := reader.read_line()) is not None:
            got.append(line)
    # Only the CR of CR LF is removed; a line's own final CR stays.
    assert got == lines


def test_read_line_inside_block_is_an_error() -> None:
    reader = StreamReader()
    reader.receive_data(b"abc")
    assert reader.read_block() is None
    assert reader.in_block
    with pytest.raises(NntpError):
        reader.read_line()


# --------------------------------------------------------------------------- commands


def test_parse_command() -> None:
    assert parse_command(b"ihave <a@b>") == Command("IHAVE", ("<a@b>",), "<a@b>")
    assert parse_command(b"  mode\tREADER ") == Command("MODE", ("READER",), "READER")
    assert parse_command(b"AUTHINFO PASS se cret") == Command(
        "AUTHINFO", ("PASS", "se", "cret"), "PASS se cret"
    )
    assert parse_command(b"QUIT") == Command("QUIT")


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"", 500),
        (b"   ", 500),
        (b"<bad> x", 500),
        (b"\xff\xfe", 501),
        (b"POST \x00", 501),
        (b"IHAVE " + b"a" * 498, 501),
    ],
)
def test_parse_command_errors(line: bytes, code: int) -> None:
    with pytest.raises(NntpSyntaxError) as info:
        parse_command(line)
    assert info.value.code == code


@given(st.binary(max_size=600))
def test_parse_command_never_crashes(line: bytes) -> None:
    try:
        command = parse_command(line)
    except NntpSyntaxError as error:
        assert error.code in (500, 501)
    else:
        assert command.keyword == command.keyword.upper()


def test_format_command() -> None:
    assert format_command("CHECK", "<a@b>") == b"CHECK <a@b>\r\n"
    assert Command("MODE", ("STREAM",)).to_bytes() == b"MODE STREAM\r\n"
    with pytest.raises(NntpError):
        format_command("AUTHINFO", "USER", "a b")
    with pytest.raises(NntpError):
        format_command("IHAVE", "<" + "a" * 600 + ">")


# --------------------------------------------------------------------------- responses


def test_parse_response() -> None:
    assert parse_response(b"200 news.example ready") == Response(200, "news.example ready")
    assert parse_response(b"205") == Response(205, "")
    assert parse_response(b"211 3 1 3 misc.test").args == ("3", "1", "3", "misc.test")
    assert parse_response(b"340 send it").intermediate
    assert parse_response(b"240 ok").ok
    for bad in (b"", b"20", b"2000 x", b"abc", b"600 x", b"099 x"):
        with pytest.raises(NntpSyntaxError):
            parse_response(bad)


def test_response_to_bytes_is_one_bounded_line() -> None:
    assert Response(235, "ok").to_bytes() == b"235 ok\r\n"
    assert Response(205).to_bytes() == b"205\r\n"
    long = Response(441, "x\r\ny" * 400).to_bytes()
    assert len(long) <= 512 and long.endswith(b"\r\n") and long.count(b"\n") == 1


def test_response_has_block() -> None:
    for code in (100, 101, 215, 220, 221, 222, 224, 225, 230, 231):
        assert response_has_block(code)
    assert not response_has_block(211, "GROUP")
    assert response_has_block(211, "listgroup")
    for code in (200, 205, 235, 239, 240, 281, 335, 340, 381, 435, 438, 480):
        assert not response_has_block(code)


def test_parse_capabilities() -> None:
    block = decode_block(b"VERSION 2\r\nREADER\r\nSTREAMING\r\nauthinfo USER\r\n.\r\n")
    caps = parse_capabilities(block)
    assert caps == {"VERSION": ("2",), "READER": (), "STREAMING": (), "AUTHINFO": ("USER",)}


def test_is_message_id() -> None:
    assert is_message_id("<a@b>")
    assert is_message_id("<abc>")
    assert not is_message_id("<abc>", strict=True)
    assert is_message_id("<a.b$c@example.org>", strict=True)
    assert is_message_id("<x@[127.0.0.1]>", strict=True)
    for bad in ("", "<>", "a@b", "<a b@c>", "<a>b@c>", "<" + "a" * 249 + ">", "<a@b"):
        assert not is_message_id(bad)


def test_size_limit_is_exact_with_a_stuffed_last_line_split_before_lf() -> None:
    content = b"abc\n.xyz\n"  # 9 octets
    for limit, refused in ((9, False), (8, True)):
        reader = StreamReader(max_block_size=limit)
        reader.receive_data(b"abc\r\n..xyz\r")
        assert reader.read_block() is None
        reader.receive_data(b"\n.\r\n")
        block = reader.read_block()
        assert block is not None and block.too_large is refused
        assert block.data == (b"" if refused else content)


@pytest.mark.parametrize(
    "content",
    [
        b".\n",  # a line that is exactly "."
        b"..\n",  # a line that is exactly ".."
        b"a\n.\nb\n",
        b"a\n..\n.\n",
        b"no final line feed",
        b"ends in a dot .",
        b".",  # a body that is one dot without LF
        b"cr\rinside\n",
        b"cr before lf\r\n",
        b"\r",
        b"\n\n.\n\n",
        b"",
    ],
)
def test_block_edge_cases_round_trip_in_any_split(content: bytes) -> None:
    wire = encode_block(content)
    assert decode_block(wire) == normalise_block(content)
    # One byte at a time, with the next command right behind the terminator.
    reader = StreamReader()
    block = None
    for byte in wire + b"QUIT\r\n":
        reader.receive_data(bytes([byte]))
        if block is None:
            block = reader.read_block()
    assert block is not None and block.data == normalise_block(content)
    assert reader.read_line() == b"QUIT"


def test_a_lone_dot_inside_a_takethis_article_ends_it_and_the_rest_is_answered() -> None:
    # The peer forgot to dot-stuff: the article ends at the lone ".", the lines
    # after it are read as commands and get 500; nothing raises, the session goes on.
    codec = ServerCodec(hostname="gw.test")
    codec.receive_data(b"TAKETHIS <x@y>\r\nSubject: s\r\n\r\nbody\r\n.\r\nmore: text\r\n.\r\n")
    events = []
    while (event := codec.next_event()) is not None:
        events.append(event)
    assert isinstance(events[0], ArticleReceived)
    assert events[0].data == b"Subject: s\n\nbody\n"
    codec.answer(Response(239, "<x@y>"))
    codes = []
    while (event := codec.next_event()) is not None:
        assert isinstance(event, SendResponse)
        codes.append(event.response.code)
    assert codes == [239, 500, 500]
    assert not codec.closed


def test_block_follows_only_for_commands_that_have_one() -> None:
    """RFC 3977 3.2: whether a block follows depends on the command, not on the code alone."""
    for keyword in ("POST", "IHAVE", "CHECK", "TAKETHIS", "DATE", "QUIT", "MODE", "AUTHINFO"):
        for code in (100, 101, 220, 224, 230, 282):
            assert not response_has_block(code, keyword), (code, keyword)
    assert response_has_block(220, "ARTICLE") and response_has_block(221, "HEAD")
    assert response_has_block(221, "XHDR") and response_has_block(224, "XOVER")
    assert response_has_block(211, "LISTGROUP") and not response_has_block(211, "GROUP")
    assert response_has_block(101, "CAPABILITIES") and response_has_block(100, "HELP")
    assert response_has_block(224)  # a command the table does not know: by the code
