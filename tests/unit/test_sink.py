"""Message content on its way in: memory for small messages, an unlinked file beyond that."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.protocols._sink import MemorySink, SpillingSink
from gateway.protocols.nntp.codec import ArticleReceived, Response, SendResponse, ServerCodec
from gateway.protocols.smtp.codec import MessageReceived, Reply, SendReply
from gateway.protocols.smtp.codec import ServerCodec as SmtpCodec


def open_files() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass  # the directory listing's own descriptor, closed already
    return found


def test_small_content_stays_in_memory(tmp_path: Path) -> None:
    sink = SpillingSink(memory=100, directory=str(tmp_path))
    sink.write(b"a" * 60)
    sink.write(b"b" * 40)
    assert not sink.spilled and sink.getvalue() == b"a" * 60 + b"b" * 40
    sink.close()
    assert sink.getvalue() == b""


def test_large_content_goes_to_a_file_that_close_removes(tmp_path: Path) -> None:
    before = open_files()
    sink = SpillingSink(memory=100, directory=str(tmp_path))
    for _ in range(50):
        sink.write(b"x" * 99 + b"\n")
    assert sink.spilled and sink.error is None
    assert list(tmp_path.iterdir()) == []  # unlinked from the start
    assert len(open_files() - before) == 1
    assert sink.getvalue() == (b"x" * 99 + b"\n") * 50
    sink.close()
    assert open_files() == before


def test_a_file_that_cannot_be_made_is_an_error_not_an_exception(tmp_path: Path) -> None:
    sink = SpillingSink(memory=10, directory=str(tmp_path / "missing"))
    sink.write(b"x" * 20)
    sink.write(b"more")
    assert sink.error is not None and "cannot keep the message's content" in sink.error
    assert sink.getvalue() == b""


class Recording(MemorySink):
    """A sink that remembers being closed."""

    made: list[Recording] = []

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        Recording.made.append(self)

    def close(self) -> None:
        self.closed = True
        super().close()


class Broken(MemorySink):
    @property
    def error(self) -> str | None:
        return "cannot keep the message's content: No space left on device"


SMTP_DATA = b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@c.test>\r\nDATA\r\n"


def smtp(sink: type[MemorySink]) -> SmtpCodec:
    codec = SmtpCodec(hostname="gw.test", max_size=0, sink=sink)
    codec.receive_data(SMTP_DATA)
    while (event := codec.next_event()) is not None:
        if not isinstance(event, SendReply):
            codec.answer(None)
    return codec


def test_smtp_an_abandoned_message_closes_its_sink() -> None:
    Recording.made = []
    codec = smtp(Recording)
    codec.receive_data(b"Subject: x\r\n\r\n" + b"y" * 10_000 + b"\r\n")
    assert codec.next_event() is None
    [sink] = Recording.made
    assert not sink.closed
    codec.close()  # the connection was lost
    assert sink.closed


def test_smtp_a_message_whose_content_could_not_be_kept_is_452() -> None:
    codec = smtp(Broken)
    codec.receive_data(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    event = codec.next_event()
    assert not isinstance(event, MessageReceived)
    assert event == SendReply(Reply(452, "4.3.1", event.reply.text), False)  # type: ignore[union-attr]
    assert "No space left on device" in event.reply.text  # type: ignore[union-attr]


ARTICLE = b"From: a@c.test\r\nNewsgroups: t.x\r\nSubject: s\r\n\r\nbody\r\n.\r\n"


def nntp(sink: type[MemorySink]) -> ServerCodec:
    codec = ServerCodec(hostname="gw.test", posting=True, sink=sink)
    codec.receive_data(b"POST\r\n")
    while codec.next_event() is not None:
        pass
    return codec


def test_nntp_an_abandoned_article_closes_its_sink() -> None:
    Recording.made = []
    codec = nntp(Recording)
    codec.receive_data(b"From: a@c.test\r\n" + b"y" * 10_000 + b"\r\n")
    assert codec.next_event() is None
    [sink] = Recording.made
    codec.close()
    assert sink.closed


@pytest.mark.parametrize(
    ("command", "answer"),
    [("POST", (441, "436 Try again later")), ("IHAVE", (436, "Try again later"))],
)
def test_nntp_an_article_whose_content_could_not_be_kept_is_tried_again(
    command: str, answer: tuple[int, str]
) -> None:
    codec = ServerCodec(hostname="gw.test", posting=True, sink=Broken)
    codec.receive_data(f"{command} <a@c.test>\r\n".encode() if command == "IHAVE" else b"POST\r\n")
    while (event := codec.next_event()) is not None:
        if not isinstance(event, SendResponse):
            codec.answer(Response(335, "send it"))
    codec.receive_data(ARTICLE)
    event = codec.next_event()
    assert not isinstance(event, ArticleReceived)
    assert isinstance(event, SendResponse)
    assert (event.response.code, event.response.text[: len(answer[1])]) == answer
