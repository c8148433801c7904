"""Delivery workers: take spooled messages to their destinations, retry, give up.

Each destination has its own concurrency limit and its own queue in the spool,
so a destination that is down or slow never holds up the others.  A temporary
failure is retried with exponential back-off and jitter until the
destination's ``max_age``; then, or at once on a permanent failure, the
delivery becomes a dead letter and mail is bounced to its sender.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.bounce import make_bounce
from gateway.config import DestinationConfig
from gateway.message import MailMessage, Message, addressed_to
from gateway.ports import Deliverer, Outcome, Reason, RecipientFailure, Status
from gateway.spool import Delivery, SpoolBackend, SpoolError
from gateway.stats import Histogram

if TYPE_CHECKING:
    from gateway.service import GatewayService

log = Logger(namespace="gateway.delivery")


def backoff(config: DestinationConfig, attempts: int, rng: random.Random) -> float:
    """Seconds to wait after the ``attempts``-th failed try: doubling, capped, +-20% jitter."""
    base = min(float(config.retry_max), float(config.retry_min) * 2.0 ** max(0, attempts - 1))
    return base * rng.uniform(0.8, 1.2)


@dataclass
class Counters:
    """What the workers did since start; the admin site exports these."""

    delivered: int = 0
    deferred: int = 0
    dead: int = 0
    duplicates: int = 0
    bounces: int = 0
    by_destination: dict[tuple[str, str], int] = field(default_factory=dict)
    durations: dict[str, Histogram] = field(default_factory=dict)  # of deliver(), by destination

    def count(self, destination: str, outcome: str) -> None:
        key = (destination, outcome)
        self.by_destination[key] = self.by_destination.get(key, 0) + 1

    def observe(self, destination: str, seconds: float) -> None:
        histogram = self.durations.get(destination)
        if histogram is None:
            histogram = self.durations[destination] = Histogram()
        histogram.observe(seconds)


class DeliveryManager:
    """Runs the deliveries of every destination from one spool."""

    def __init__(
        self,
        spool: SpoolBackend,
        gateway: GatewayService,
        reactor: Any,
        *,
        poll_interval: float = 1.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.gateway = gateway
        self.reactor = reactor
        self.poll_interval = poll_interval
        self.rng = rng or random.Random()
        self.clock = clock
        self.active: dict[str, set[str]] = {}  # destination -> delivery ids being tried
        self.counters = Counters()
        self._loop: task.LoopingCall | None = None
        self._polling: set[str] = set()
        self._repoll: set[str] = set()
        self._running: set[Deferred[None]] = set()
        # (destination, Message-ID) of deliveries in progress: a second copy of a
        # message waits for the first, so the duplicate check can see it.
        self._msgids: set[tuple[str, str]] = set()
        # Changes the spool could not take (disk full), by delivery id: the delivery,
        # what happened and the change. Those deliveries wait until it is recorded.
        self._unsaved: dict[str, tuple[Delivery, str, Callable[[], Awaitable[None]]]] = {}
        self._saving = False
        self.stopping = False
        # Messages just stored whose deliveries found no free slot, by stored message id,
        # with the number of those deliveries: the poll that starts them later takes the
        # message from here instead of reading and parsing it back from the spool.
        self._waiting: OrderedDict[str, tuple[Message, int, int]] = OrderedDict()
        self._waiting_bytes = 0

    # --- life cycle ---

    def start(self) -> None:
        self._loop = task.LoopingCall(self.poll_all)
        self._loop.clock = self.reactor
        self._loop.start(self.poll_interval, now=True)

    async def stop(self, timeout: float) -> None:
        """No new tries; wait up to ``timeout`` for those in progress."""
        self.stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._running:
            waiting = defer.DeferredList(list(self._running), consumeErrors=True)
            timer = self.reactor.callLater(timeout, waiting.cancel)
            try:
                await waiting
            except defer.CancelledError:
                log.warn(
                    "{count} deliveries still running at shutdown; they will be tried again",
                    count=len(self._running),
                )
            finally:
                if timer.active():
                    timer.cancel()
        if self._unsaved and not self._saving:
            await self._save_unsaved()
        if self._unsaved:
            log.warn(
                "{count} delivery outcomes could not be recorded in the spool; those"
                " deliveries will be tried again after the restart",
                count=len(self._unsaved),
            )

    # --- scheduling ---

    def _config(self, destination: str) -> DestinationConfig | None:
        config = self.gateway.current().config.destinations.get(destination)
        return config if isinstance(config, DestinationConfig) else None

    def _free(self, destination: str) -> int:
        config = self._config(destination)
        limit = config.concurrency if config is not None else 1
        return limit - len(self.active.get(destination, ()))

    # Bounds of the messages kept for deliveries that wait for a slot.
    waiting_max_messages = 2000
    waiting_max_bytes = 32 * 1024 * 1024

    def offer(self, deliveries: list[Delivery], messages: dict[str, Message]) -> None:
        """Start just-stored deliveries at once when their destination has room."""
        for delivery in deliveries:
            message = messages.get(delivery.message_id)
            if self.stopping or self._free(delivery.destination) <= 0:
                # The poll picks it up when a slot frees.
                if message is not None:
                    self._keep_waiting(delivery.message_id, message)
                continue
            self._start(delivery, message)

    def _keep_waiting(self, message_id: str, message: Message) -> None:
        size = len(getattr(message, "body", b"")) + 1024
        entry = self._waiting.get(message_id)
        if entry is not None:
            self._waiting[message_id] = (entry[0], entry[1] + 1, entry[2])
            return
        if size > self.waiting_max_bytes // 4:
            return  # a big one is read back from the spool
        self._waiting[message_id] = (message, 1, size)
        self._waiting_bytes += size
        while (
            len(self._waiting) > self.waiting_max_messages
            or self._waiting_bytes > self.waiting_max_bytes
        ):
            _, (_, _, dropped) = self._waiting.popitem(last=False)
            self._waiting_bytes -= dropped

    def _take_waiting(self, delivery: Delivery) -> Message | None:
        """The kept message of ``delivery`` as the spool would give it, or None."""
        entry = self._waiting.get(delivery.message_id)
        if entry is None:
            return None
        message, count, size = entry
        if count > 1:
            self._waiting[delivery.message_id] = (message, count - 1, size)
        else:
            del self._waiting[delivery.message_id]
            self._waiting_bytes -= size
        if isinstance(message, MailMessage):
            message = message.with_recipients(delivery.recipients)
        return message

    def poll_all(self) -> None:
        if self.stopping:
            return
        if self._unsaved and not self._saving:
            Deferred.fromCoroutine(self._save_unsaved()).addErrback(
                lambda f: log.failure("recording delivery outcomes failed", f)
            )
        for destination in self.gateway.current().config.destinations:
            self.kick(destination)

    def kick(self, destination: str) -> None:
        """Look for due deliveries of ``destination`` (coalesced)."""
        if self.stopping:
            return
        if destination in self._polling:
            self._repoll.add(destination)
            return
        free = self._free(destination)
        if free <= 0:
            return
        self._polling.add(destination)
        Deferred.fromCoroutine(self._poll(destination, free)).addErrback(
            lambda f: log.failure(
                "polling the spool for {destination} failed", f, destination=destination
            )
        )

    async def _poll(self, destination: str, free: int) -> None:
        try:
            exclude = frozenset(self.active.get(destination, ())) | frozenset(self._unsaved)
            due = await self.spool.due(destination, self.clock(), free, exclude)
            for delivery in due:
                if self.stopping or self._free(destination) <= 0:
                    break
                if delivery.id not in self.active.get(destination, ()):
                    self._start(delivery, None)
        finally:
            self._polling.discard(destination)
        if destination in self._repoll:
            self._repoll.discard(destination)
            self.kick(destination)

    def _start(self, delivery: Delivery, message: Message | None) -> None:
        active = self.active.setdefault(delivery.destination, set())
        if delivery.id in active or delivery.id in self._unsaved:
            return
        key = (delivery.destination, delivery.msgid)
        if delivery.msgid:
            if key in self._msgids:
                return  # a copy is on its way there; this one is polled again after it
            self._msgids.add(key)
        active.add(delivery.id)
        if message is None:
            message = self._take_waiting(delivery)
        d = Deferred.fromCoroutine(self._attempt(delivery, message))
        self._running.add(d)

        def done(_: object) -> None:
            self._running.discard(d)
            active.discard(delivery.id)
            if delivery.msgid and delivery.id not in self._unsaved:
                self._msgids.discard(key)
            self.kick(delivery.destination)

        d.addErrback(lambda f: log.failure("delivery {id} crashed", f, id=delivery.id))
        d.addBoth(done)

    # --- recording outcomes ---

    async def _record(
        self, delivery: Delivery, what: str, change: Callable[[], Awaitable[None]]
    ) -> None:
        """Make a change to a delivery in the spool, or hold the delivery until it is made.

        A spool that cannot write (disk full) must not make the workers try a
        delivery again and again: the change is kept in memory, the delivery is
        left alone, and the change is tried again on every poll.
        """
        try:
            await change()
        except SpoolError as exc:
            log.error(
                "id={id} delivery={delivery} destination={destination}: the spool cannot record"
                " that the delivery was {what} ({error}); it is held and recording is tried"
                " again every {interval}s",
                id=delivery.queue_id,
                delivery=delivery.id,
                destination=delivery.destination,
                what=what,
                error=str(exc),
                interval=self.poll_interval,
            )
            self._unsaved[delivery.id] = (delivery, what, change)

    async def _save_unsaved(self) -> None:
        self._saving = True
        try:
            for delivery, what, change in list(self._unsaved.values()):
                try:
                    await change()
                except SpoolError:
                    return  # still failing: the next poll tries again
                del self._unsaved[delivery.id]
                if delivery.msgid:
                    self._msgids.discard((delivery.destination, delivery.msgid))
                log.info(
                    "id={id} delivery={delivery}: the spool has now recorded that the delivery"
                    " was {what}",
                    id=delivery.queue_id,
                    delivery=delivery.id,
                    what=what,
                )
        finally:
            self._saving = False

    # --- one try ---

    async def _attempt(self, delivery: Delivery, message: Message | None) -> None:
        now = self.clock()
        config = self._config(delivery.destination)
        runtime = self.gateway.current()
        destination = runtime.destinations.get(delivery.destination)
        if config is None or not isinstance(destination, Deliverer):
            error = f"destination '{delivery.destination}' is not configured"
            await self._record(
                delivery,
                "deferred",
                lambda: self.spool.defer(delivery, now + 3600, error, delivery.recipients),
            )
            return
        try:
            if message is None:
                message = await self.spool.load(delivery)
            if delivery.msgid and await self.spool.seen(
                delivery.destination, delivery.msgid, now - config.duplicate_window
            ):
                log.info(
                    "id={id} delivery={delivery} msgid={msgid} route={route}"
                    " destination={destination} outcome=duplicate"
                    " detail=already delivered within {window}s",
                    id=delivery.queue_id,
                    delivery=delivery.id,
                    msgid=delivery.msgid,
                    route=delivery.route,
                    destination=delivery.destination,
                    window=config.duplicate_window,
                )
                self.counters.duplicates += 1
                self.counters.count(delivery.destination, "duplicate")
                await self._record(
                    delivery,
                    "a duplicate",
                    lambda: self.spool.delivered(delivery, "duplicate", None),
                )
                return
            started = self.clock()
            try:
                outcome = await destination.deliver(message)
            except Exception as exc:
                log.failure(
                    "destination {destination} raised delivering {id}",
                    destination=delivery.destination,
                    id=delivery.id,
                )
                outcome = Outcome.temporary(f"internal error in destination: {exc}")
            self.counters.observe(delivery.destination, self.clock() - started)
        except Exception as exc:
            log.failure(
                "delivery {id} failed before reaching {destination}",
                id=delivery.id,
                destination=delivery.destination,
            )
            outcome = Outcome.temporary(f"internal error: {exc}")
        # The slot stays taken until the outcome is on disk: so a crash leaves at most
        # `concurrency` deliveries per destination in doubt (sent, not recorded).
        await self._settle(delivery, message, config, outcome, now)

    async def _settle(
        self,
        delivery: Delivery,
        message: Message | None,
        config: DestinationConfig,
        outcome: Outcome,
        now: float,
    ) -> None:
        self.counters.count(delivery.destination, str(outcome.status))
        if outcome.status is Status.DELIVERED:
            self._log_try(delivery, message, "delivered", outcome.detail)
            self.counters.delivered += 1
            forget_before = now - config.duplicate_window
            await self._record(
                delivery,
                "delivered",
                lambda: self.spool.delivered(delivery, outcome.detail, forget_before),
            )
            return
        failures = list(outcome.rejected)
        if outcome.status is Status.PERMANENT:
            if not failures:
                failures = [
                    RecipientFailure(
                        r,
                        outcome.reason,
                        outcome.detail,
                        outcome.dsn_status or "5.0.0",
                        outcome.diagnostic,
                    )
                    for r in delivery.recipients
                ]
            await self._dead(delivery, message, outcome.detail, failures)
            return
        refused = {f.recipient for f in failures}
        remaining = outcome.failed or tuple(r for r in delivery.recipients if r not in refused)
        bounced = False
        if failures:
            bounced = await self._bounce(delivery, message, failures)
        if not remaining and delivery.recipients:
            # Every recipient left was refused for good, and bounced just now.
            # (Articles have no recipients: a temporary failure is retried.)
            await self._dead(delivery, message, outcome.detail, [], bounced)
            return
        # Measured now, when the outcome is known: a try that started just inside max_age
        # and failed after it is past it.
        age = self.clock() - delivery.since
        if age >= config.max_age:
            expired = [
                RecipientFailure(
                    r,
                    Reason.UNAVAILABLE,
                    f"gave up after {age / 3600:.1f} hours: {outcome.detail}",
                    "4.4.7",
                    outcome.diagnostic,
                )
                for r in remaining
            ]
            await self._dead(delivery, message, f"too old ({age:.0f}s): {outcome.detail}", expired)
            return
        self._log_try(delivery, message, "temporary", outcome.detail)
        self.counters.deferred += 1
        wait = backoff(config, delivery.attempts + 1, self.rng)
        if outcome.retry_after is not None:
            # The destination said when to come back (HTTP Retry-After): then, but not
            # sooner than a second (a "0" must not make a busy loop) and never later than
            # retry_max, so a far-off date cannot park the message.
            wait = min(max(1.0, outcome.retry_after), float(config.retry_max))
        await self._record(
            delivery,
            "deferred",
            lambda: self.spool.defer(delivery, now + wait, outcome.detail, tuple(remaining)),
        )

    def _log_try(
        self, delivery: Delivery, message: Message | None, outcome: str, detail: str
    ) -> None:
        """The one log line of a try: delivered, temporary (tried again later) or dead."""
        emit = log.warn if outcome == "dead" else log.info
        emit(
            "id={id} delivery={delivery} msgid={msgid} route={route} destination={destination}"
            " to={to} attempt={attempt} outcome={outcome} detail={detail}",
            id=delivery.queue_id,
            delivery=delivery.id,
            msgid=delivery.msgid,
            route=delivery.route,
            destination=delivery.destination,
            to=",".join(delivery.recipients or addressed_to(message)),
            attempt=delivery.attempts + 1,
            outcome=outcome,
            detail=detail,
        )
        tracer = getattr(self.gateway, "tracer", None)
        if tracer is not None and tracer.active:
            tracer.emit(
                "delivery",
                id=delivery.queue_id,
                delivery=delivery.id,
                msgid=delivery.msgid,
                route=delivery.route,
                destination=delivery.destination,
                to=list(delivery.recipients or addressed_to(message)),
                attempt=delivery.attempts + 1,
                outcome=outcome,
                detail=detail,
            )

    async def _dead(
        self,
        delivery: Delivery,
        message: Message | None,
        reason: str,
        failures: list[RecipientFailure],
        bounced: bool = False,
    ) -> None:
        """Make the delivery a dead letter and tell the sender (once: a dead letter that
        ``gateway queue retry`` revived and that fails again sends no second bounce).

        The bounce is queued before the dead letter is recorded: a crash between the
        two tries the delivery again rather than leave the sender untold.
        """
        self.counters.dead += 1
        self._log_try(delivery, message, "dead", reason)
        if delivery.bounced and failures:
            log.info(
                "id={id} delivery={delivery}: no second bounce, the sender had one already",
                id=delivery.queue_id,
                delivery=delivery.id,
            )
            bounced = True
        elif failures:
            bounced = await self._bounce(delivery, message, failures)
        told = bounced or delivery.bounced
        await self._record(
            delivery, "a dead letter", lambda: self.spool.kill(delivery, reason, told)
        )

    async def _bounce(
        self, delivery: Delivery, message: Message | None, failures: list[RecipientFailure]
    ) -> bool:
        """Queue a bounce for ``failures`` to the sender; whether one was queued."""
        if not isinstance(message, MailMessage) or not message.sender or not failures:
            return False  # no bounces for news, for bounces (empty sender), or when nothing failed
        bounce = make_bounce(message, failures, self.gateway.hostname_for(message.listener))
        verdict = await self.gateway.accept(bounce)
        if verdict.status is Status.DELIVERED:
            self.counters.bounces += 1
            log.info(
                "id={id} delivery={delivery}: bounce {bounce} queued for {sender}",
                id=delivery.queue_id,
                delivery=delivery.id,
                bounce=bounce.id,
                sender=message.sender,
            )
            return True
        else:
            log.warn(
                "id={id} delivery={delivery}: the bounce to {sender} could not be queued: {why}",
                id=delivery.queue_id,
                delivery=delivery.id,
                sender=message.sender,
                why=verdict.detail,
            )
            return False
