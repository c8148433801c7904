"""FakePort: the GatewayPort a listener under test is handed, in memory.

It records what listeners submit and answers with a verdict the test chooses
(one for all, or one per Message-ID); ``hold`` makes submissions wait until the
test fires it, ``spool`` stores what is taken (and the
state) in a real spool, and ``on_submit`` runs after that (a test that
crashes there, say).  ``table`` is the RouteTable listeners ask for routes and
destinations, usually a ``Runtime`` built from a configuration text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from gateway.config import Config, parse
from gateway.message import Message
from gateway.plugins import Transforms, load_transforms
from gateway.ports import Destination, Reason, RouteTable, Status, Upload, Verdict
from gateway.service import Runtime
from gateway.spool import SqliteSpool, Stored
from gateway.tracing import Tracer

__all__ = ["FakePort", "runtime_of"]


def runtime_of(
    config: Config | str,
    destinations: Mapping[str, Destination] | None = None,
    *,
    transforms: Transforms | None = None,
) -> Runtime:
    """The routes and destinations of ``config`` (a Config or routes.yaml text) as a table."""
    if isinstance(config, str):
        config = parse(config, "routes.yaml", Path("/tmp"))
    return Runtime(
        config,
        transforms if transforms is not None else load_transforms(entry_points=False),
        dict(destinations or {}),
    )


class FakePort:
    """The gateway as a listener sees it, for unit tests."""

    def __init__(
        self,
        table: RouteTable | None = None,
        *,
        reactor: Any = None,
        verdict: Verdict | None = None,
        accepts: Callable[[str, str, str, str], bool] | None = None,
        spool: SqliteSpool | None = None,
    ) -> None:
        self.reactor = reactor if reactor is not None else MemoryReactorClock()
        self.table = table
        self.stopping = False
        self.verdict = verdict or Verdict(Status.DELIVERED, Reason.NONE, "queued")
        self.verdicts: dict[str, Verdict] = {}  # by Message-ID, before ``verdict``
        self.submitted: list[Message] = []
        self.states: list[Mapping[str, str] | None] = []
        self.state: dict[str, str] = {}
        self.hold: Deferred[None] | None = None
        self.on_submit: Callable[[Message, Mapping[str, str] | None], Awaitable[None]] | None = None
        self._accepts = accepts
        self.seconds: Callable[[], float] = self.reactor.seconds
        self.spool = spool  # when given, what is taken and the state are stored in it
        self.tracer = Tracer()

    # GatewayPort

    def current(self) -> RouteTable:
        if self.table is None:
            raise AssertionError("this test gave the FakePort no route table")
        return self.table

    def accepts_recipient(
        self, listener: str, sender: str, recipient: str, client: str, user: str = ""
    ) -> bool:
        if self._accepts is not None:
            return self._accepts(listener, sender, recipient, client)
        if isinstance(self.table, Runtime):
            return self.table.router.accepts_recipient(listener, sender, recipient, client, user)
        return True

    async def submit(self, message: Message, *, state: Mapping[str, str] | None = None) -> Verdict:
        self.submitted.append(message)
        self.states.append(state)
        msgid = getattr(message, "message_id", None) or ""
        verdict = self.verdicts.get(msgid, self.verdict)  # the one chosen when it arrived
        if self.hold is not None:
            await self.hold
        if verdict.status is Status.DELIVERED:
            if self.spool is not None:
                await self.spool.put([Stored(message, "route", ("destination",))], state)
            elif state:
                self.state.update(state)
            if self.on_submit is not None:
                await self.on_submit(message, state)
        return verdict

    async def get_state(self, key: str) -> str | None:
        if self.spool is not None:
            return await self.spool.get_state(key)
        return self.state.get(key)

    async def set_state(self, key: str, value: str) -> None:
        if self.spool is not None:
            await self.spool.set_state(key, value)
        else:
            self.state[key] = value

    def upload(self) -> Upload:
        if self.spool is None:
            raise OSError("this FakePort has no spool for uploads")
        return self.spool.upload()
