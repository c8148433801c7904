"""The FTP destination's client in memory: replies (one line and several), and the
listings it reads (MLSD facts, Unix LIST lines)."""

from __future__ import annotations

from twisted.internet.testing import StringTransport

from gateway.ports import FileInfo
from gateway.protocols.ftp.client import _Control
from gateway.protocols.ftp.codec import Reply
from gateway.protocols.ftp.destination import _list_entry, _mlsd_entry


def test_replies_of_one_line_and_of_several() -> None:
    control = _Control()
    control.makeConnection(StringTransport())
    got: list[Reply] = []
    control.reply().addCallback(got.append)
    control.dataReceived(b"220 ready\r\n211-Features:\r\n EPSV\r\n 211 indented\r\n")
    assert got == [Reply(220, "ready")]
    control.reply().addCallback(got.append)
    control.dataReceived(b"211 End\r\n")  # the code and a space end it
    assert got[1] == Reply(211, "Features:\n EPSV\n 211 indented\n211 End")
    # A reply that comes before anyone waits is kept for the next wait.
    control.dataReceived(b"226 done\n")
    control.reply().addCallback(got.append)
    assert got[2] == Reply(226, "done")
    assert control.transport.value() == b""  # type: ignore[union-attr]
    control.send("NOOP")
    assert control.transport.value() == b"NOOP\r\n"  # type: ignore[union-attr]


def test_listing_lines() -> None:
    assert _mlsd_entry("type=file;size=5;modify=20231114221320; a b.bin") == FileInfo(
        "a b.bin", 5, 1700000000.0, False
    )
    assert _mlsd_entry("type=dir;modify=20231114221320; sub") == FileInfo(
        "sub", None, 1700000000.0, True
    )
    assert _mlsd_entry("type=cdir; .") is None
    assert _list_entry("-rw-r--r--    1 1000     1000      3145739 Dec 08 00:44 image.bin") == (
        FileInfo("image.bin", 3145739, None, False)
    )
    assert _list_entry("drwxr-xr-x    2 0        0            4096 Dec 08 00:44 my dir") == (
        FileInfo("my dir", None, None, True)
    )
    assert _list_entry("lrwxrwxrwx 1 0 0 4 Dec 08 00:44 l -> target") == FileInfo("l", 4)
    assert _list_entry("total 12") is None


def test_a_reply_that_comes_after_its_wait_was_given_up_is_not_taken_for_the_next() -> None:
    control = _Control()
    control.makeConnection(StringTransport())
    late = control.send("SIZE x")
    late.cancel()  # timed out
    late.addErrback(lambda _: None)
    got: list[Reply] = []
    control.send("NOOP").addCallback(got.append)
    control.dataReceived(b"213 5\r\n200 ok\r\n")
    # The SIZE reply belonged to the wait that was given up; NOOP gets its own.
    assert got == [Reply(200, "ok")]
    control.connectionLost()  # nobody waits: nothing to fail
