"""Crossposting through the gateway against a real INN2: one mail to two group addresses is one
article in both groups (mail_to_news takes all recipients of its route in one copy)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest

from tests import peers
from tests.integration.news.conftest import GROUP, MODERATED_GROUP
from tests.peers import REPO_ROOT, GatewayProcess, SwaksExit, free_port, swaks_send
from tests.peers_news import PATHHOST, Inn, fresh_message_id, header_values

GW = "gw.test"
CROSS_GROUP = "test.gateway.cross"
MODES = ("post", "ihave", "stream")


wait_until = functools.partial(peers.wait_until, timeout=60.0)


class Gateway:
    def __init__(self, process: GatewayProcess, port: int) -> None:
        self.process = process
        self.port = port

    def send(self, data: bytes, *rcpts: str) -> None:
        code, transcript = swaks_send(
            self.port, list(rcpts), data=data.removesuffix(b"\n"), timeout=120
        )
        assert code == SwaksExit.OK, transcript

    def lines(self, msgid: str, outcome: str) -> list[str]:
        return [
            line
            for line in self.process.log_text().splitlines()
            if f"msgid={msgid} " in line and f" outcome={outcome} " in line
        ]

    def wait_delivered(self, msgid: str) -> list[str]:
        return wait_until(
            lambda: self.lines(msgid, "delivered"),
            f"the delivery of {msgid}\n{self.process.log_text()[-3000:]}",
        )


@pytest.fixture(scope="module")
def gateway(inn_server: Inn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if CROSS_GROUP not in inn_server.groups(CROSS_GROUP):
        inn_server.newgroup(CROSS_GROUP)
    folder = tmp_path_factory.mktemp("gateway-crosspost")
    port = free_port()
    destinations = "".join(
        f"""
  news-{mode}:
    protocol: nntp
    connect: tcp:127.0.0.1:{inn_server.port}
    mode: {mode}
    retry_min: 1s
    retry_max: 2s
    # No duplicate check in the gateway: a second copy would reach INN and show.
    duplicate_window: 0s
"""
        for mode in MODES
    )
    routes = "".join(
        f"""
  - name: to-news-{mode}
    from: mail-in
    match: {{rcpt: '^(?P<group>[a-z0-9.+-]+)@{mode}\\.news\\.test$'}}
    transforms: [mail_to_news]
    options: {{newsgroups: '{{group}}', gateway: {GW}}}
    to: news-{mode}
"""
        for mode in MODES
    )
    config = folder / "gateway.yaml"
    config.write_text(f"""
version: 1
listeners:
  mail-in:
    protocol: smtp
    listen: tcp:{port}:interface=127.0.0.1
    hostname: {GW}
destinations:{destinations}
routes:{routes}
""")
    process = GatewayProcess(config)
    process.start(port, timeout=60)
    try:
        yield Gateway(process, port)
    finally:
        process.stop()


def mail(mid: str | None, subject: str) -> bytes:
    return (
        b"From: Alice <alice@mail.test>\n"
        b"To: two groups\n"
        b"Subject: " + subject.encode() + b"\n"
        b"Date: "
        + formatdate(localtime=True).encode()
        + b"\n"
        + (b"Message-ID: " + mid.encode() + b"\n" if mid else b"")
        + b"\ncrossposted\n"
    )


def numbers_in(inn: Inn, group: str, msgid: str) -> list[int]:
    """The article numbers ``msgid`` has in ``group``, by OVER, each confirmed by STAT."""
    found = [int(row["number"]) for row in inn.over(group) if row.get("message-id") == msgid]
    with inn.connect() as conn:
        code, text = conn.command(f"GROUP {group}")
        assert code == 211, text
        for number in found:
            code, text = conn.command(f"STAT {number}")
            assert code == 223 and text.split()[1] == msgid, (code, text)
    return found


def xref_numbers(article: bytes) -> dict[str, int]:
    (xref,) = header_values(article, "Xref")
    host, *places = xref.split()
    assert host == PATHHOST
    return {group: int(number) for group, number in (p.split(":") for p in places)}


@pytest.mark.parametrize("mode", MODES)
def test_mail_to_two_group_addresses_is_one_article_in_both(
    inn: Inn, gateway: Gateway, mode: str
) -> None:
    mid = fresh_message_id(f"cross-{mode}")
    gateway.send(
        mail(mid, f"crosspost {mode}"),
        f"{GROUP}@{mode}.news.test",
        f"{CROSS_GROUP}@{mode}.news.test",
    )
    article = inn.wait_for_article(mid, timeout=60)
    assert header_values(article, "Newsgroups") == [f"{GROUP},{CROSS_GROUP}"]
    xref = xref_numbers(article)
    assert set(xref) == {GROUP, CROSS_GROUP}
    assert numbers_in(inn, GROUP, mid) == [xref[GROUP]]
    assert numbers_in(inn, CROSS_GROUP, mid) == [xref[CROSS_GROUP]]
    # One copy was spooled and delivered, for both recipients; none was a duplicate.
    (queued,) = gateway.lines(mid, "queued")
    assert f" route=to-news-{mode} " in queued and f"destinations=news-{mode}" in queued
    (delivered,) = gateway.wait_delivered(mid)
    assert "already has" not in delivered


def test_without_a_message_id_and_sent_twice_still_one_article_in_both(
    inn: Inn, gateway: Gateway
) -> None:
    subject = fresh_message_id("cross-noid").strip("<>")
    data = mail(None, subject)
    rcpts = (f"{CROSS_GROUP}@post.news.test", f"{GROUP}@post.news.test")
    gateway.send(data, *rcpts)
    gateway.send(data, *rcpts)

    def rows() -> list[dict[str, str]]:
        return [r for r in inn.over(GROUP) if r.get("subject") == subject]

    derived = wait_until(rows, "the article")[0]["message-id"]
    assert derived.endswith(f"@{GW}>")
    article = inn.wait_for_article(derived)
    # Recipient order gives the group order.
    assert header_values(article, "Newsgroups") == [f"{CROSS_GROUP},{GROUP}"]
    wait_until(lambda: len(gateway.lines(derived, "delivered")) == 2, "both deliveries")
    assert len(numbers_in(inn, GROUP, derived)) == 1
    assert len(numbers_in(inn, CROSS_GROUP, derived)) == 1
    assert set(xref_numbers(article)) == {GROUP, CROSS_GROUP}


def test_a_crosspost_into_a_moderated_group_goes_to_its_moderator(
    inn: Inn, gateway: Gateway
) -> None:
    mid = fresh_message_id("cross-mod")
    gateway.send(
        mail(mid, "crosspost moderated"),
        f"{GROUP}@post.news.test",
        f"{MODERATED_GROUP}@post.news.test",
    )
    capture = inn.wait_for_mta(mid.encode(), timeout=60)
    # Without approved: INN mails the whole crosspost to the moderator and posts nothing.
    assert capture.recipients == ["test-gateway-moderated@localhost"]
    assert re.search(
        rb"^Newsgroups: " + f"{GROUP},{MODERATED_GROUP}".encode() + rb"$",
        capture.message,
        re.MULTILINE,
    )
    gateway.wait_delivered(mid)
    assert inn.stat(mid) == 430
    assert numbers_in(inn, GROUP, mid) == []


def test_dry_run_of_the_default_routes_shows_the_crosspost(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable, "-m", "gateway", "route", "--dry-run",
            "-c", str(REPO_ROOT / "routes.yaml"),
            "--from", "alice@mail.test",
            "--to", "local.test@news.example.test",
            "--to", "comp.lang.misc@news.example.test",
        ],
        input=b"Subject: both\nMessage-ID: <dry.1@mail.test>\n\nhello\n",
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr
    assert (
        "route 'mail-to-news' matches for local.test@news.example.test,"
        " comp.lang.misc@news.example.test as one copy (transform 'mail_to_news');"
        " named groups {'group': 'local.test'}, {'group': 'comp.lang.misc'}" in text
    ), text
    assert "  options joined for the one copy: newsgroups 'local.test,comp.lang.misc'" in text
    assert text.count("=== route 'mail-to-news' -> news") == 1
    assert "\nNewsgroups: local.test,comp.lang.misc\n" in text


@pytest.mark.parametrize("mode", MODES)
def test_a_crosspost_too_long_for_one_line_is_folded_and_taken(
    inn: Inn, gateway: Gateway, mode: str
) -> None:
    # 40 groups of about 45 octets: over 1,800 octets on one line, which INN refuses
    # ("441 Header line too long"); folded after commas, it is taken. Groups INN does not
    # carry are left out of its Xref, as for any crosspost.
    others = [f"test.gateway.unknown-{mode}-{i:02d}-with-a-long-name" for i in range(40)]
    groups = [GROUP, *others]
    mid = fresh_message_id(f"cross-long-{mode}")
    gateway.send(mail(mid, f"long crosspost {mode}"), *(f"{g}@{mode}.news.test" for g in groups))
    article = inn.wait_for_article(mid, timeout=60)
    head = article.split(b"\n\n", 1)[0]
    raw = re.search(rb"^Newsgroups:.*?(?=\n\S)", head, re.MULTILINE | re.DOTALL)
    assert raw is not None
    lines = raw.group(0).split(b"\n")
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    (value,) = header_values(article, "Newsgroups")
    assert [g.strip() for g in value.split(",")] == groups
    assert set(xref_numbers(article)) == {GROUP}
    assert numbers_in(inn, GROUP, mid) == [xref_numbers(article)[GROUP]]
    gateway.wait_delivered(mid)
