"""Fixtures that start real peer programs for a test and stop them afterwards.

No fixture here touches a Twisted reactor: unit tests build their own
MemoryReactorClock, integration tests talk to real processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.peers import GatewayProcess, SmtpSink


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    """An smtp-sink on a free port of 127.0.0.1 that accepts everything."""
    with SmtpSink(tmp_path / "smtp-sink").start() as sink:
        yield sink


SmtpSinkFactory = Callable[..., SmtpSink]


@pytest.fixture
def smtp_sink_factory(tmp_path: Path) -> Iterator[SmtpSinkFactory]:
    """Start more sinks, each with SmtpSink's options, e.g. soft_reject=["rcpt"].

    Every sink gets its own folder and port and is stopped after the test.
    """
    sinks: list[SmtpSink] = []

    def start(**options: Any) -> SmtpSink:
        sink = SmtpSink(tmp_path / f"smtp-sink-{len(sinks) + 1}", **options)
        sinks.append(sink)
        return sink.start()

    yield start
    errors = []
    for sink in reversed(sinks):
        try:
            sink.stop()
        except Exception as exc:  # stop the others regardless
            errors.append(exc)
    if errors:
        raise errors[0]


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Make GatewayProcess objects (not started) that are stopped after the test.

    Call it with a config text to have it written to tmp_path/gateway.yaml,
    or with config_path=; other keywords go to GatewayProcess.
    """
    processes: list[GatewayProcess] = []

    def make(
        config: str | None = None,
        *,
        config_path: Path | None = None,
        argv: Sequence[str] | None = None,
        **options: Any,
    ) -> GatewayProcess:
        if config_path is None:
            config_path = tmp_path / "gateway.yaml"
            if config is not None:
                config_path.write_text(config)
        process = GatewayProcess(config_path, argv=argv, **options)
        processes.append(process)
        return process

    yield make
    for process in reversed(processes):
        process.stop()
