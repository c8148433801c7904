"""Delivery workers in memory: destinations whose answers a test decides, and a World
that runs a DeliveryManager with a real SQLite spool on a fake clock."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gateway.config import DestinationConfig, Duration
from gateway.delivery import DeliveryManager
from gateway.message import Kind, MailMessage, Message
from gateway.ports import Deliverer, Outcome, Reason, Status, Verdict
from gateway.spool import DEAD, QUEUED, Delivery, SqliteSpool, Stored
from tests.support.deferreds import run

START = 1_700_000_000.0


Respond = Callable[[MailMessage], "Outcome | Deferred[Outcome]"]


class FakeDestination(Deliverer):
    """Answers each delivery with ``respond(message)``: an Outcome, or a Deferred the test
    fires later (a slow destination); raises if ``respond`` raises."""

    kinds = frozenset({Kind.MAIL})

    def __init__(self, name: str, respond: Respond | None = None) -> None:
        self.name = name
        self.respond: Respond = respond or (lambda m: Outcome.delivered("250 ok"))
        self.calls: list[MailMessage] = []
        self.in_progress = 0
        self.most_at_once = 0

    async def deliver(self, message: Message) -> Outcome:
        assert isinstance(message, MailMessage)
        self.calls.append(message)
        self.in_progress += 1
        self.most_at_once = max(self.most_at_once, self.in_progress)
        try:
            result = self.respond(message)
            if isinstance(result, Deferred):
                result = await result
            return result
        finally:
            self.in_progress -= 1

    async def close(self) -> None:
        pass


class SlowDestination(FakeDestination):
    """Holds every delivery until the test releases it."""

    def __init__(self, name: str) -> None:
        super().__init__(name, self._hold)
        self.waiting: list[Deferred[Outcome]] = []

    def _hold(self, message: MailMessage) -> Deferred[Outcome]:
        d: Deferred[Outcome] = Deferred()
        self.waiting.append(d)
        return d

    def release(self, outcome: Outcome | None = None) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(outcome or Outcome.delivered("250 ok"))


class FakeGateway:
    """What DeliveryManager uses of GatewayService: current(), hostname_for(), accept()."""

    def __init__(self) -> None:
        self.configs: dict[str, DestinationConfig] = {}
        self.destinations: dict[str, FakeDestination] = {}
        self.accepted: list[Message] = []

    def add(self, dest: FakeDestination, **settings: Any) -> FakeDestination:
        values: dict[str, Any] = {
            "concurrency": 10,
            "retry_min": Duration(60),
            "retry_max": Duration(3600),
            "max_age": Duration(86400),
            "duplicate_window": Duration(86400),
        }
        values.update(settings)
        self.configs[dest.name] = DestinationConfig(name=dest.name, protocol="fake", **values)
        self.destinations[dest.name] = dest
        return dest

    def current(self) -> Any:
        return SimpleNamespace(
            config=SimpleNamespace(destinations=self.configs), destinations=self.destinations
        )

    def hostname_for(self, listener: str) -> str:
        return "gw.test"

    async def accept(self, message: Message) -> Verdict:
        self.accepted.append(message)
        return Verdict(Status.DELIVERED, Reason.NONE, "queued")


class MidRng(random.Random):
    """Jitter factor exactly 1, so waits are predictable."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


class World:
    """A DeliveryManager on a Clock, with its spool, gateway and helpers."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = SqliteSpool(tmp_path / "spool", clock=self.clock.seconds, reserve=0)
        run(self.spool.open())
        self.gateway = FakeGateway()
        self.manager = DeliveryManager(
            self.spool,
            self.gateway,  # type: ignore[arg-type]
            self.clock,
            poll_interval=1.0,
            rng=MidRng(),
            clock=self.clock.seconds,
        )
        self.seq = 0

    def mail(
        self,
        *,
        recipients: tuple[str, ...] = ("rcpt@x.test",),
        sender: str = "sender@client.test",
        msgid: str | None = "auto",
        received: float | None = None,
    ) -> MailMessage:
        self.seq += 1
        header = f"Subject: number {self.seq}\n"
        if msgid is not None:
            mid = f"<{self.seq}@client.test>" if msgid == "auto" else msgid
            header += f"Message-ID: {mid}\n"
        return MailMessage.from_bytes(
            f"{header}\nbody\n".encode(),
            sender=sender,
            recipients=recipients,
            listener="in",
            client="127.0.0.1",
            received=self.clock.seconds() if received is None else received,
        )

    def submit(self, message: MailMessage, *destinations: str) -> list[Delivery]:
        """Spool the message and offer it to the workers, as GatewayService.submit does."""
        deliveries = run(self.spool.put([Stored(message, "r", destinations)]))
        self.manager.offer(deliveries, {deliveries[0].message_id: message})
        return deliveries

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Let time pass in poll-sized steps."""
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step

    def queued(self) -> list[Delivery]:
        return run(self.spool.entries(QUEUED))

    def dead(self) -> list[Delivery]:
        return run(self.spool.entries(DEAD))
