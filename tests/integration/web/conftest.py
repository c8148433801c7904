"""Fixtures of the web tests: nginx origins started on 127.0.0.1 and stopped afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers_web import Nginx

NginxFactory = Callable[..., Nginx]


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[NginxFactory]:
    """Start nginx instances with Nginx's options; each is stopped after the test."""
    started: list[Nginx] = []

    def start(**options: Any) -> Nginx:
        server = Nginx(tmp_path / f"nginx-{len(started) + 1}", **options)
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def nginx(nginx_factory: NginxFactory) -> Nginx:
    """One nginx origin server (see tests/peers_web.py for what it serves)."""
    return nginx_factory()
