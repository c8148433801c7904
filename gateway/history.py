"""The last hour, minute by minute, for the dashboard's charts.

The routes and the delivery workers keep running totals (plain ints); once a
minute a snapshot of them is kept, sixty at most.  A minute's count is the
difference between two snapshots, and the minute now running is the totals
now less the last snapshot.  Nothing is done per message.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import Any

from twisted.internet import task

MINUTES = 60

# ("route", name, outcome) or ("destination", name, outcome)
Key = tuple[str, str, str]


class History:
    def __init__(self, totals: Callable[[], Mapping[Key, int]], reactor: Any) -> None:
        self.totals = totals
        self._snapshots: deque[dict[Key, int]] = deque(maxlen=MINUTES)
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = reactor

    def start(self) -> None:
        self._loop.start(60.0, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def tick(self) -> None:
        self._snapshots.append(dict(self.totals()))

    def series(self) -> dict[Key, list[int]]:
        """Per key, the counts of the last ``MINUTES`` minutes, oldest first; the last is
        the minute now running.  Minutes before the start count 0."""
        points = [*self._snapshots, dict(self.totals())]
        keys = set().union(*points)
        out: dict[Key, list[int]] = {}
        for key in keys:
            values = [p.get(key, 0) for p in points]
            # A total never falls; if one did (a counter reset), that minute counts 0.
            steps = [max(0, b - a) for a, b in pairwise(values)]
            out[key] = [0] * (MINUTES - len(steps)) + steps[-MINUTES:]
        return out
