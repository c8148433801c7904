"""Tests for the slot bookkeeping the SMTP and NNTP client pools share."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.python.failure import Failure

from gateway.protocols._client_pool import Slots, connect_failure


def outcome(deferred: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    deferred.addBoth(seen.append)
    return seen


def test_reserve_stops_at_the_limit() -> None:
    slots: Slots[str] = Slots(2)
    assert slots.reserve() and slots.reserve()
    assert not slots.reserve()
    assert slots.taken == 2


def test_a_freed_slot_passes_to_the_first_waiter() -> None:
    slots: Slots[str] = Slots(1)
    assert slots.reserve()
    first, second = outcome(slots.wait()), outcome(slots.wait())
    slots.free()
    assert first == [None] and second == []
    assert slots.taken == 1  # the slot changed hands, it was not given back
    slots.free()
    assert second == [None]
    slots.free()
    assert slots.taken == 0


def test_next_waiter_skips_cancelled_ones() -> None:
    slots: Slots[str] = Slots(1)
    slots.reserve()
    cancelled = slots.wait()
    cancelled.addErrback(lambda failure: failure.trap(CancelledError))
    cancelled.cancel()
    live = slots.wait()
    assert slots.next_waiter() is live
    assert slots.next_waiter() is None


def test_drained_waits_for_the_last_slot() -> None:
    slots: Slots[str] = Slots(2)
    slots.reserve()
    slots.reserve()
    done = outcome(Deferred.fromCoroutine(slots.drained()))
    slots.free()
    assert done == []
    slots.free()
    assert done == [None]
    assert outcome(Deferred.fromCoroutine(slots.drained())) == [None]  # nothing taken: at once


def test_fail_waiters_gives_each_its_own_error() -> None:
    slots: Slots[str] = Slots(1)
    slots.reserve()
    first, second = outcome(slots.wait()), outcome(slots.wait())
    slots.fail_waiters(lambda: RuntimeError("the pool was closed"))
    [a], [b] = first, second
    assert isinstance(a, Failure) and isinstance(b, Failure)
    assert a.value is not b.value
    assert str(a.value) == "the pool was closed"
    assert slots.next_waiter() is None
    slots.free()
    assert slots.taken == 0


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (TimeoutError(), "timed out after 2.5s connecting to mx.test:25"),
        (ConnectionRefusedError(), "connection refused by mx.test:25"),
        (DNSLookupError(), "could not resolve the host name of mx.test:25"),
        (OSError("no route"), "could not connect to mx.test:25: no route"),
    ],
)
def test_connect_failure(exc: Exception, text: str) -> None:
    assert connect_failure(exc, "mx.test:25", 2.5) == text
