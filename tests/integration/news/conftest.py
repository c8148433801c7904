"""Fixtures for the news tests: one INN2 for the whole session (INN is a single
system-wide instance), shared by every test here with fresh Message-IDs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers_news import Inn

GROUP = "test.gateway"
MODERATED_GROUP = "test.gateway.moderated"


@pytest.fixture(scope="session")
def inn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inn]:
    """INN2 on a free port of 127.0.0.1 with the test groups; stopped after the session."""
    server = Inn(tmp_path_factory.mktemp("inn"))
    with server:
        server.newgroup(GROUP)
        server.newgroup(MODERATED_GROUP, moderated=True)
        yield server


@pytest.fixture
def inn(inn_server: Inn) -> Iterator[Inn]:
    """The session's INN, running (a test that stopped it and failed is healed here)."""
    if not inn_server.is_running():
        inn_server.start()
    inn_server.clear_mta()
    yield inn_server
    if not inn_server.is_running():
        inn_server.start()
