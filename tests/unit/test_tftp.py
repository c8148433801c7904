"""TFTP: packets, option negotiation, netascii, names inside a folder, and a read transfer
driven packet by packet on a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from gateway.ports import FileProblem, FileReader
from gateway.protocols.folder.destination import inside
from gateway.protocols.tftp import codec
from gateway.protocols.tftp.codec import NetasciiDecoder, NetasciiEncoder, TftpError
from gateway.protocols.tftp.transfer import ReadTransfer


def test_requests_parse_with_their_options_and_round_trip() -> None:
    packet = codec.request(codec.RRQ, "pxelinux.0", "OCTET", blksize="1468", TSIZE="0")
    req = codec.parse(packet)
    assert req == codec.Request(codec.RRQ, "pxelinux.0", "octet", {"blksize": "1468", "tsize": "0"})
    assert codec.parse(codec.data(65536 + 7, b"xy")) == codec.Data(7, b"xy")
    assert codec.parse(codec.ack(3)) == codec.Ack(3)
    assert codec.parse(codec.error(1, "File not found")) == codec.Error(1, "File not found")
    assert codec.parse(codec.oack({"blksize": "1468"})) == codec.OptionAck({"blksize": "1468"})


@pytest.mark.parametrize(
    ("packet", "code", "text"),
    [
        (b"\x00\x01", codec.ILLEGAL_OPERATION, "too short"),
        (b"\x00\x01name\x00octet", codec.ILLEGAL_OPERATION, "not NUL-terminated"),
        (b"\x00\x01name\x00mail\x00", codec.ILLEGAL_OPERATION, "unknown transfer mode 'mail'"),
        (b"\x00\x01\x00octet\x00", codec.ILLEGAL_OPERATION, "names no file"),
        (b"\x00\x01a\x00octet\x00blksize\x00", codec.ILLEGAL_OPERATION, "expected name, mode"),
        (b"\x00\x09\x00\x00", codec.ILLEGAL_OPERATION, "unknown opcode 9"),
        (b"\x00\x01\xff\x00octet\x00", codec.ILLEGAL_OPERATION, "not ASCII"),
    ],
)
def test_malformed_packets_get_an_error_code(packet: bytes, code: int, text: str) -> None:
    with pytest.raises(TftpError) as caught:
        codec.parse(packet)
    assert caught.value.code == code and text in caught.value.text


def test_options_are_granted_within_limits_and_unknown_ones_left_out() -> None:
    req = codec.Request(
        codec.RRQ,
        "f",
        "octet",
        {"blksize": "70000", "timeout": "3", "tsize": "0", "windowsize": "500", "x-y": "1"},
    )
    terms = codec.negotiate(req, 1234, max_blksize=1468, max_windowsize=16)
    assert (terms.blksize, terms.timeout, terms.windowsize) == (1468, 3.0, 16)
    assert terms.reply == {"blksize": "1468", "timeout": "3", "tsize": "1234", "windowsize": "16"}
    # Out of range or not numbers: not granted, and with nothing granted no OACK at all.
    bad = codec.Request(codec.RRQ, "f", "octet", {"blksize": "4", "timeout": "0", "tsize": "x"})
    assert codec.negotiate(bad, 10, max_blksize=1468, max_windowsize=16).reply is None
    # netascii: the size on the wire is not the file's, so tsize is not answered.
    ascii_req = codec.Request(codec.RRQ, "f", "netascii", {"tsize": "0"})
    assert codec.negotiate(ascii_req, 10, max_blksize=1468, max_windowsize=16).reply is None


def test_netascii_both_ways_even_with_a_cr_at_a_chunk_end() -> None:
    wire = NetasciiEncoder().encode(b"a\nb\rc")
    assert wire == b"a\r\nb\r\0c"
    decoder = NetasciiDecoder()
    out = b"".join(decoder.decode(wire[i : i + 1]) for i in range(len(wire))) + decoder.flush()
    assert out == b"a\nb\rc"


def test_names_stay_inside_the_folder(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "pxelinux.0").write_bytes(b"x")
    (tmp_path / "secret").write_text("no")
    (tmp_path / "boot" / "link").symlink_to(tmp_path / "secret")
    root = tmp_path / "boot"
    assert inside(root, "/pxelinux.0") == (root / "pxelinux.0").resolve()
    assert inside(root, "\\pxelinux.0") == (root / "pxelinux.0").resolve()
    assert inside(root, "a/../pxelinux.0") == (root / "pxelinux.0").resolve()
    # "/" is the folder itself (what an FTP listing of the top asks for).
    assert inside(root, "/") == root.resolve()
    for name, reason in (("../secret", "denied"), ("link", "denied"), ("nope", "not-found"),
                         ("/..", "denied")):  # fmt: skip
        with pytest.raises(FileProblem) as caught:
            inside(root, name)
        assert caught.value.reason == reason, name


class _Bytes(FileReader):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.closed = False

    async def read(self, n: int) -> bytes:
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk

    def close(self) -> None:
        self.closed = True


class _Udp:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, tuple[str, int]]] = []
        self.stopped = False

    def write(self, packet: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((codec.parse(packet), addr))

    def stopListening(self) -> None:
        self.stopped = True


CLIENT = ("127.0.0.1", 4000)


def _transfer(data: bytes, **terms: Any) -> tuple[ReadTransfer, _Udp, Clock, list[Any]]:
    clock, udp, done = Clock(), _Udp(), []
    transfer = ReadTransfer(
        CLIENT,
        _Bytes(data),
        codec.Terms(**terms),
        netascii=False,
        timeout=1.0,
        retries=2,
        reactor=clock,
        done=lambda *outcome: done.append(outcome),
    )
    transfer.transport = udp  # type: ignore[assignment]
    transfer.startProtocol()
    return transfer, udp, clock, done


def _ack(transfer: ReadTransfer, block: int, addr: tuple[str, int] = CLIENT) -> None:
    transfer.datagramReceived(codec.ack(block), addr)


def test_a_duplicate_ack_is_not_answered_with_data_again() -> None:
    transfer, udp, _, done = _transfer(b"x" * 1200)
    assert [p for p, _ in udp.sent] == [codec.Data(1, b"x" * 512)]
    _ack(transfer, 1)
    _ack(transfer, 1)  # a late duplicate: no second block 2 (Sorcerer's Apprentice)
    assert [p for p, _ in udp.sent][1:] == [codec.Data(2, b"x" * 512)]
    _ack(transfer, 2)
    _ack(transfer, 3)
    assert done == [("complete", 1200, "")] and udp.stopped and transfer.reader.closed  # type: ignore[attr-defined]


def test_a_file_of_whole_blocks_ends_with_an_empty_one() -> None:
    transfer, udp, _, done = _transfer(b"y" * 1024)
    for block in (1, 2):
        _ack(transfer, block)
    assert udp.sent[-1][0] == codec.Data(3, b"")
    _ack(transfer, 3)
    assert done == [("complete", 1024, "")]


def test_silence_is_answered_by_sending_again_with_back_off_then_giving_up() -> None:
    _, udp, clock, done = _transfer(b"z" * 100)
    clock.advance(1.0)
    clock.advance(2.0)  # the wait doubles
    assert [p for p, _ in udp.sent] == [codec.Data(1, b"z" * 100)] * 3
    clock.advance(4.0)
    assert isinstance(udp.sent[-1][0], codec.Error) and done[0][0] == "timeout"


def test_block_numbers_roll_over_after_65535() -> None:
    transfer, udp, _, done = _transfer(b"r" * (8 * 65537), blksize=8)
    for block in range(1, 65536):
        _ack(transfer, block)
    assert udp.sent[-1][0] == codec.Data(0, b"r" * 8)  # the 65536th block is numbered 0
    _ack(transfer, 0)
    _ack(transfer, 1)  # the 65537th
    assert udp.sent[-1][0] == codec.Data(2, b"")
    _ack(transfer, 2)
    assert done == [("complete", 8 * 65537, "")]


def test_options_wait_for_ack_zero_and_a_window_restarts_after_a_partial_ack() -> None:
    transfer, udp, _, done = _transfer(
        b"w" * 40, blksize=8, windowsize=4, reply={"blksize": "8", "windowsize": "4"}
    )
    assert udp.sent == [(codec.OptionAck({"blksize": "8", "windowsize": "4"}), CLIENT)]
    _ack(transfer, 0)
    assert [p.block for p, _ in udp.sent[1:]] == [1, 2, 3, 4]
    _ack(transfer, 2)  # the client missed block 3: 3 and 4 again, then 5 and the last
    assert [p.block for p, _ in udp.sent[5:]] == [3, 4, 5, 6]
    assert udp.sent[-1][0] == codec.Data(6, b"")  # 40 bytes: five whole blocks, then none
    _ack(transfer, 6)
    assert done == [("complete", 40, "")]


def test_a_stranger_gets_unknown_tid_and_the_transfer_goes_on() -> None:
    transfer, udp, _, done = _transfer(b"s" * 10)
    _ack(transfer, 1, ("127.0.0.1", 5555))
    assert udp.sent[-1] == (
        codec.Error(codec.UNKNOWN_TID, "unknown transfer ID"),
        ("127.0.0.1", 5555),
    )
    assert not done
    _ack(transfer, 1)
    assert done == [("complete", 10, "")]


class _Upload:
    def __init__(self, fail_after: int | None = None) -> None:
        self.data = bytearray()
        self.size = 0
        self.path = "/spool/incoming/upload-x"
        self.finished = self.discarded = False
        self.fail_after = fail_after

    def write(self, data: bytes) -> None:
        if self.fail_after is not None and self.size + len(data) > self.fail_after:
            raise OSError(28, "No space left on device")
        self.data += data
        self.size += len(data)

    def finish(self) -> None:
        self.finished = True

    def discard(self) -> None:
        self.discarded = True


def _write(
    *, max_size: int = 10**6, upload: _Upload | None = None, **terms: Any
) -> tuple[Any, _Udp, Clock, list[Any], list[Any], _Upload]:
    from twisted.internet.defer import Deferred

    from gateway.protocols.tftp.transfer import WriteTransfer

    clock, udp, done, stored = Clock(), _Udp(), [], []
    upload = upload or _Upload()

    def store(size: int) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        stored.append((size, d))
        return d

    transfer = WriteTransfer(
        CLIENT,
        upload,
        codec.Terms(**terms),
        netascii=False,
        timeout=1.0,
        retries=2,
        max_size=max_size,
        reactor=clock,
        store=store,
        done=lambda *outcome: done.append(outcome),
    )
    transfer.transport = udp  # type: ignore[assignment]
    transfer.startProtocol()
    return transfer, udp, clock, done, stored, upload


def _data(transfer: Any, block: int, payload: bytes) -> None:
    transfer.datagramReceived(codec.data(block, payload), CLIENT)


def test_an_upload_is_acked_block_by_block_and_finally_only_once_stored() -> None:
    transfer, udp, clock, done, stored, upload = _write()
    assert udp.sent == [(codec.Ack(0), CLIENT)]
    _data(transfer, 1, b"a" * 512)
    _data(transfer, 1, b"a" * 512)  # again (our ACK was lost): ACKed again, written once
    assert [p for p, _ in udp.sent[1:]] == [codec.Ack(1), codec.Ack(1)]
    _data(transfer, 2, b"end")
    assert bytes(upload.data) == b"a" * 512 + b"end"
    assert stored and stored[0][0] == 515 and udp.sent[-1][0] == codec.Ack(1)  # not yet
    stored[0][1].callback(None)
    assert udp.sent[-1][0] == codec.Ack(2) and done == [("complete", 515, "")]
    _data(transfer, 2, b"end")  # the final ACK was lost: it is sent again while dallying
    assert udp.sent[-1][0] == codec.Ack(2) and len(udp.sent) == 5
    clock.advance(10)
    assert udp.stopped and not upload.discarded


def test_an_upload_the_gateway_does_not_store_gets_an_error_and_is_discarded() -> None:
    transfer, udp, _, done, stored, upload = _write()
    _data(transfer, 1, b"short")
    stored[0][1].callback((codec.ACCESS_VIOLATION, "no route takes it"))
    assert udp.sent[-1][0] == codec.Error(codec.ACCESS_VIOLATION, "no route takes it")
    assert upload.discarded and done[0][0] == "failed"


def test_a_full_disk_and_a_file_too_large_end_the_upload_with_error_3() -> None:
    transfer, udp, _, _, _, upload = _write(upload=_Upload(fail_after=600))
    _data(transfer, 1, b"a" * 512)
    _data(transfer, 2, b"a" * 512)
    assert udp.sent[-1][0] == codec.Error(
        codec.DISK_FULL, "cannot write the file: No space left on device"
    )
    assert upload.discarded
    transfer, udp, _, _, _, upload = _write(max_size=1000)
    _data(transfer, 1, b"a" * 512)
    _data(transfer, 2, b"a" * 512)
    assert udp.sent[-1][0] == codec.Error(codec.DISK_FULL, "the file is larger than 1000 octets")


def test_a_silent_client_is_asked_again_then_given_up_on() -> None:
    transfer, udp, clock, done, _, upload = _write()
    _data(transfer, 1, b"a" * 512)
    clock.advance(1.0)
    clock.advance(2.0)
    assert [p for p, _ in udp.sent] == [codec.Ack(0), codec.Ack(1), codec.Ack(1), codec.Ack(1)]
    clock.advance(4.0)
    assert isinstance(udp.sent[-1][0], codec.Error) and done[0][0] == "timeout"
    assert upload.discarded


def test_with_a_window_the_last_block_of_each_is_acked_and_a_gap_is_named() -> None:
    transfer, udp, _, _, stored, upload = _write(
        blksize=8, windowsize=3, reply={"blksize": "8", "windowsize": "3"}
    )
    assert udp.sent == [(codec.OptionAck({"blksize": "8", "windowsize": "3"}), CLIENT)]
    for block in (1, 2, 3):
        _data(transfer, block, b"b" * 8)
    assert [p for p, _ in udp.sent[1:]] == [codec.Ack(3)]
    _data(transfer, 5, b"b" * 8)  # block 4 was lost: the client hears "3" again
    assert udp.sent[-1][0] == codec.Ack(3)
    _data(transfer, 4, b"b" * 8)
    _data(transfer, 5, b"")
    assert bytes(upload.data) == b"b" * 32 and stored[0][0] == 32
