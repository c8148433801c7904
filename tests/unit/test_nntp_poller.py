"""Tests for the nntp-poll listener, in memory: a scripted news server, a real SQLite spool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from gateway.config import ConfigError, Duration, parse
from gateway.message import Message
from gateway.ports import Reason, Status, Verdict
from gateway.protocols.nntp.config import NntpPollerConfig
from gateway.protocols.nntp.poller import Mark, NntpPoller, _overview, mark_key
from gateway.spool import SqliteSpool
from tests.support.deferreds import result, start
from tests.support.news_server import MemoryEndpoint, Script
from tests.support.port import FakePort

GROUP = "local.test"
CONNECT = "tcp:127.0.0.1:119"


def msgids(port: FakePort) -> list[str]:
    return [getattr(a, "message_id", None) or "" for a in port.submitted]


class Rig:
    def __init__(self, tmp_path: Path, script: Script | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = MemoryEndpoint(self.clock, script)
        self.store = self.endpoint.store
        self.spool = SqliteSpool(tmp_path / "spool")
        result(start(self.spool.open()))
        self.gateway = FakePort(reactor=self.clock, spool=self.spool)
        self.crash_after_store: set[str] = set()
        self.gateway.on_submit = self._crash
        self.poller: NntpPoller | None = None

    async def _crash(self, message: Message, state: Any) -> None:
        if getattr(message, "message_id", None) in self.crash_after_store:
            # The process dies after the spool committed, before the verdict came back.
            raise SystemExit("crash")

    def verdict(self, msgid: str, status: Status) -> None:
        self.gateway.verdicts[msgid] = Verdict(status, Reason.NONE, f"verdict {status}")

    def config(self, **kw: Any) -> NntpPollerConfig:
        kw.setdefault("groups", (GROUP,))
        kw.setdefault("interval", Duration(10))
        kw.setdefault("timeout", Duration(5))
        return NntpPollerConfig(name="poll", connect=CONNECT, **kw)  # type: ignore[arg-type]

    def start(self, **kw: Any) -> NntpPoller:
        self.poller = NntpPoller(
            self.config(**kw),
            self.gateway,
            self.clock,
            endpoint=self.endpoint,
        )
        result(start(self.poller.start_polling()))
        self.settle()
        return self.poller

    def settle(self) -> None:
        for _ in range(50):
            self.endpoint.pump()
            self.clock.advance(0)
        self.endpoint.pump()

    def next_poll(self) -> None:
        assert self.poller is not None
        polls = self.poller.polls
        self.clock.advance(float(self.poller.config.interval))
        self.settle()
        assert self.poller.polls == polls + 1

    def stop(self) -> None:
        assert self.poller is not None
        d = self.poller.stopListening()
        self.settle()
        result(d)

    def mark(self, group: str = GROUP) -> Mark | None:
        text = result(start(self.spool.get_state(mark_key(CONNECT, group))))
        return None if text is None else Mark.decode(text)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_start_new_skips_what_is_there_and_takes_later_articles(rig: Rig) -> None:
    rig.store.add(GROUP, "<old1@x>")
    rig.store.add(GROUP, "<old2@x>")
    poller = rig.start(start="new")
    assert poller.polls == 1
    assert rig.gateway.submitted == []
    assert rig.mark() == Mark(2)
    rig.store.add(GROUP, "<new3@x>")
    rig.next_poll()
    assert msgids(rig.gateway) == ["<new3@x>"]
    assert rig.mark() == Mark(3, "<new3@x>")
    rig.next_poll()
    assert msgids(rig.gateway) == ["<new3@x>"]
    article = rig.gateway.submitted[0]
    assert article.listener == "poll" and article.newsgroups == (GROUP,)
    assert article.headers.get("Subject") == "article 3"


def test_start_oldest_takes_everything_once_in_batches(rig: Rig) -> None:
    for i in range(7):
        rig.store.add(GROUP, f"<a{i}@x>")
    rig.start(start="oldest", batch=3)
    assert msgids(rig.gateway) == [f"<a{i}@x>" for i in range(7)]
    assert rig.mark() == Mark(7, "<a6@x>")
    commands = [c for c in rig.endpoint.commands if c.startswith("OVER")]
    assert commands == ["OVER 1-3", "OVER 4-6", "OVER 7-7"]
    rig.next_poll()
    assert len(rig.gateway.submitted) == 7


def test_restart_hands_nothing_on_twice(rig: Rig, tmp_path: Path) -> None:
    rig.store.add(GROUP, "<r1@x>")
    rig.start(start="oldest")
    rig.stop()
    rig.store.add(GROUP, "<r2@x>")
    rig.start(start="oldest")  # a new poller on the same spool
    assert msgids(rig.gateway) == ["<r1@x>", "<r2@x>"]


def test_crash_after_the_spool_committed_does_not_repeat_the_article(rig: Rig) -> None:
    rig.store.add(GROUP, "<c1@x>")
    rig.store.add(GROUP, "<c2@x>")
    rig.crash_after_store = {"<c1@x>"}
    rig.start(start="oldest")
    # The crash stopped the loop after <c1@x> was stored together with its mark.
    assert msgids(rig.gateway) == ["<c1@x>"]
    assert rig.mark() == Mark(1, "<c1@x>")
    rig.crash_after_store = set()
    rig.start(start="oldest")
    assert msgids(rig.gateway) == ["<c1@x>", "<c2@x>"]


def test_temporary_verdict_stops_the_group_until_the_next_poll(rig: Rig) -> None:
    for i in range(3):
        rig.store.add(GROUP, f"<t{i}@x>")
    rig.verdict("<t1@x>", Status.TEMPORARY)
    rig.start(start="oldest")
    assert msgids(rig.gateway) == ["<t0@x>", "<t1@x>"]
    assert rig.mark() == Mark(1, "<t0@x>")
    rig.next_poll()
    assert msgids(rig.gateway) == ["<t0@x>", "<t1@x>", "<t1@x>"]
    del rig.gateway.verdicts["<t1@x>"]
    rig.next_poll()
    assert msgids(rig.gateway) == ["<t0@x>", "<t1@x>", "<t1@x>", "<t1@x>", "<t2@x>"]
    assert rig.mark() == Mark(3, "<t2@x>")


def test_permanent_verdict_skips_the_article(rig: Rig) -> None:
    for i in range(3):
        rig.store.add(GROUP, f"<p{i}@x>")
    rig.verdict("<p1@x>", Status.PERMANENT)
    rig.start(start="oldest")
    assert msgids(rig.gateway) == ["<p0@x>", "<p1@x>", "<p2@x>"]
    assert rig.mark() == Mark(3, "<p2@x>")
    assert rig.poller is not None and rig.poller.accepted == 2


def test_missing_group_is_retried_and_other_groups_go_on(rig: Rig) -> None:
    rig.store.add("other.group", "<o1@x>")
    rig.start(start="oldest", groups=(GROUP, "other.group"))
    assert msgids(rig.gateway) == ["<o1@x>"]
    assert rig.mark(GROUP) is None
    rig.store.add(GROUP, "<g1@x>")
    rig.next_poll()
    assert msgids(rig.gateway) == ["<o1@x>", "<g1@x>"]


def test_server_down_backs_off_and_recovers(rig: Rig) -> None:
    rig.store.add(GROUP, "<d1@x>")
    rig.endpoint.refuse = True
    poller = rig.start(start="oldest")
    assert poller.failures == 1 and rig.endpoint.connects == 1
    # Waits double: 10 s, then 20 s, then 40 s.
    for wait, connects in ((10, 2), (20, 3)):
        rig.clock.advance(wait - 0.5)
        rig.settle()
        assert rig.endpoint.connects == connects - 1
        rig.clock.advance(0.5)
        rig.settle()
        assert rig.endpoint.connects == connects
    rig.endpoint.refuse = False
    rig.clock.advance(40)
    rig.settle()
    assert msgids(rig.gateway) == ["<d1@x>"]
    assert poller.failures == 0


def test_group_renumbered_backwards_is_found_by_message_id(rig: Rig) -> None:
    for i in range(5):
        rig.store.add(GROUP, f"<n{i}@x>")
    rig.start(start="oldest")
    assert rig.mark() == Mark(5, "<n4@x>")
    rig.store.renumber(GROUP, 1)  # same articles, numbers unchanged
    for i in range(5, 7):
        rig.store.add(GROUP, f"<n{i}@x>")
    # Drop the first three and renumber from 1: <n4@x> becomes number 2.
    for n in (1, 2, 3):
        del rig.store.groups[GROUP][n]
    rig.store.renumber(GROUP, 1)
    rig.next_poll()
    assert msgids(rig.gateway) == [f"<n{i}@x>" for i in range(7)]
    assert rig.mark() == Mark(4, "<n6@x>")


def test_group_renumbered_upwards_is_noticed_by_stat(rig: Rig) -> None:
    for i in range(3):
        rig.store.add(GROUP, f"<u{i}@x>")
    rig.start(start="oldest")
    # Re-created: the old articles now run 2-4, so number 3 is no longer <u2@x>.
    rig.store.renumber(GROUP, 2)
    rig.store.add(GROUP, "<u3@x>")
    rig.next_poll()
    assert msgids(rig.gateway) == ["<u0@x>", "<u1@x>", "<u2@x>", "<u3@x>"]
    assert rig.mark() == Mark(5, "<u3@x>")


def test_renumbered_group_without_the_last_article_starts_from_low(rig: Rig) -> None:
    for i in range(3):
        rig.store.add(GROUP, f"<v{i}@x>")
    rig.start(start="oldest")
    rig.store.groups[GROUP] = {}
    rig.store.low[GROUP] = rig.store.next[GROUP] = 1
    rig.store.add(GROUP, "<w0@x>")
    rig.next_poll()
    assert msgids(rig.gateway)[-1] == "<w0@x>"
    assert rig.mark() == Mark(1, "<w0@x>")


def test_gaps_and_expired_articles(rig: Rig) -> None:
    for i in range(6):
        rig.store.add(GROUP, f"<e{i}@x>")
    for n in (2, 4, 6):
        del rig.store.groups[GROUP][n]
    rig.start(start="oldest")
    assert msgids(rig.gateway) == ["<e0@x>", "<e2@x>", "<e4@x>"]
    assert rig.mark() == Mark(5, "<e4@x>")


def test_without_overview_each_number_is_probed(tmp_path: Path) -> None:
    rig = Rig(tmp_path, Script(over=False, xover=False))
    for i in range(4):
        rig.store.add(GROUP, f"<x{i}@x>")
    del rig.store.groups[GROUP][2]
    rig.start(start="oldest")
    assert msgids(rig.gateway) == ["<x0@x>", "<x2@x>", "<x3@x>"]
    assert rig.mark() == Mark(4, "<x3@x>")


def test_authinfo_is_used(tmp_path: Path) -> None:
    rig = Rig(tmp_path, Script(user="gw", password="pw"))
    rig.store.add(GROUP, "<au@x>")
    rig.start(start="oldest", user="gw", password="pw")
    assert msgids(rig.gateway) == ["<au@x>"]
    assert rig.endpoint.commands[:3] == ["MODE READER", "AUTHINFO USER gw", "AUTHINFO PASS pw"]


def test_auth_required_without_credentials_is_a_failed_poll(tmp_path: Path) -> None:
    rig = Rig(tmp_path, Script(user="gw", password="pw"))
    rig.store.add(GROUP, "<au@x>")
    poller = rig.start(start="oldest")
    assert rig.gateway.submitted == []
    assert poller.failures == 1


def test_stop_while_sleeping_and_while_waiting_on_the_server(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.store.add(GROUP, "<s1@x>")
    rig.start(start="oldest")
    rig.stop()
    assert rig.poller is not None and rig.poller._running is None
    rig2 = Rig(tmp_path / "two", Script(silent={"GROUP"}))
    rig2.store.add(GROUP, "<s1@x>")
    rig2.start(start="oldest")
    assert rig2.poller is not None and rig2.poller.polls == 0
    rig2.stop()
    assert rig2.poller._running is None


def test_reconfigure_takes_new_groups_now(rig: Rig) -> None:
    rig.store.add("other.group", "<rc@x>")
    poller = rig.start(start="oldest")
    assert rig.gateway.submitted == []
    poller.reconfigure(rig.config(groups=(GROUP, "other.group"), start="oldest"))
    rig.settle()
    assert msgids(rig.gateway) == ["<rc@x>"]


def test_unreadable_mark_starts_afresh(rig: Rig) -> None:
    rig.store.add(GROUP, "<m1@x>")
    result(start(rig.spool.set_state(mark_key(CONNECT, GROUP), "garbage")))
    rig.start(start="oldest")
    assert msgids(rig.gateway) == ["<m1@x>"]


# ----------------------------------------------------------------------------- configuration


def config_text(options: str) -> str:
    return f"""
version: 1
spool: spool
listeners:
  poll:
    protocol: nntp-poll
{options}
destinations:
  box: {{protocol: maildir, path: mail}}
routes:
  - {{name: r, from: poll, to: box}}
"""


def test_config_parses() -> None:
    config = parse(
        config_text(
            "    connect: tcp:127.0.0.1:1119\n    groups: [local.test, local.other]\n"
            "    interval: 5s\n    batch: 20\n    start: oldest\n"
        )
    )
    poll = config.listeners["poll"]
    assert isinstance(poll, NntpPollerConfig)
    assert poll.groups == ("local.test", "local.other")
    assert (poll.interval, poll.batch, poll.start, poll.listen) == (5.0, 20, "oldest", ())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("    connect: tcp:127.0.0.1:119\n", "'groups' is required"),
        ("    groups: [a]\n", "'connect' is required"),
        (
            "    connect: tcp:127.0.0.1:119\n    groups: [a]\n    listen: tcp:119\n",
            "unknown key 'listen'",
        ),
        ("    connect: tcp:127.0.0.1:119\n    groups: [a]\n    start: latest\n", "'new'"),
        ("    connect: tcp:127.0.0.1:119\n    groups: [a]\n    batch: 0\n", "'batch' must be"),
        ("    connect: tcp:127.0.0.1:119\n    groups: ['a b']\n", "'a b' is not a newsgroup"),
        ("    connect: tcp:127.0.0.1:119\n    groups: []\n", "at least one newsgroup"),
        ("    connect: tcp:127.0.0.1:119\n    groups: [a, a]\n", "appears twice"),
        ("    connect: tcp:127.0.0.1:119\n    groups: [a]\n    password: x\n", "'user' is not"),
        (
            "    connect: tcp:127.0.0.1:119\n    groups: [a]\n    allow: [127.0.0.1/32]\n",
            "unknown key 'allow'",
        ),
    ],
)
def test_config_errors(options: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(config_text(options))


def test_renumbered_group_with_a_mark_from_start_new_takes_only_later_articles(rig: Rig) -> None:
    for i in range(5):
        rig.store.add(GROUP, f"<y{i}@x>")
    rig.start(start="new")
    assert rig.mark() == Mark(5)
    rig.store.renumber(GROUP, 1)
    del rig.store.groups[GROUP][1]
    rig.store.renumber(GROUP, 1)  # now 1-4: high went below the mark
    rig.next_poll()
    assert rig.gateway.submitted == []
    assert rig.mark() == Mark(4)
    rig.store.add(GROUP, "<y5@x>")
    rig.next_poll()
    assert msgids(rig.gateway) == ["<y5@x>"]


# ----------------------------------------------------------------------------- properties


@given(st.integers(0, 2**63), st.from_regex(r"<[!-;=?-~]{1,40}@[a-z.]{1,20}>", fullmatch=True))
def test_mark_round_trip(number: int, msgid: str) -> None:
    assert Mark.decode(Mark(number, msgid).encode()) == Mark(number, msgid)
    assert Mark.decode(Mark(number).encode()) == Mark(number)


@given(st.text(max_size=80))
def test_mark_decode_never_raises(text: str) -> None:
    mark = Mark.decode(text)
    assert mark is None or isinstance(mark.number, int)


@given(st.binary(max_size=500))
def test_overview_parser_never_raises(block: bytes) -> None:
    for number, msgid in _overview(block):
        assert isinstance(number, int) and isinstance(msgid, str)


def test_an_unreachable_server_is_logged_while_backing_off_then_once_an_hour(
    tmp_path: Path,
) -> None:
    """In memory, hours of an absent news server (the poller of the default file, say)."""
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "gateway.nntp.poller":
            lines.append(formatEvent(event))

    poll = Rig(tmp_path)
    poll.endpoint.refuse = True
    globalLogPublisher.addObserver(observe)
    try:
        poller = poll.start(interval=Duration(60))
        for _ in range(12 * 10):  # ten hours in 5-minute steps
            poll.clock.advance(300)
            poll.settle()
        refused = [line for line in lines if "connection refused" in line]
        # 60, 120, 240 s waits, then the longest (300 s): from there on once an hour.
        assert refused[:3] == [
            f"NNTP poller poll: connection refused by MemoryEndpoint; next attempt in {s}s"
            for s in (60, 120, 240)
        ]
        reminders = refused[3:]
        assert 9 <= len(reminders) <= 10, refused
        assert all(r.startswith("NNTP poller poll: still failing after") for r in reminders)
        assert poller.failures > 100
        poll.endpoint.refuse = False
        poll.clock.advance(300)
        poll.settle()
        assert poller.failures == 0
        assert lines[-1].startswith(f"NNTP poller poll: {CONNECT} answers again after")
    finally:
        globalLogPublisher.removeObserver(observe)
