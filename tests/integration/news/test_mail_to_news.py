"""Mail to news end to end: swaks -> gateway (SMTP) -> mail_to_news -> nntp destination -> INN2.

One gateway for the module, posting to the session's INN; every test sends
mail with fresh Message-IDs (INN's history survives restarts).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, formatdate, parsedate_to_datetime
from typing import Any

import pytest

from tests import peers
from tests.integration.news.conftest import GROUP, MODERATED_GROUP
from tests.peers import REPO_ROOT, GatewayProcess, SwaksExit, free_port, swaks_send
from tests.peers_news import PATHHOST, Inn, fresh_message_id, header_values

GW = "gw.test"
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


wait_until = functools.partial(peers.wait_until, timeout=60.0)


class Gateway:
    """The gateway process of this module, with its SMTP port and queue commands."""

    def __init__(self, process: GatewayProcess, port: int) -> None:
        self.process = process
        self.port = port

    def queue_json(self, *args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "queue", "-c", str(self.process.config_path),
             *args, "--json"],
            capture_output=True, text=True, timeout=60, env=ENV,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def queued(self) -> list[dict[str, Any]]:
        return list(self.queue_json("list"))

    def dead(self) -> list[dict[str, Any]]:
        return list(self.queue_json("dead"))

    def settled(self, msgid: str) -> bool:
        """No delivery of this Message-ID is waiting any more."""
        return not [d for d in self.queued() if d["msgid"] == msgid]

    def send(self, data: bytes, rcpt: str = f"{GROUP}@news.test") -> tuple[int, str]:
        # swaks ends the data with its own line break.
        return swaks_send(self.port, rcpt, data=data.removesuffix(b"\n"), timeout=120)


@pytest.fixture(scope="module")
def gateway(inn_server: Inn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("gateway-news")
    port = free_port()
    config = folder / "gateway.yaml"
    config.write_text(f"""
version: 1
listeners:
  mail-in:
    protocol: smtp
    listen: tcp:{port}:interface=127.0.0.1
    hostname: {GW}
    max_size: 20MiB
destinations:
  news:
    protocol: nntp
    connect: tcp:127.0.0.1:{inn_server.port}
    mode: post
    retry_min: 1s
    retry_max: 2s
    # No duplicate check in the gateway: the tests see INN's own (441 435).
    duplicate_window: 0s
  news-feed:
    protocol: nntp
    connect: tcp:127.0.0.1:{inn_server.port}
    mode: stream
    retry_min: 1s
    retry_max: 2s
routes:
  - name: injected-to-news
    from: mail-in
    match: {{rcpt: '^(?P<group>[a-z0-9.+-]+)@feed\\.news\\.test$'}}
    transforms: [mail_to_news]
    options: {{newsgroups: '{{group}}', gateway: {GW}, inject: true}}
    to: news-feed
  - name: approved-to-news
    from: mail-in
    match: {{rcpt: '^(?P<group>[a-z0-9.+-]+)@approved\\.news\\.test$'}}
    transforms: [mail_to_news]
    options: {{newsgroups: '{{group}}', gateway: {GW}, approved: moderator@news.test}}
    to: news
  - name: mail-to-news
    from: mail-in
    match: {{rcpt: '^(?P<group>[a-z0-9.+-]+)@news\\.test$'}}
    transforms: [mail_to_news]
    options: {{newsgroups: '{{group}}', gateway: {GW}}}
    to: news
""")
    process = GatewayProcess(config)
    process.start(port, timeout=60)
    try:
        yield Gateway(process, port)
    finally:
        process.stop()


def mail(
    mid: str | None,
    *,
    subject: bytes = b"gated",
    body: bytes = b"hello news\n",
    extra: bytes = b"",
    date: str | None = None,
) -> bytes:
    head = (
        b"From: Alice <alice@mail.test>\n"
        b"To: " + GROUP.encode() + b"@news.test\n"
        b"Subject: " + subject + b"\n"
        b"Date: "
        + (date or formatdate(localtime=True)).encode()
        + b"\n"
        + (b"Message-ID: " + mid.encode() + b"\n" if mid else b"")
        + b"MIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: 8bit\n" + extra
    )
    return head + b"\n" + body


def body_of(article: bytes) -> bytes:
    return article.split(b"\n\n", 1)[1]


def sent_ok(result: tuple[int, str]) -> None:
    code, transcript = result
    assert code == SwaksExit.OK, transcript


# --- the article and its header ---------------------------------------------------------------


def test_mail_becomes_an_article_with_the_promised_header(inn: Inn, gateway: Gateway) -> None:
    mid = fresh_message_id("m2n")
    date = formatdate(localtime=True)
    extra = (
        b"Sender: list-owner@mail.test\n"
        b"In-Reply-To: <parent.1@mail.test>\n"
        b"Approved: forged@moderator.test\n"
        b"Control: cancel <victim@mail.test>\n"
        b"Path: forged!path\n"
        b"Received: from somewhere by mx.mail.test; " + date.encode() + b"\n"
        b"Return-Path: <alice@mail.test>\n"
        b"Xref: forged " + GROUP.encode() + b":1\n"
        b"NNTP-Posting-Host: forged.test\n"
    )
    sent_ok(gateway.send(mail(mid, extra=extra, date=date)))
    article = inn.wait_for_article(mid, timeout=60)
    assert inn.stat(mid) == 223

    def h(name: str) -> list[str]:
        return header_values(article, name)

    assert h("Message-ID") == [mid]
    assert h("Newsgroups") == [GROUP]
    assert h("Date") == [date]
    assert h("Path")[0].startswith(f"{PATHHOST}!")
    assert h("Path")[0].endswith(f"!{GW}!not-for-mail")
    assert "forged" not in h("Path")[0]
    assert h("Sender") == [f"mail-to-news@{GW}"]
    assert h("Original-Sender") == ["list-owner@mail.test"]
    assert h("X-Gateway-Loop") == [GW]
    assert h("References") == ["<parent.1@mail.test>"]
    assert h("Approved") == []
    assert h("Control") == []
    assert h("X-Original-Control") == ["cancel <victim@mail.test>"]
    assert h("Received") == [] and h("Return-Path") == []
    assert h("NNTP-Posting-Host") == []
    assert all("forged" not in x for x in h("Xref"))
    assert h("Content-Transfer-Encoding") == ["8bit"]
    assert body_of(article) == b"hello news\n"


def test_fed_by_stream_with_inject_the_gateway_is_the_injecting_agent(
    inn: Inn, gateway: Gateway
) -> None:
    """Straight into INN's feed (CHECK/TAKETHIS): no nnrpd injects it, the gateway does."""
    mid = fresh_message_id("inject")
    before = time.time()
    sent_ok(gateway.send(mail(mid), rcpt=f"{GROUP}@feed.news.test"))
    article = inn.wait_for_article(mid, timeout=60)
    [path] = header_values(article, "Path")
    assert path.startswith(f"{PATHHOST}!") and path.endswith(f"!{GW}!.POSTED!not-for-mail")
    [injected] = header_values(article, "Injection-Date")
    assert before - 2 <= parsedate_to_datetime(injected).timestamp() <= time.time() + 1
    assert header_values(article, "Injection-Info") == [f'{GW}; posting-host="127.0.0.1"']
    # A post (the other route) is injected by INN's nnrpd, not by the gateway.
    mid = fresh_message_id("posted")
    sent_ok(gateway.send(mail(mid)))
    article = inn.wait_for_article(mid, timeout=60)
    assert all(not v.startswith(GW) for v in header_values(article, "Injection-Info"))
    assert f"{GW}!.POSTED" not in header_values(article, "Path")[0]


def test_dot_lines_and_8bit_bodies_arrive_byte_for_byte(inn: Inn, gateway: Gateway) -> None:
    mid = fresh_message_id("dots")
    body = (
        b".\n"
        b"..two dots\n"
        b".one dot\n"
        b"ordinary line\n"
        b". \n"
        b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \xe2\x82\xac\n"
        b"latin-1 byte \xe9 too\n"
    )
    sent_ok(gateway.send(mail(mid, body=body)))
    assert body_of(inn.wait_for_article(mid, timeout=60)) == body


def test_utf8_rfc2047_subject_stays_encoded(inn: Inn, gateway: Gateway) -> None:
    mid = fresh_message_id("subject")
    subject = b"=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4g4oKs?= =?UTF-8?Q?und_mehr_=C3=A4?="
    sent_ok(gateway.send(mail(mid, subject=subject)))
    article = inn.wait_for_article(mid, timeout=60)
    assert header_values(article, "Subject") == [subject.decode()]


def test_very_long_references_are_shortened_to_fit(inn: Inn, gateway: Gateway) -> None:
    mid = fresh_message_id("refs")
    ids = [f"<thread-{i:03d}.some-long-local-part@mail.example.test>" for i in range(80)]
    refs = b"References: " + "\n ".join(ids).encode() + b"\n"
    sent_ok(gateway.send(mail(mid, extra=refs)))
    article = inn.wait_for_article(mid, timeout=60)
    (value,) = header_values(article, "References")
    assert len("References: " + value) <= 998
    kept = value.split()
    assert kept[0] == ids[0] and kept[-1] == ids[-1]
    assert kept[1:] == ids[len(ids) - len(kept) + 1 :]
    assert len(kept) < len(ids)


def test_a_5mb_article(inn: Inn, gateway: Gateway) -> None:
    mid = fresh_message_id("big")
    payload = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32 * 3 // 4)
    encoded = base64.encodebytes(payload)
    assert len(encoded) >= 5 * 1024 * 1024
    extra = b""
    data = mail(mid, body=encoded, extra=extra).replace(
        b"Content-Transfer-Encoding: 8bit", b"Content-Transfer-Encoding: base64"
    )
    sent_ok(gateway.send(data))
    article = inn.wait_for_article(mid, timeout=120)
    assert body_of(article) == encoded


# --- once and only once -------------------------------------------------------------------------


def subjects_in_group(inn: Inn, subject: str) -> list[dict[str, str]]:
    return [row for row in inn.over(GROUP) if row.get("subject") == subject]


def test_the_same_mail_twice_is_one_article(inn: Inn, gateway: Gateway) -> None:
    mid = fresh_message_id("twice")
    data = mail(mid, subject=mid.encode())
    sent_ok(gateway.send(data))
    sent_ok(gateway.send(data))
    inn.wait_for_article(mid, timeout=60)
    wait_until(lambda: gateway.settled(mid), "both deliveries")
    assert len(subjects_in_group(inn, mid)) == 1
    # INN's "441 435 Duplicate" for the second copy counts as delivered, not dead.
    assert not [d for d in gateway.dead() if d["msgid"] == mid]


def test_the_same_mail_without_message_id_twice_is_one_article(inn: Inn, gateway: Gateway) -> None:
    subject = fresh_message_id("noid").strip("<>")
    data = mail(None, subject=subject.encode(), date=formatdate(localtime=True))
    sent_ok(gateway.send(data))
    sent_ok(gateway.send(data))
    rows = wait_until(lambda: subjects_in_group(inn, subject), "the article", timeout=60)
    derived = rows[0]["message-id"]
    assert derived.endswith(f"@{GW}>")
    wait_until(lambda: gateway.settled(derived), "both deliveries")
    assert len(subjects_in_group(inn, subject)) == 1
    assert not [d for d in gateway.dead() if d["msgid"] == derived]


def test_mail_queued_while_inn_is_down_is_posted_when_it_is_back(
    inn: Inn, gateway: Gateway
) -> None:
    mid = fresh_message_id("outage")
    inn.stop()
    try:
        sent_ok(gateway.send(mail(mid)))
        waiting = wait_until(
            lambda: [d for d in gateway.queued() if d["msgid"] == mid and d["attempts"] >= 1],
            "a failed try while INN is down",
        )
        assert waiting[0]["last_error"], waiting
    finally:
        inn.start()
    inn.wait_for_article(mid, timeout=60)
    wait_until(lambda: gateway.settled(mid), "the delivery")
    assert not [d for d in gateway.dead() if d["msgid"] == mid]


# --- moderated groups ---------------------------------------------------------------------------


def test_moderated_group_without_approved_goes_to_the_moderator(inn: Inn, gateway: Gateway) -> None:
    mid = fresh_message_id("mod")
    data = mail(mid, extra=b"Approved: forged@moderator.test\n")
    sent_ok(gateway.send(data, rcpt=f"{MODERATED_GROUP}@news.test"))
    capture = inn.wait_for_mta(mid.encode(), timeout=60)
    # INN mails it to the group's moderator (moderators: *:%s@localhost) and keeps nothing.
    assert capture.recipients == ["test-gateway-moderated@localhost"]
    assert b"Newsgroups: " + MODERATED_GROUP.encode() in capture.message
    assert b"forged@moderator.test" not in capture.message
    wait_until(lambda: gateway.settled(mid), "the delivery")
    assert inn.stat(mid) == 430
    assert not [d for d in gateway.dead() if d["msgid"] == mid]


def test_moderated_group_with_approved_from_the_route_is_posted(inn: Inn, gateway: Gateway) -> None:
    mid = fresh_message_id("approved")
    sent_ok(gateway.send(mail(mid), rcpt=f"{MODERATED_GROUP}@approved.news.test"))
    article = inn.wait_for_article(mid, timeout=60)
    assert header_values(article, "Approved") == ["moderator@news.test"]
    assert header_values(article, "Newsgroups") == [MODERATED_GROUP]
    assert not [c for c in inn.mta_captures() if mid.encode() in c.message]


# --- refusals -----------------------------------------------------------------------------------


def test_a_date_too_old_becomes_a_dead_letter_with_inns_reason(inn: Inn, gateway: Gateway) -> None:
    mid = fresh_message_id("old")
    old = format_datetime(datetime.now(UTC) - timedelta(days=30))
    sent_ok(gateway.send(mail(mid, date=old)))
    dead = wait_until(
        lambda: [d for d in gateway.dead() if d["msgid"] == mid], "the dead letter", timeout=60
    )
    reason = dead[0]["last_error"]
    assert "441" in reason and "past" in reason.lower(), reason
    assert dead[0]["destination"] == "news" and dead[0]["route"] == "mail-to-news"
    assert inn.stat(mid) == 430


@pytest.mark.parametrize("group", ["control.cancel", "junk", "to.elsewhere", "comp.all.x"])
def test_a_reserved_group_is_refused_at_once_with_the_reason(
    inn: Inn, gateway: Gateway, group: str
) -> None:
    mid = fresh_message_id("reserved")
    code, transcript = gateway.send(mail(mid), rcpt=f"{group}@news.test")
    assert code != SwaksExit.OK
    assert "553 5.1.3" in transcript and group in transcript, transcript
    assert not [d for d in gateway.queued() + gateway.dead() if d["msgid"] == mid]
    assert inn.stat(mid) == 430


def test_mail_this_gateway_already_gated_is_not_posted_again(inn: Inn, gateway: Gateway) -> None:
    mid = fresh_message_id("loop")
    mark = gateway.process.log_mark()
    sent_ok(gateway.send(mail(mid, extra=f"X-Gateway-Loop: {GW}\n".encode())))
    gateway.process.wait_for_log("not gated to news", since=mark, timeout=30)
    assert not [d for d in gateway.queued() + gateway.dead() if d["msgid"] == mid]
    assert inn.stat(mid) == 430
