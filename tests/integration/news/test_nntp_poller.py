"""The nntp-poll listener against a real INN2: articles posted to INN come out of the
gateway as mail (news_to_mail into smtp-sink) once, also across a restart, a
kill -9 in the middle of a batch, and INN being down for a while."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.news.conftest import GROUP
from tests.peers import GatewayProcess, SmtpSink, free_port
from tests.peers_news import Inn, article_bytes, fresh_message_id

LIST = "list@lists.example.test"


class Rig:
    def __init__(self, root: Path, inn: Inn, sink: SmtpSink) -> None:
        self.root = root
        self.inn = inn
        self.sink = sink
        self.admin = free_port()
        path = root / "routes.yaml"
        path.write_text(f"""
version: 1
spool: spool
admin: tcp:{self.admin}:interface=127.0.0.1
listeners:
  poll:
    protocol: nntp-poll
    connect: tcp:127.0.0.1:{inn.port}
    groups: [{GROUP}]
    interval: 1s
    batch: 4
    start: new
    timeout: 30s
destinations:
  sink:
    protocol: smtp
    connect: tcp:127.0.0.1:{sink.port}
    tls: none
    retry_min: 1s
    retry_max: 2s
routes:
  - name: news-to-list
    from: poll
    transforms: [news_to_mail]
    options: {{to: {LIST}}}
    to: sink
""")
        self.process = GatewayProcess(path)

    def start(self, *, first: bool = False) -> None:
        """Start the gateway; on its ``first`` start, wait until the poller has set its mark
        (with start: new, what is posted before that counts as old and is not taken)."""
        since = self.process.log_mark()
        self.process.start(self.admin)
        self.process.wait_for_log("listener poll (nntp-poll) started", since=since, timeout=30)
        if first:
            self.process.wait_for_log(f"following {GROUP} from article", since=since, timeout=30)

    def post(self, tag: str) -> str:
        mid = fresh_message_id(tag)
        code, text = self.inn.post(article_bytes(mid, GROUP, subject=f"poll {tag}"))
        assert code == 240, text
        return mid

    def arrived(self) -> Counter[str]:
        return Counter(str(m.headers["Message-ID"]) for m in self.sink.messages())

    def wait_arrived(self, mids: list[str], timeout: float = 60.0) -> Counter[str]:
        deadline = time.monotonic() + timeout
        while True:
            arrived = self.arrived()
            if all(arrived[mid] for mid in mids):
                return arrived
            if time.monotonic() >= deadline:
                missing = [mid for mid in mids if not arrived[mid]]
                raise TimeoutError(
                    f"not delivered to the sink in {timeout} s: {missing}\n"
                    f"{self.process.log_text()[-3000:]}"
                )
            time.sleep(0.1)

    def queued(self) -> Counter[str]:
        """How often each Message-ID was handed to the spool, over every run of the gateway."""
        found = re.findall(
            r"msgid=(<[^>]+>) route=news-to-list to=\S* outcome=queued", self.process.log_text()
        )
        return Counter(found)

    def settle(self, polls: int = 3) -> None:
        """Let a few more polls run, so a wrongly repeated article would show up."""
        since = self.process.log_mark()
        time.sleep(polls * 1.0 + 0.5)
        assert "Traceback" not in self.process.log_text(since)


@pytest.fixture
def rig(tmp_path: Path, inn: Inn) -> Iterator[Rig]:
    with SmtpSink(tmp_path / "sink") as sink:
        rig = Rig(tmp_path, inn, sink)
        with rig.process:
            yield rig


def test_article_arrives_once_and_once_only_after_a_restart(rig: Rig) -> None:
    before = rig.post("before")  # posted before the poller first saw the group: not taken
    rig.start(first=True)
    first = rig.post("first")
    arrived = rig.wait_arrived([first])
    message = next(m for m in rig.sink.messages() if m.headers["Message-ID"] == first)
    assert message.recipients == [LIST]
    assert message.headers["To"] == LIST
    assert message.headers["Subject"] == "poll first"
    rig.settle()
    rig.process.stop()
    second = rig.post("while-down")
    rig.start()
    third = rig.post("after")
    arrived = rig.wait_arrived([second, third])
    rig.settle()
    arrived = rig.arrived()
    assert arrived[before] == 0
    assert [arrived[m] for m in (first, second, third)] == [1, 1, 1]
    assert [rig.queued()[m] for m in (first, second, third)] == [1, 1, 1]


def test_kill_9_in_the_middle_of_a_batch_hands_each_article_on_once(rig: Rig) -> None:
    rig.start(first=True)
    rig.process.stop()
    mids = [rig.post(f"kill{i}") for i in range(40)]
    since = rig.process.log_mark()
    rig.start()
    # Kill as soon as the first article of the backlog is in the spool: the rest of its
    # batch of 4 and the rest of the backlog are still to come.
    rig.process.wait_for_log(f"msgid={mids[0]}", since=since, timeout=60)
    rig.process.kill9()
    rig.process.wait()
    before_kill = sum(rig.queued()[m] for m in mids)
    assert 1 <= before_kill < len(mids), "the kill came too late to test anything"
    rig.start()
    rig.wait_arrived(mids)
    rig.settle()
    queued = rig.queued()
    assert [queued[m] for m in mids] == [1] * len(mids)
    arrived = rig.arrived()
    assert all(arrived[m] >= 1 for m in mids)


def test_inn_down_then_back(rig: Rig, inn: Inn) -> None:
    rig.start(first=True)
    # Reader sessions (nnrpd) outlive innd: the poller opens a new one each poll.
    inn.stop()
    try:
        since = rig.process.log_mark()
        rig.process.wait_for_log("NNTP poller poll: connection refused", since=since, timeout=30)
    finally:
        inn.start()
    mid = rig.post("back")
    assert rig.wait_arrived([mid], timeout=120)[mid] == 1


def test_missing_group_is_logged_and_the_gateway_keeps_running(tmp_path: Path, inn: Inn) -> None:
    with SmtpSink(tmp_path / "sink") as sink:
        rig = Rig(tmp_path, inn, sink)
        text = (tmp_path / "routes.yaml").read_text()
        (tmp_path / "routes.yaml").write_text(
            text.replace(f"groups: [{GROUP}]", f"groups: [no.such.group, {GROUP}]")
        )
        with rig.process:
            rig.start(first=True)
            rig.process.wait_for_log("cannot select no.such.group", timeout=30)
            mid = rig.post("other")
            assert rig.wait_arrived([mid])[mid] == 1
