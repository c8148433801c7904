"""The dashboard's last hour: per-minute counts from snapshots of running totals, and the
chart drawn from them."""

from __future__ import annotations

import re

from twisted.internet.task import Clock

from gateway.dashboard import chart
from gateway.history import MINUTES, History, Key


def _history() -> tuple[History, dict[Key, int], Clock]:
    totals: dict[Key, int] = {}
    clock = Clock()
    history = History(lambda: totals, clock)
    history.start()
    return history, totals, clock


def test_each_minute_counts_what_happened_in_it_and_the_running_minute_is_last() -> None:
    history, totals, clock = _history()
    key = ("route", "mail", "queued")
    totals[key] = 3
    clock.advance(60)
    totals[key] = 5
    clock.advance(60)
    totals[key] = 9
    series = history.series()[key]
    assert len(series) == MINUTES
    assert series[-3:] == [3, 2, 4]
    assert sum(series) == 9
    history.stop()
    assert not clock.getDelayedCalls()


def test_only_the_last_hour_is_kept() -> None:
    history, totals, clock = _history()
    key = ("destination", "box", "delivered")
    for minute in range(2 * MINUTES):
        totals[key] = minute + 1  # one a minute
        clock.advance(60)
    # 59 minutes of one each, and nothing yet in the minute now running
    assert history.series()[key] == [1] * (MINUTES - 1) + [0]


def test_a_key_that_appears_later_and_a_total_that_falls() -> None:
    history, totals, clock = _history()
    clock.advance(60)
    totals[("route", "new", "failed")] = 2
    totals[("route", "old", "queued")] = 7
    clock.advance(60)
    totals[("route", "old", "queued")] = 1  # a reset: that minute counts nothing
    series = history.series()
    assert series[("route", "new", "failed")][-2:] == [2, 0]
    assert series[("route", "old", "queued")][-2:] == [7, 0]


def test_the_chart_has_a_bar_per_busy_minute_and_says_what_it_shows() -> None:
    ok = [0] * (MINUTES - 3) + [4, 0, 1]
    bad = [0] * (MINUTES - 3) + [1, 0, 0]
    svg = chart([(ok, "ok", "delivered"), (bad, "bad", "refused")], "destination box")
    assert 'data-total="6"' in svg
    assert "destination box, last hour: 5 delivered, 1 refused; at most 5 a minute" in svg
    assert svg.count("<g>") == 2 and svg.count("<rect") == 3
    assert "2 min ago: 4 delivered, 1 refused" in svg and "this minute: 1 delivered" in svg
    heights = [float(h) for h in re.findall(r'height="([0-9.]+)"', svg)[1:]]
    assert max(heights) <= 28 and min(heights) >= 1
    empty = chart([([0] * MINUTES, "ok", "queued")], "route r")
    assert 'data-total="0"' in empty and "<rect" not in empty


def test_names_in_a_chart_are_escaped() -> None:
    svg = chart([([1] + [0] * (MINUTES - 1), "ok", "queued")], 'route <a&"b>')
    assert "<a&" not in svg and "&lt;a&amp;&quot;b&gt;" in svg
