"""Tests for the pieces the SMTP and NNTP server shells share, in memory with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.protocols._line_server import IdleTimer, describe_peer
from gateway.protocols.nntp.server import NntpServerFactory
from gateway.protocols.smtp.server import SmtpServerFactory

PEER = IPv4Address("TCP", "192.0.2.7", 40000)


def make_timer() -> tuple[Clock, IdleTimer, list[float]]:
    clock = Clock()
    fired: list[float] = []
    timer = IdleTimer(clock, lambda: fired.append(clock.seconds()))
    return clock, timer, fired


def test_fires_once_after_the_timeout() -> None:
    clock, timer, fired = make_timer()
    assert not timer.running
    timer.restart(10)
    assert timer.running
    clock.advance(9.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [10.0]
    assert not timer.running
    clock.advance(100)
    assert fired == [10.0]
    assert clock.getDelayedCalls() == []


def test_restart_counts_from_now_and_keeps_one_call() -> None:
    clock, timer, fired = make_timer()
    timer.restart(10)
    clock.advance(8)
    timer.restart(10)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(8)
    assert fired == []
    clock.advance(2)
    assert fired == [18.0]


def test_restart_takes_the_timeout_given_each_time() -> None:
    # A reconfigured listener passes its new timeout at the next activity.
    clock, timer, fired = make_timer()
    timer.restart(10)
    clock.advance(1)
    timer.restart(3)
    clock.advance(3)
    assert fired == [4.0]


def test_stop_cancels_and_restart_starts_again() -> None:
    clock, timer, fired = make_timer()
    timer.restart(10)
    timer.stop()
    assert not timer.running
    assert clock.getDelayedCalls() == []
    clock.advance(20)
    assert fired == []
    timer.stop()  # stopping a stopped timer is harmless
    timer.restart(5)
    clock.advance(5)
    assert fired == [25.0]


def test_restart_after_firing_schedules_a_new_call() -> None:
    clock, timer, fired = make_timer()
    timer.restart(1)
    clock.advance(1)
    timer.restart(1)
    assert timer.running
    clock.advance(1)
    assert fired == [1.0, 2.0]


def test_the_callback_may_restart_the_timer() -> None:
    clock = Clock()
    fired: list[float] = []

    def on_idle() -> None:
        fired.append(clock.seconds())
        if len(fired) < 3:
            timer.restart(2)

    timer = IdleTimer(clock, on_idle)
    timer.restart(2)
    clock.advance(2)
    clock.advance(2)
    clock.advance(2)
    clock.advance(2)
    assert fired == [2.0, 4.0, 6.0]
    assert not timer.running


def test_describe_peer() -> None:
    assert describe_peer("192.0.2.7", 25) == "192.0.2.7:25"
    assert describe_peer("2001:db8::1", 119) == "[2001:db8::1]:119"
    assert describe_peer("", 0) == "an unknown peer"


class _Welcome:
    """A handler that accepts every connection; the tests below send no transactions."""

    def on_connect(self, session: object) -> None:
        return None


@pytest.mark.parametrize(
    ("factory_type", "command", "goodbye"),
    [(SmtpServerFactory, b"NOOP\r\n", b"421 "), (NntpServerFactory, b"DATE\r\n", b"400 ")],
)
def test_reconfigured_idle_timeout_reaches_open_sessions(
    factory_type: Any, command: bytes, goodbye: bytes
) -> None:
    reactor = MemoryReactorClock()
    factory = factory_type(
        _Welcome(), reactor=reactor, hostname="gw.test", max_size=0, idle_timeout=300
    )
    protocol = factory.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    factory.idle_timeout = 5  # what a listener reload does
    protocol.dataReceived(command)
    transport.clear()
    reactor.advance(4.9)
    assert transport.value() == b"" and not transport.disconnecting
    reactor.advance(0.1)
    assert transport.value().startswith(goodbye)
    assert transport.disconnecting
