"""ReadBatch: datagrams queued during a socket read leave when the read ends."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from gateway.protocols.dns.batch import ReadBatch, read_batch


class FakePort:
    def __init__(self, on_read: Any) -> None:
        self.on_read = on_read
        self.reads = 0

    def doRead(self) -> None:
        self.reads += 1
        self.on_read()


def test_flushes_at_the_end_of_a_watched_read_without_a_timer() -> None:
    clock = Clock()
    batch = ReadBatch(clock)
    flushed: list[str] = []
    seen_during_read: list[list[str]] = []

    def read() -> None:
        batch.mark(lambda: flushed.append("a"))
        batch.mark(lambda: flushed.append("b"))
        seen_during_read.append(list(flushed))

    port = FakePort(read)
    batch.watch(port)
    port.doRead()
    assert seen_during_read == [[]]  # nothing left while the read was going on
    assert flushed == ["a", "b"]
    assert not clock.getDelayedCalls()


def test_outside_a_read_the_flush_waits_for_the_next_turn() -> None:
    clock = Clock()
    batch = ReadBatch(clock)
    flushed: list[int] = []
    batch.mark(lambda: flushed.append(1))
    assert flushed == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert flushed == [1] and not clock.getDelayedCalls()


def test_a_flush_queued_by_a_timer_goes_out_with_the_next_read() -> None:
    clock = Clock()
    batch = ReadBatch(clock)
    flushed: list[int] = []
    batch.mark(lambda: flushed.append(1))
    port = FakePort(lambda: None)
    batch.watch(port)
    port.doRead()
    assert flushed == [1]
    assert not clock.getDelayedCalls()  # the timer was cancelled, not left to fire


def test_forget_drops_the_flush_and_its_timer() -> None:
    clock = Clock()
    batch = ReadBatch(clock)
    flushed: list[str] = []

    def flush() -> None:
        flushed.append("x")

    batch.mark(flush)
    batch.forget(flush)
    clock.advance(0)
    assert flushed == [] and not clock.getDelayedCalls()


def test_a_failing_read_still_flushes() -> None:
    clock = Clock()
    batch = ReadBatch(clock)
    flushed: list[int] = []

    def read() -> None:
        batch.mark(lambda: flushed.append(1))
        raise OSError("read failed")

    port = FakePort(read)
    batch.watch(port)
    try:
        port.doRead()
    except OSError:
        pass
    assert flushed == [1]


def test_one_batch_per_reactor() -> None:
    a, b = Clock(), Clock()
    assert read_batch(a) is read_batch(a)
    assert read_batch(a) is not read_batch(b)
