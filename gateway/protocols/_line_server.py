"""Pieces the line-based server shells (SMTP, NNTP) share: the idle timer and small helpers.

Each shell keeps its own rules (what an idle client is told, when reading
pauses); only the mechanics live here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol, TypeVar

from twisted.internet import task

__all__ = ["Clock", "DelayedCall", "IdleTimer", "await_", "describe_peer", "drain_sessions"]

_T = TypeVar("_T")
_S = TypeVar("_S", bound="_Session")


class DelayedCall(Protocol):
    # Structural views of the zope interfaces, so that mypy checks calls without a zope plugin.
    def cancel(self) -> None: ...
    def active(self) -> bool: ...
    def reset(self, secondsFromNow: float) -> None: ...


class Clock(Protocol):
    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> DelayedCall: ...


class IdleTimer:
    """Calls ``on_idle`` once ``timeout`` seconds pass without a ``restart``.

    The timeout is given at each ``restart`` rather than once, so a listener
    that is reconfigured applies its new idle timeout to the connections it
    already has from their next activity on.
    """

    def __init__(self, clock: Clock, on_idle: Callable[[], object]) -> None:
        self._clock = clock
        self._on_idle = on_idle
        self._call: DelayedCall | None = None

    @property
    def running(self) -> bool:
        """Started and neither stopped nor fired since."""
        return self._call is not None

    def restart(self, timeout: float) -> None:
        """Start the timer, or start it again from now if it is running."""
        if self._call is not None and self._call.active():
            self._call.reset(timeout)
        else:
            self._call = self._clock.callLater(timeout, self._fire)

    def stop(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _fire(self) -> None:
        self._call = None
        self._on_idle()


async def await_(awaitable: Awaitable[_T]) -> _T:
    """A coroutine for any awaitable, for ``Deferred.fromCoroutine``."""
    return await awaitable


def describe_peer(host: str, port: int) -> str:
    """``host:port`` for log lines, with an IPv6 address in brackets."""
    if not host:
        return "an unknown peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Session(Protocol):
    @property
    def busy(self) -> bool: ...


async def drain_sessions(
    sessions: Collection[_S],
    reactor: Any,  # an IReactorTime (zope interfaces are opaque to mypy)
    timeout: float,
    close: Callable[[_S], object],
) -> None:
    """Close the idle sessions now, and the busy ones once they are idle or ``timeout``
    seconds have passed (``sessions`` shrinks as they go: a factory's open connections)."""
    deadline = reactor.seconds() + timeout
    while sessions:
        for session in list(sessions):
            if not session.busy:
                close(session)
        if not sessions or reactor.seconds() >= deadline:
            break
        await task.deferLater(reactor, 0.1, lambda: None)
    for session in list(sessions):
        close(session)
