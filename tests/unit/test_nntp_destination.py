"""Tests for the nntp destination: every reply code and failure maps to the right outcome."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from gateway.config import ConfigError, parse
from gateway.destination import build_destination
from gateway.message import Article, MailMessage
from gateway.ports import Status
from gateway.protocols.nntp.client import Reply
from gateway.protocols.nntp.config import NntpDestinationConfig
from gateway.protocols.nntp.destination import NntpDestination, outcome_for
from tests.support.deferreds import result, start
from tests.support.news_server import MemoryEndpoint, Script


def article(msgid: str = "<d1@example.test>", body: bytes = b"hello\n") -> Article:
    headers = "From: a@example.test\nNewsgroups: local.test\nSubject: s\n"
    if msgid:
        headers += f"Message-ID: {msgid}\n"
    return Article.from_bytes(headers.encode() + b"\n" + body)


def destination(
    mode: str, script: Script | None = None, **options: Any
) -> tuple[NntpDestination, MemoryEndpoint]:
    clock = MemoryReactorClock()
    endpoint = MemoryEndpoint(clock, script)
    config = NntpDestinationConfig(
        name="news",
        connect="tcp:127.0.0.1:119",
        mode=mode,
        **options,  # type: ignore[arg-type]
    )
    return NntpDestination(config, clock, endpoint=endpoint), endpoint


def deliver(dest: NntpDestination, endpoint: MemoryEndpoint, message: Any) -> Any:
    d = start(dest.deliver(message))
    endpoint.pump()
    return result(d)


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        (240, "Article received <x@y>", Status.DELIVERED),
        (235, "<x@y>", Status.DELIVERED),
        (239, "<x@y>", Status.DELIVERED),
        (435, "Duplicate", Status.DELIVERED),
        (438, "<x@y>", Status.DELIVERED),
        (441, "435 Duplicate", Status.DELIVERED),
        (441, "Duplicate article", Status.DELIVERED),
        (439, "<x@y> Duplicate", Status.DELIVERED),
        (436, "Can't write history", Status.TEMPORARY),
        (431, "<x@y>", Status.TEMPORARY),
        (440, "Posting not permitted", Status.TEMPORARY),
        (480, "Authentication required", Status.TEMPORARY),
        (403, "internal fault", Status.TEMPORARY),
        (437, 'Unapproved for "local.moderated"', Status.PERMANENT),
        (439, "<x@y> rejected", Status.PERMANENT),
        (441, 'Article posted in the future -- "Date" header field', Status.PERMANENT),
        (441, 'Can\'t set system "Injection-Info" header field', Status.PERMANENT),
        (502, "Permission denied", Status.PERMANENT),
        (500, "What?", Status.PERMANENT),
        (340, "go on", Status.TEMPORARY),
    ],
)
def test_outcome_for_each_code(code: int, text: str, status: Status) -> None:
    outcome = outcome_for(Reply(code, text), "news:119")
    assert outcome.status is status
    assert f"news:119 answered {code} {text}" in outcome.detail


def test_post_delivered_then_duplicate_counts_as_delivered() -> None:
    dest, endpoint = destination("post")
    first = deliver(dest, endpoint, article())
    assert first.status is Status.DELIVERED and "240" in first.detail
    again = deliver(dest, endpoint, article())
    assert again.status is Status.DELIVERED
    assert "441 435 Duplicate" in again.detail and "already has" in again.detail
    assert endpoint.commands == ["MODE READER", "POST", "POST"]


def test_post_rejected_keeps_the_server_text() -> None:
    script = Script(replies={"POST-DONE": b"441 Article posted too far in the past\r\n"})
    dest, endpoint = destination("post", script)
    outcome = deliver(dest, endpoint, article())
    assert outcome.status is Status.PERMANENT
    assert outcome.detail == "tcp:127.0.0.1:119 answered 441 Article posted too far in the past"


def test_post_without_message_id_is_sent() -> None:
    dest, endpoint = destination("post")
    outcome = deliver(dest, endpoint, article(msgid=""))
    assert outcome.status is Status.DELIVERED


def test_ihave_modes() -> None:
    dest, endpoint = destination("ihave")
    assert deliver(dest, endpoint, article()).status is Status.DELIVERED
    dup = deliver(dest, endpoint, article())
    assert dup.status is Status.DELIVERED and "435" in dup.detail
    assert [c for c, _, _ in endpoint.store.received] == ["IHAVE"]


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (b"436 Retry later\r\n", Status.TEMPORARY),
        (b'437 Unapproved for "local.mod"\r\n', Status.PERMANENT),
    ],
)
def test_ihave_refusals(reply: bytes, status: Status) -> None:
    dest, endpoint = destination("ihave", Script(replies={"IHAVE-DONE": reply}))
    outcome = deliver(dest, endpoint, article())
    assert outcome.status is status
    assert reply.decode().strip() in outcome.detail


def test_ihave_needs_a_message_id() -> None:
    dest, endpoint = destination("ihave")
    outcome = deliver(dest, endpoint, article(msgid=""))
    assert outcome.status is Status.PERMANENT and "no Message-ID" in outcome.detail
    assert endpoint.connects == 0


def test_ihave_refuses_a_malformed_message_id() -> None:
    dest, endpoint = destination("ihave")
    outcome = deliver(dest, endpoint, article(msgid="not-an-id"))
    assert outcome.status is Status.PERMANENT and "not a message-id" in outcome.detail


@pytest.mark.parametrize(
    ("script", "status", "text"),
    [
        (Script(), Status.DELIVERED, "239"),
        (Script(replies={"CHECK": b"438 <d1@example.test>\r\n"}), Status.DELIVERED, "438"),
        (Script(replies={"CHECK": b"431 <d1@example.test>\r\n"}), Status.TEMPORARY, "431"),
        (
            Script(replies={"TAKETHIS-DONE": b"439 <d1@example.test> no thanks\r\n"}),
            Status.PERMANENT,
            "439 <d1@example.test> no thanks",
        ),
    ],
)
def test_stream_outcomes(script: Script, status: Status, text: str) -> None:
    dest, endpoint = destination("stream", script)
    outcome = deliver(dest, endpoint, article())
    assert outcome.status is status
    assert text in outcome.detail


def test_connection_loss_is_temporary() -> None:
    dest, endpoint = destination("post", Script(drop={"POST"}))
    outcome = deliver(dest, endpoint, article())
    assert outcome.status is Status.TEMPORARY
    assert "lost while waiting for the reply to POST" in outcome.detail


def test_server_down_is_temporary() -> None:
    dest, endpoint = destination("ihave")
    endpoint.refuse = True
    outcome = deliver(dest, endpoint, article())
    assert outcome.status is Status.TEMPORARY
    assert "connection refused" in outcome.detail


def test_auth_rejected_is_temporary_with_the_reason() -> None:
    script = Script(user="gw", password="right")
    dest, endpoint = destination("post", script, user="gw", password="wrong")
    outcome = deliver(dest, endpoint, article())
    assert outcome.status is Status.TEMPORARY
    assert "refused AUTHINFO for 'gw': 481" in outcome.detail


def test_auth_accepted() -> None:
    script = Script(user="gw", password="right")
    dest, endpoint = destination("post", script, user="gw", password="right")
    assert deliver(dest, endpoint, article()).status is Status.DELIVERED


def test_mail_is_refused() -> None:
    dest, endpoint = destination("post")
    mail = MailMessage.from_bytes(b"Subject: x\n\nbody\n", sender="a@x", recipients=["b@y"])
    outcome = deliver(dest, endpoint, mail)
    assert outcome.status is Status.PERMANENT and "not mail" in outcome.detail


def test_close_quits() -> None:
    dest, endpoint = destination("post")
    deliver(dest, endpoint, article())
    d = start(dest.close())
    endpoint.pump()
    assert result(d) is None
    assert endpoint.commands[-1] == "QUIT"


# ----------------------------------------------------------------------------- configuration


def config_text(options: str) -> str:
    return f"""
version: 1
spool: spool
listeners: {{}}
destinations:
  news:
    protocol: nntp
{options}
routes: []
"""


def test_config_parses_and_builds() -> None:
    config = parse(
        config_text(
            "    connect: tcp:127.0.0.1:1119\n    mode: stream\n    user: gw\n"
            "    password: s3cret\n    max_connections: 2\n    timeout: 30s\n"
        )
    )
    news = config.destinations["news"]
    assert isinstance(news, NntpDestinationConfig)
    assert (news.mode, news.user, news.max_connections, news.timeout) == ("stream", "gw", 2, 30.0)
    built = build_destination(news, MemoryReactorClock())
    assert isinstance(built, NntpDestination)
    assert built.pool.mode == "stream"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("    connect: tcp:127.0.0.1:119\n    mode: transit\n", "expected one of 'post'"),
        ("    mode: post\n", "'connect' is required"),
        ("    connect: tcp:127.0.0.1:119\n    groups: [a]\n", "unknown key 'groups'"),
        ("    connect: carrier:pigeon\n", "expected an endpoint"),
        ("    connect: tcp:127.0.0.1:119\n    max_connections: 0\n", "must be more than 0"),
        ("    connect: tcp:127.0.0.1:119\n    password: x\n", "'user' is not"),
    ],
)
def test_config_errors(options: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(config_text(options))


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        # INN answers an article that became a duplicate while it was sent with
        # "437 Duplicate" (IHAVE) / "439 <id> Duplicate" (TAKETHIS): the server has it.
        (437, "Duplicate", Status.DELIVERED),
        (437, "Duplicate article", Status.DELIVERED),
        (439, "<a@b> Duplicate", Status.DELIVERED),
        (437, 'Unapproved for "local.mod"', Status.PERMANENT),
        (437, "Article already expired", Status.PERMANENT),
    ],
)
def test_destination_counts_a_duplicate_refusal_as_delivered(
    code: int, text: str, status: Status
) -> None:
    assert outcome_for(Reply(code, text), "news:119").status is status


@pytest.mark.parametrize(
    ("text", "status"),
    [
        # INN's nnrpd answers POST with 441 and the code innd gave inside the text.
        ("436 Can't write history", Status.TEMPORARY),
        ("400 Throttled: disk full", Status.TEMPORARY),
        ("436 Try again later: spool full", Status.TEMPORARY),
        ("437 Unwanted distribution", Status.PERMANENT),
        ("Header line too long", Status.PERMANENT),
        ("435 Duplicate", Status.DELIVERED),
    ],
)
def test_destination_reads_the_code_inside_a_441(text: str, status: Status) -> None:
    """Defect: "441 436 ..." (a temporary failure behind the posting server) was
    taken as permanent, and the article went to the dead letters."""
    assert outcome_for(Reply(441, text), "news:119").status is status
