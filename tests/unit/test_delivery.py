"""Tests for the delivery workers, in memory: a fake gateway, fake destinations, the spool
in inline mode and ``twisted.internet.task.Clock`` for time.  No sleeps, no reactor."""

from __future__ import annotations

import email
import email.message
import email.policy
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from gateway.config import DestinationConfig, Duration
from gateway.delivery import backoff
from gateway.message import MailMessage, Message
from gateway.ports import Outcome, Reason, RecipientFailure, Status, Verdict
from gateway.spool import Delivery, SpoolError, SqliteSpool
from tests.support.deferreds import run
from tests.support.delivery import START, FakeDestination, MidRng, SlowDestination, World


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    w.manager.start()
    yield w
    stopped = Deferred.fromCoroutine(w.manager.stop(0))
    w.clock.advance(1)  # gives up on anything a test left hanging
    assert stopped.called
    run(w.spool.close())


def parse(message: Message) -> email.message.Message:
    assert isinstance(message, MailMessage)
    return email.message_from_bytes(message.to_bytes(), policy=email.policy.compat32)


def dsn_status(bounce: Message) -> str:
    parts = parse(bounce).get_payload()
    assert isinstance(parts, list)
    return str(parts[1].as_string())


# --- back-off --------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_jitter_within_20_percent() -> None:
    config = DestinationConfig(
        name="a", protocol="fake", retry_min=Duration(60), retry_max=Duration(600)
    )
    rng = random.Random(1)
    for attempts, base in [(0, 60), (1, 60), (2, 120), (3, 240), (4, 480), (5, 600), (30, 600)]:
        waits = [backoff(config, attempts, rng) for _ in range(200)]
        assert all(0.8 * base <= w <= 1.2 * base for w in waits), (attempts, min(waits), max(waits))
        # Jitter spreads the retries of many messages instead of sending them at once.
        assert max(waits) - min(waits) > 0.2 * base
        assert backoff(config, attempts, MidRng()) == base


def test_temporary_failure_is_retried_on_the_back_off_schedule(world: World) -> None:
    answers = iter([Outcome.temporary("451 busy")] * 3 + [Outcome.delivered("250 ok")])
    tries: list[float] = []

    def respond(message: MailMessage) -> Outcome:
        tries.append(world.clock.seconds())
        return next(answers)

    world.gateway.add(FakeDestination("a", respond))
    world.submit(world.mail(), "a")
    assert tries == [START]
    [queued] = world.queued()
    assert queued.attempts == 1 and queued.last_error == "451 busy"
    assert queued.next_try == START + 60
    world.advance(60 + 120 + 240 + 5)
    assert [t - START for t in tries] == [0, 60, 180, 420]
    assert world.queued() == []
    assert world.manager.counters.deferred == 3
    assert world.manager.counters.delivered == 1


# --- giving up: dead letters and bounces -------------------------------------------------


def test_max_age_makes_a_dead_letter_and_one_bounce_to_the_sender(world: World) -> None:
    dest = world.gateway.add(
        FakeDestination("a", lambda m: Outcome.temporary("451 still busy", code=451)),
        max_age=Duration(3600),
    )
    message = world.mail(recipients=("x@far.test",))
    world.submit(message, "a")
    assert len(world.queued()) == 1 and world.gateway.accepted == []
    # Tries at 0, 60, 180, 420, 900, 1860 s; the one at 3780 s is past max_age.
    world.advance(3770, step=10)
    assert len(dest.calls) == 6 and world.dead() == []
    world.advance(20, step=10)
    assert len(dest.calls) == 7
    [dead] = world.dead()
    assert "too old" in dead.last_error
    assert world.queued() == []
    calls = len(dest.calls)
    world.advance(86400, step=600)
    assert len(dest.calls) == calls  # a dead letter is not tried again
    [bounce] = world.gateway.accepted
    assert isinstance(bounce, MailMessage)
    assert bounce.sender == ""
    assert bounce.recipients == ("sender@client.test",)
    parsed = parse(bounce)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    status = dsn_status(bounce)
    assert "Final-Recipient: rfc822; x@far.test" in status
    assert "Status: 4.4.7" in status
    assert world.manager.counters.bounces == 1


def test_permanent_failure_is_dead_at_once_with_exactly_one_bounce(world: World) -> None:
    dest = world.gateway.add(
        FakeDestination(
            "a",
            lambda m: Outcome.permanent(
                "550 5.1.1 no such user", diagnostic="smtp; 550 5.1.1 no", dsn_status="5.1.1"
            ),
        )
    )
    world.submit(world.mail(recipients=("nobody@x.test",)), "a")
    [dead] = world.dead()
    assert dead.last_error == "550 5.1.1 no such user"
    assert world.queued() == []
    world.advance(7200, step=60)
    assert len(dest.calls) == 1
    [bounce] = world.gateway.accepted
    status = dsn_status(bounce)
    assert "Final-Recipient: rfc822; nobody@x.test" in status
    assert "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550" in status


def test_a_revived_dead_letter_gets_a_whole_schedule_again_and_no_second_bounce(
    world: World,
) -> None:
    """`gateway queue retry` on a dead letter: tries from the start (retry_min, doubling)
    for max_age from the retry; when it is given up again, its sender hears nothing more."""
    dest = world.gateway.add(
        FakeDestination("a", lambda m: Outcome.temporary("451 still busy", code=451)),
        max_age=Duration(3600),
    )
    world.submit(world.mail(recipients=("x@far.test",)), "a")
    world.advance(3790, step=10)
    [dead] = world.dead()
    assert len(dest.calls) == 7 and len(world.gateway.accepted) == 1 and dead.bounced
    world.advance(86400, step=600)  # long after: max_age would end it at its first failure
    assert run(world.spool.retry([dead.id])) == 1
    [revived] = world.queued()
    assert revived.attempts == 0 and revived.revived == world.clock.seconds()
    history = [event for _, event in run(world.spool.history(dead.id))]
    assert history[-1].startswith("revived from the dead letters")
    # Due at once, then again after 60, 120, 240, 480, 960 s: the same six tries and the
    # seventh, past max_age from the revival, makes it a dead letter again.
    world.advance(3770, step=10)
    assert len(dest.calls) == 7 + 6 and world.dead() == []
    [waiting] = world.queued()
    assert waiting.attempts == 6
    world.advance(20, step=10)
    [again] = world.dead()
    assert len(dest.calls) == 7 + 7 and "too old" in again.last_error
    assert len(world.gateway.accepted) == 1  # no second bounce
    assert world.manager.counters.bounces == 1


def test_a_revived_dead_letter_refused_again_sends_no_second_bounce(world: World) -> None:
    dest = world.gateway.add(
        FakeDestination("a", lambda m: Outcome.permanent("550 5.1.1 no", dsn_status="5.1.1"))
    )
    world.submit(world.mail(recipients=("nobody@x.test",)), "a")
    [dead] = world.dead()
    assert dead.bounced and len(world.gateway.accepted) == 1
    run(world.spool.retry(None))
    world.advance(2)
    [again] = world.dead()
    assert len(dest.calls) == 2 and again.bounced
    assert len(world.gateway.accepted) == 1


def test_a_bounce_that_could_not_be_queued_is_sent_when_the_revived_letter_fails(
    world: World,
) -> None:
    world.gateway.add(
        FakeDestination("a", lambda m: Outcome.permanent("550 5.1.1 no", dsn_status="5.1.1"))
    )
    refused: list[Message] = []

    async def full(message: Message) -> Verdict:
        refused.append(message)
        return Verdict(Status.TEMPORARY, Reason.UNAVAILABLE, "the spool is full")

    world.gateway.accept = full  # type: ignore[method-assign]
    world.submit(world.mail(recipients=("nobody@x.test",)), "a")
    [dead] = world.dead()
    assert not dead.bounced and len(refused) == 1
    del world.gateway.accept
    run(world.spool.retry(None))
    world.advance(2)
    [again] = world.dead()
    assert again.bounced and len(world.gateway.accepted) == 1


def test_no_bounce_for_a_bounce(world: World) -> None:
    world.gateway.add(
        FakeDestination("a", lambda m: Outcome.permanent("550 no", diagnostic="smtp; 550 no"))
    )
    world.submit(world.mail(sender=""), "a")
    assert len(world.dead()) == 1
    assert world.gateway.accepted == []
    assert world.manager.counters.bounces == 0


def test_partial_failure_retries_only_the_failed_recipients(world: World) -> None:
    answers = iter(
        [
            Outcome.temporary("452 mailbox busy", failed=("b@x.test",)),
            Outcome.delivered("250 ok"),
        ]
    )
    dest = world.gateway.add(FakeDestination("a", lambda m: next(answers)))
    world.submit(world.mail(recipients=("a@x.test", "b@x.test", "c@x.test")), "a")
    [queued] = world.queued()
    assert queued.recipients == ("b@x.test",)
    world.advance(61)
    assert [m.recipients for m in dest.calls] == [
        ("a@x.test", "b@x.test", "c@x.test"),
        ("b@x.test",),
    ]
    assert world.queued() == [] and world.gateway.accepted == []


def test_rejected_recipients_are_bounced_while_the_others_are_retried(world: World) -> None:
    answers = iter(
        [
            Outcome.temporary(
                "mixed",
                failed=("b@x.test",),
                rejected=(
                    RecipientFailure(
                        "c@x.test",
                        Reason.REFUSED,
                        "550 5.1.1 unknown user",
                        "5.1.1",
                        "smtp; 550 5.1.1",
                    ),
                ),
            ),
            Outcome.delivered("250 ok"),
        ]
    )
    dest = world.gateway.add(FakeDestination("a", lambda m: next(answers)))
    world.submit(world.mail(recipients=("a@x.test", "b@x.test", "c@x.test")), "a")
    [bounce] = world.gateway.accepted
    status = dsn_status(bounce)
    assert "Final-Recipient: rfc822; c@x.test" in status
    assert "b@x.test" not in status and "a@x.test" not in status
    [queued] = world.queued()
    assert queued.recipients == ("b@x.test",)
    world.advance(61)
    assert dest.calls[-1].recipients == ("b@x.test",)
    assert world.queued() == []
    assert len(world.gateway.accepted) == 1


def test_rejected_recipients_are_not_retried_when_failed_is_left_empty(world: World) -> None:
    """``failed`` empty means "all of them" -- all but those refused for good."""
    answers = iter(
        [
            Outcome.temporary(
                "mixed",
                rejected=(
                    RecipientFailure(
                        "c@x.test", Reason.REFUSED, "unknown", "5.1.1", "smtp; 550 5.1.1"
                    ),
                ),
            ),
            Outcome.delivered("250 ok"),
        ]
    )
    dest = world.gateway.add(FakeDestination("a", lambda m: next(answers)))
    world.submit(world.mail(recipients=("a@x.test", "c@x.test")), "a")
    [queued] = world.queued()
    assert queued.recipients == ("a@x.test",)
    world.advance(61)
    assert dest.calls[-1].recipients == ("a@x.test",)
    assert len(world.gateway.accepted) == 1


def test_every_recipient_rejected_on_a_temporary_outcome_is_dead_with_one_bounce(
    world: World,
) -> None:
    dest = world.gateway.add(
        FakeDestination(
            "a",
            lambda m: Outcome.temporary(
                "x",
                rejected=(
                    RecipientFailure("c@x.test", Reason.REFUSED, "no", "5.1.1", "smtp; 550 5.1.1"),
                ),
            ),
        )
    )
    world.submit(world.mail(recipients=("c@x.test",)), "a")
    assert world.queued() == [] and len(world.dead()) == 1
    world.advance(3600, step=60)
    assert len(dest.calls) == 1
    assert len(world.gateway.accepted) == 1


# --- scheduling ----------------------------------------------------------------------


def test_concurrency_limit_per_destination_and_a_slow_one_does_not_block_another(
    world: World,
) -> None:
    slow = world.gateway.add(SlowDestination("slow"), concurrency=2)
    fast = world.gateway.add(FakeDestination("fast"), concurrency=2)
    for _ in range(5):
        world.submit(world.mail(), "slow")
    assert len(slow.waiting) == 2
    world.advance(5)
    assert len(slow.waiting) == 2  # the poll does not exceed the limit either
    assert len(world.manager.active["slow"]) == 2
    # The slow destination's slots are full; the fast one delivers at once.
    for _ in range(6):
        world.submit(world.mail(), "fast")
    assert len(fast.calls) == 6
    assert [d.destination for d in world.queued()] == ["slow"] * 5
    # Free the slow slots: the rest follow, never more than two at a time.
    for _ in range(3):
        slow.release()
        world.advance(1)
    assert len(slow.calls) == 5
    assert slow.most_at_once == 2
    assert world.queued() == []


def test_a_delivery_that_waited_for_a_slot_gets_the_message_the_spool_would_give(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages stored while every slot is taken are kept in memory for the poll that starts
    them (no read back from the spool); past the bound they are read back as before."""
    slow = world.gateway.add(SlowDestination("slow"), concurrency=1)
    loads: list[str] = []
    real_load = world.spool.load

    async def counting_load(delivery: Delivery) -> Message:
        loads.append(delivery.id)
        return await real_load(delivery)

    monkeypatch.setattr(world.spool, "load", counting_load)
    monkeypatch.setattr(world.manager, "waiting_max_messages", 2)
    sent = [world.mail(recipients=("a@x.test", "b@x.test")) for _ in range(4)]
    deliveries = [world.submit(m, "slow")[0] for m in sent]
    assert len(slow.waiting) == 1
    for _ in range(3):
        slow.release()
        world.advance(1)
    slow.release()
    world.advance(1)
    assert [m.message_id for m in slow.calls] == [m.message_id for m in sent]
    for got, want in zip(slow.calls, sent, strict=True):
        assert got == want  # what load() gives: the same message, the same recipients
    # The second message was pushed out by the bound of two and came from the spool.
    assert loads == [deliveries[1].id]
    assert world.manager._waiting == {}
    assert world.queued() == []


def test_a_kept_message_goes_with_the_recipients_the_spool_has_for_the_delivery(
    world: World,
) -> None:
    slow = world.gateway.add(SlowDestination("slow"), concurrency=1)
    first = world.mail()
    world.submit(first, "slow")
    message = world.mail(recipients=("a@x.test", "b@x.test"))
    [delivery] = world.submit(message, "slow")
    # The workers only take a delivery as the spool has it (its remaining recipients).
    run(world.spool.defer(delivery, world.clock.seconds(), "partly", ("b@x.test",)))
    slow.release()
    world.advance(1)
    assert slow.calls[-1].recipients == ("b@x.test",)
    assert slow.calls[-1].headers == message.headers


def test_a_destination_that_raises_is_deferred_and_never_jams(world: World) -> None:
    answers: list[Exception | Outcome] = [RuntimeError("bug in a plugin"), Outcome.delivered()]

    def respond(message: MailMessage) -> Outcome:
        answer = answers.pop(0) if answers else Outcome.delivered()
        if isinstance(answer, Exception):
            raise answer
        return answer

    dest = world.gateway.add(FakeDestination("a", respond), concurrency=1)
    [broken] = world.submit(world.mail(), "a")
    [queued] = world.queued()
    assert queued.id == broken.id and queued.attempts == 1
    assert "bug in a plugin" in queued.last_error
    assert world.manager.active["a"] == set()
    world.submit(world.mail(), "a")  # the slot is free again
    assert len(dest.calls) == 2 and len(world.queued()) == 1
    world.advance(61)
    assert world.queued() == []


def test_a_destination_missing_from_the_config_is_deferred(world: World) -> None:
    world.gateway.add(FakeDestination("a"))
    [d] = world.submit(world.mail(), "gone")
    [queued] = world.queued()
    assert queued.id == d.id
    assert queued.last_error == "destination 'gone' is not configured"
    assert queued.next_try == START + 3600
    assert world.manager.active.get("gone", set()) == set()


# --- duplicates -----------------------------------------------------------------------


def test_a_message_id_delivered_within_the_window_is_not_delivered_again(world: World) -> None:
    dest = world.gateway.add(FakeDestination("a"), duplicate_window=Duration(3600))
    other = world.gateway.add(FakeDestination("b"))
    world.submit(world.mail(msgid="<same@client.test>"), "a")
    world.advance(10)
    world.submit(world.mail(msgid="<same@client.test>"), "a")
    assert len(dest.calls) == 1
    assert world.queued() == []
    assert world.manager.counters.duplicates == 1
    assert world.manager.counters.by_destination[("a", "duplicate")] == 1
    # Another destination has not had it yet.
    world.submit(world.mail(msgid="<same@client.test>"), "b")
    assert len(other.calls) == 1
    # Once the window has passed it is delivered again.
    world.advance(3600, step=60)
    world.submit(world.mail(msgid="<same@client.test>"), "a")
    assert len(dest.calls) == 2
    # Messages without a Message-ID are never taken for duplicates.
    world.submit(world.mail(msgid=None), "a")
    world.submit(world.mail(msgid=None), "a")
    assert len(dest.calls) == 4


def test_two_copies_of_a_message_queued_at_once_are_delivered_once(world: World) -> None:
    """A client that resends after a lost reply leaves two copies; with room for both, the
    second must wait for the first instead of racing past the duplicate check."""
    slow = world.gateway.add(SlowDestination("a"), concurrency=5)
    world.submit(world.mail(msgid="<twice@client.test>"), "a")
    world.submit(world.mail(msgid="<twice@client.test>"), "a")
    world.advance(3)
    assert len(slow.waiting) == 1
    slow.release()
    world.advance(2)
    assert len(slow.calls) == 1
    assert world.queued() == []
    assert world.manager.counters.duplicates == 1


# --- a spool that cannot write --------------------------------------------------------------


class FlakySpool:
    """The real spool, except that its changes fail while ``full`` is set."""

    def __init__(self, spool: SqliteSpool) -> None:
        self.spool = spool
        self.full = False
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.spool, name)
        if name not in ("delivered", "defer", "kill"):
            return method

        async def change(*args: Any) -> Any:
            if self.full:
                self.failed += 1
                raise SpoolError("the spool cannot store the message: database or disk is full")
            return await method(*args)

        return change


@pytest.mark.parametrize("outcome", [Outcome.delivered("250 ok"), Outcome.temporary("451 busy")])
def test_an_outcome_the_spool_cannot_record_holds_the_delivery(
    world: World, outcome: Outcome
) -> None:
    """No redelivery storm on a full disk: the delivery waits until its outcome is recorded."""
    flaky = FlakySpool(world.spool)
    world.manager.spool = flaky  # type: ignore[assignment]
    dest = world.gateway.add(FakeDestination("a", lambda m: outcome))
    flaky.full = True
    [held] = world.submit(world.mail(), "a")
    world.submit(world.mail(), "a")
    assert len(dest.calls) == 2
    world.advance(30)
    assert len(dest.calls) == 2  # not tried again while its outcome is unrecorded
    assert flaky.failed > 2  # the change is tried again
    flaky.full = False
    world.advance(1)
    if outcome.ok:
        assert world.queued() == []
    else:
        assert {d.attempts for d in world.queued()} == {1}
        assert next(d for d in world.queued() if d.id == held.id).next_try == START + 60
    assert len(dest.calls) == 2


def test_stop_waits_for_deliveries_in_progress(world: World) -> None:
    slow = world.gateway.add(SlowDestination("a"))
    world.submit(world.mail(), "a")
    stopped = Deferred.fromCoroutine(world.manager.stop(30))
    assert not stopped.called
    world.submit(world.mail(), "a")  # nothing new starts while stopping
    assert len(slow.waiting) == 1
    slow.release()
    assert stopped.called
    assert len(world.queued()) == 1


def test_stop_gives_up_after_its_timeout(world: World) -> None:
    world.gateway.add(SlowDestination("a"))
    world.submit(world.mail(), "a")
    stopped = Deferred.fromCoroutine(world.manager.stop(5))
    world.clock.advance(4)
    assert not stopped.called
    world.clock.advance(2)
    assert stopped.called
    assert len(world.queued()) == 1  # tried again after the restart
