"""Log formats (text, journal, JSON), the latency histogram, and /readyz's reasons."""

from __future__ import annotations

import datetime
import io
import json
import os
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from gateway.cli import _format, _format_journal, _format_json, journal_stream
from gateway.service import GatewayService
from gateway.stats import Histogram

STAMP = 1_700_000_000.5


def event(level: LogLevel = LogLevel.info, **fields: object) -> dict[str, object]:
    return {
        "log_level": level,
        "log_namespace": "gateway.service",
        "log_time": STAMP,
        "log_format": "id={id} route={route} outcome=queued",
        "id": "Q1",
        "route": "local-mailbox",
        **fields,
    }


def test_text_format_has_time_level_and_namespace() -> None:
    line = _format(event())
    assert line is not None
    assert line.endswith(" info  gateway.service: id=Q1 route=local-mailbox outcome=queued\n")
    assert line[:4].isdigit() and line[10] == "T"


@pytest.mark.parametrize(
    "fields",
    [
        {"log_format": "id={id!r} n={n:>4} {a.real}", "id": "Q1", "n": 7, "a": 3},
        {"log_format": "{thing()} and {id}", "thing": lambda: "called", "id": "Q1"},
        {"log_format": "{missing} here"},
        {"log_format": "{} positional"},
        {"log_format": "{unclosed"},
        {"log_format": b"bytes {id}", "id": "Q1"},
        {"log_format": None},
    ],
)
def test_the_quick_text_of_an_event_is_what_twisted_formats(fields: dict[str, object]) -> None:
    from twisted.logger import formatEvent

    from gateway.cli import _message

    e = event(**fields)
    assert _message(e) == formatEvent(e)


def test_the_time_of_a_line_follows_the_clock_from_second_to_second() -> None:
    import time

    lines = [_format(event(log_time=STAMP + offset)) for offset in (0, 0.4, 1, 3600, 0)]
    stamps = [line.split(" ")[0] for line in lines if line]
    assert stamps == [
        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(STAMP + offset))
        for offset in (0, 0.4, 1, 3600, 0)
    ]


def test_journal_format_has_priorities_and_no_time() -> None:
    levels = {
        LogLevel.debug: "<7>",
        LogLevel.info: "<6>",
        LogLevel.warn: "<4>",
        LogLevel.error: "<3>",
        LogLevel.critical: "<2>",
    }
    for level, prefix in levels.items():
        line = _format_journal(event(level))
        assert line == f"{prefix}gateway.service: id=Q1 route=local-mailbox outcome=queued\n"


def test_journal_format_prefixes_every_line_of_a_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failure = Failure()
    line = _format_journal(event(LogLevel.critical, log_failure=failure))
    assert line is not None
    lines = line.splitlines()
    assert len(lines) > 3
    assert all(x.startswith("<2>") for x in lines), lines
    assert "RuntimeError: boom" in lines[-1]


def test_json_format_carries_the_event_fields() -> None:
    line = _format_json(event(LogLevel.warn, msgid="<a@b>", destination="box", count=3))
    assert line is not None and line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["level"] == "warn"
    assert record["namespace"] == "gateway.service"
    assert record["message"] == "id=Q1 route=local-mailbox outcome=queued"
    assert record["route"] == "local-mailbox"
    assert record["id"] == "Q1"
    assert record["msgid"] == "<a@b>"
    assert record["destination"] == "box"
    assert record["count"] == 3
    when = datetime.datetime.fromisoformat(record["time"])
    assert when.timestamp() == STAMP
    assert not any(key.startswith("log_") for key in record)


def test_json_format_keeps_its_own_keys_and_survives_odd_values() -> None:
    odd = event(message=("legacy", "tuple"), path=Path("/x"))
    odd["level"] = object()  # a field named like one of ours
    line = _format_json(odd)
    assert line is not None
    record = json.loads(line)
    assert record["message"] == "id=Q1 route=local-mailbox outcome=queued"
    assert record["level"] == "info"
    assert record["path"] == "/x"


def test_twisted_chatter_below_warn_is_dropped_in_every_format() -> None:
    chatter = {"log_level": LogLevel.info, "log_namespace": "log_legacy", "log_format": "x"}
    assert _format(chatter) is None
    assert _format_journal(chatter) is None
    assert _format_json(chatter) is None


def test_journal_stream_matches_device_and_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "log").open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal_stream(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not journal_stream(stream)  # stderr was redirected elsewhere
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not journal_stream(stream)
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    assert not journal_stream(io.StringIO())


def test_histogram_buckets() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(value)
    assert h.count == 5
    assert h.sum == pytest.approx(4.65)
    # Prometheus buckets are cumulative and "le": a value on a bound counts in it.
    assert h.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]


def test_readyz_reasons(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1000)
    service = GatewayService(tmp_path / "routes.yaml", clock)
    assert service.readiness_problems() == ["starting"]
    service.ready = True
    assert service.readiness_problems() == []
    service._reloading = Deferred()
    assert service.readiness_problems() == ["reloading the configuration"]
    service._reloading = None
    service.spool_refused_at = clock.seconds()
    service.spool_error = "the spool's disk is nearly full"
    clock.advance(3)
    assert service.readiness_problems() == [
        "the spool refused a message 3s ago: the spool's disk is nearly full"
    ]
    clock.advance(service.spool_refusal_window)
    assert service.readiness_problems() == []
    service.stopping = True
    assert service.readiness_problems() == ["shutting down"]
