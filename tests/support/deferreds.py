"""Running coroutines and Deferreds that finish without a running reactor (all in memory)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")

__all__ = ["result", "run", "start"]


def start(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coro)


def result(d: Deferred[T]) -> T:
    """The result of a fired Deferred; raises its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the operation has not finished"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that completes at once (an inline spool, the router)."""
    return result(start(coro))
