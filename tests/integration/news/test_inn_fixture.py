"""The INN2 fixture works as the news tests assume (facts of ../shared/PEERS.md)."""

from __future__ import annotations

import socket
import time

import pytest

from tests.integration.news.conftest import GROUP, MODERATED_GROUP
from tests.peers import LOOPBACK, port_accepts
from tests.peers_news import (
    PATHHOST,
    Inn,
    NntpError,
    article_bytes,
    fresh_message_id,
    header_values,
)


def test_groups_exist_with_their_moderation_flag(inn: Inn) -> None:
    groups = inn.groups("test.gateway*")
    assert groups[GROUP] == "y"
    assert groups[MODERATED_GROUP] == "m"


def test_post_then_stat_and_article(inn: Inn) -> None:
    mid = fresh_message_id("smoke")
    body = b".leading dot\nplain line\n..two dots\n"
    code, text = inn.post(article_bytes(mid, GROUP, body=body))
    assert code == 240, text
    assert inn.stat(mid) == 223
    article = inn.wait_for_article(mid)
    assert header_values(article, "Message-ID") == [mid]
    assert header_values(article, "Path")[0].startswith(PATHHOST + "!")
    assert article.split(b"\n\n", 1)[1] == body
    _count, _low, high = inn.group(GROUP)
    assert high >= 1
    # The same Message-ID again is a duplicate.
    code, text = inn.post(article_bytes(mid, GROUP))
    assert code == 441 and "435" in text


def test_unknown_message_id_is_430(inn: Inn) -> None:
    assert inn.stat(fresh_message_id("missing")) == 430
    assert inn.article(fresh_message_id("missing")) is None


def test_moderated_post_goes_to_the_mta_capture(inn: Inn) -> None:
    mid = fresh_message_id("moderated")
    code, text = inn.post(article_bytes(mid, MODERATED_GROUP))
    assert code == 240, text
    capture = inn.wait_for_mta(mid.encode())
    assert any("test-gateway-moderated@localhost" in r for r in capture.recipients)
    assert inn.stat(mid) == 430


def test_a_5mb_article_fits(inn: Inn) -> None:
    mid = fresh_message_id("big")
    line = b"x" * 76 + b"\n"
    body = line * (5 * 1024 * 1024 // len(line))
    code, text = inn.post(article_bytes(mid, GROUP, body=body))
    assert code == 240, text
    assert inn.stat(mid) == 223


def test_stop_and_start_again(inn: Inn) -> None:
    mid = fresh_message_id("restart")
    assert inn.post(article_bytes(mid, GROUP))[0] == 240
    reader = inn.connect()  # served by an nnrpd child, which would outlive innd
    inn.stop()
    assert not port_accepts(LOOPBACK, inn.port)
    with pytest.raises((NntpError, OSError)):
        reader.post(article_bytes(fresh_message_id("during-outage"), GROUP))
    reader.file.close()
    reader.sock.close()
    assert not inn.is_running()
    started = time.monotonic()
    inn.start()
    assert time.monotonic() - started < 30
    with socket.create_connection((LOOPBACK, inn.port), timeout=5) as sock:
        assert sock.recv(512).startswith(b"200")
    # History and spool survive the restart.
    assert inn.stat(mid) == 223
