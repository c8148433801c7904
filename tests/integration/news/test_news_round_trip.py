"""Mail to news to mail through one gateway and a real INN2, and where the loop stops.

swaks -> gateway (SMTP) -> mail_to_news -> INN2; the same gateway's nntp-poll listener
follows the group -> news_to_mail -> smtp-sink (the list's mail server), and a second
route sends the same mail back into the gateway's own SMTP listener, where
mail_to_news meets it again.  X-Gateway-Loop stops the gateway's own article on its
way back out (news_to_mail), and a newsreader's article on its way back in
(mail_to_news); each is logged with the reason.
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest

from tests.integration.news.conftest import GROUP
from tests.peers import (
    REPO_ROOT,
    GatewayProcess,
    SmtpSink,
    SwaksExit,
    free_port,
    free_udp_tcp_port,
    swaks_send,
)
from tests.peers_news import Inn, NntpConnection, article_bytes, fresh_message_id, header_values

GW = "gw.test"
LIST = "list@lists.test"
LIST_ID = "test-gateway.lists.test"
LIST_POST = f"{GROUP}@news.test"


class Rig:
    def __init__(self, root: Path, inn: Inn, sink: SmtpSink) -> None:
        self.inn = inn
        self.sink = sink
        self.smtp = free_port()
        self.admin = free_port()
        path = root / "routes.yaml"
        path.write_text(f"""
version: 1
spool: spool
admin: tcp:{self.admin}:interface=127.0.0.1
listeners:
  mail-in:
    protocol: smtp
    listen: tcp:{self.smtp}:interface=127.0.0.1
    hostname: {GW}
  poll:
    protocol: nntp-poll
    connect: tcp:127.0.0.1:{inn.port}
    groups: [{GROUP}]
    interval: 1s
    start: new
    timeout: 30s
destinations:
  news:
    protocol: nntp
    connect: tcp:127.0.0.1:{inn.port}
    mode: post
    retry_min: 1s
    retry_max: 2s
  list:
    protocol: smtp
    connect: tcp:127.0.0.1:{sink.port}
    tls: none
    retry_min: 1s
    retry_max: 2s
  myself:
    protocol: smtp
    connect: tcp:127.0.0.1:{self.smtp}
    tls: none
    retry_min: 1s
    retry_max: 2s
routes:
  - name: mail-to-news
    from: mail-in
    match: {{rcpt: '^(?P<group>[a-z0-9.+-]+)@news\\.test$'}}
    transforms: [mail_to_news]
    options: {{newsgroups: '{{group}}', gateway: {GW}}}
    to: news
  - name: news-to-list
    from: poll
    continue: true
    transforms: [news_to_mail]
    options:
      to: 'The list <{LIST}>'
      list_id: {LIST_ID}
      list_post: {LIST_POST}
      gateway: {GW}
    to: list
  - name: news-back-to-the-group-address
    from: poll
    transforms: [news_to_mail]
    options: {{to: '{GROUP}@news.test', gateway: {GW}}}
    to: myself
""")
        self.process = GatewayProcess(path)

    def start(self, *, first: bool = False) -> None:
        since = self.process.log_mark()
        self.process.start(self.smtp, timeout=60)
        self.process.wait_for_log("listener poll (nntp-poll) started", since=since, timeout=30)
        if first:
            # With start: new, what is posted before the first mark is not taken.
            self.process.wait_for_log(f"following {GROUP} from article", since=since, timeout=30)

    def mail(self, mid: str, subject: str) -> None:
        data = (
            b"From: Alice <alice@mail.test>\n"
            b"To: " + LIST_POST.encode() + b"\n"
            b"Subject: " + subject.encode() + b"\n"
            b"Date: " + formatdate(localtime=True).encode() + b"\n"
            b"Message-ID: " + mid.encode() + b"\n"
            b"\nfrom mail\n"
        )
        code, transcript = swaks_send(self.smtp, LIST_POST, data=data.removesuffix(b"\n"))
        assert code == SwaksExit.OK, transcript

    def post(self, mid: str, subject: str) -> bytes:
        article = article_bytes(
            mid,
            GROUP,
            subject=subject,
            body=b"from a newsreader\n.a dot line\n",
            extra=[("References", "<parent.1@client.test>")],
        )
        code, text = self.inn.post(article)
        assert code == 240, text
        return article

    def at_sink(self) -> Counter[str]:
        return Counter(str(m.headers["Message-ID"]) for m in self.sink.messages())

    def wait_at_sink(self, mid: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.at_sink()[mid]:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{mid} did not reach smtp-sink in {timeout} s\n"
                    f"{self.process.log_text()[-3000:]}"
                )
            time.sleep(0.1)

    def queued(self, mid: str, route: str) -> int:
        pattern = rf"msgid={re.escape(mid)} route={re.escape(route)} .*outcome=queued"
        return len(re.findall(pattern, self.process.log_text()))

    def settle(self, polls: int = 3) -> None:
        """Let a few more polls run, so a copy that should not come would show up."""
        since = self.process.log_mark()
        time.sleep(polls * 1.0 + 1.0)
        assert "Traceback" not in self.process.log_text(since)


@pytest.fixture
def rig(tmp_path: Path, inn: Inn) -> Iterator[Rig]:
    with SmtpSink(tmp_path / "sink") as sink:
        rig = Rig(tmp_path, inn, sink)
        with rig.process:
            yield rig


def test_mail_news_mail_round_trip_stops_at_the_loop_header(rig: Rig, inn: Inn) -> None:
    rig.start(first=True)

    # 1. The gateway's own article: mail -> INN -> poller -> stopped by news_to_mail.
    own = fresh_message_id("own")
    rig.mail(own, "from the list")
    article = inn.wait_for_article(own, timeout=60)
    assert header_values(article, "X-Gateway-Loop") == [GW]
    # Both poll routes see it (in one routing step); each refuses it and says why.
    text = rig.process.wait_for_log(
        f"{own} not gated to mail: it carries X-Gateway-Loop: {GW}", timeout=60
    )
    assert text.count(f"{own} not gated to mail: it carries X-Gateway-Loop: {GW}") == 2

    # 2. A newsreader's article in the same group: out to the list once, and the copy sent
    #    back to the group address is stopped by mail_to_news.
    reader = fresh_message_id("reader")
    posted = rig.post(reader, "from a newsreader")
    rig.wait_at_sink(reader)
    rig.process.wait_for_log("not gated to news: it carries X-Gateway-Loop: gw.test", timeout=60)
    rig.settle()

    assert rig.at_sink()[own] == 0
    assert rig.at_sink()[reader] == 1
    (message,) = [m for m in rig.sink.messages() if m.headers["Message-ID"] == reader]
    assert message.sender == f"news-to-mail@{GW}"
    assert message.recipients == [LIST]
    h = message.headers
    assert h["To"] == f"The list <{LIST}>"
    assert h["List-Id"] == f"<{LIST_ID}>"
    assert h["List-Post"] == f"<mailto:{LIST_POST}>"
    assert h.get_all("X-Gateway-Loop") == [GW]
    assert h["Subject"] == "from a newsreader"
    assert h["References"] == "<parent.1@client.test>"
    assert h["Newsgroups"] == GROUP
    assert h["Date"] == header_values(posted, "Date")[0]
    assert h["From"] == "Tester <tester@client.test>"
    for gone in ("Path", "Xref", "Injection-Info", "Injection-Date", "NNTP-Posting-Host"):
        assert h[gone] is None, gone
    assert message.body == b"from a newsreader\n.a dot line\n"

    # Handed on by the poller once per route; the mail sent back was not queued for news.
    assert rig.queued(reader, "news-to-list") == 1
    assert rig.queued(reader, "news-back-to-the-group-address") == 1
    assert rig.queued(reader, "mail-to-news") == 0
    assert rig.queued(own, "news-to-list") == 0
    assert rig.queued(own, "mail-to-news") == 1
    assert [r["message-id"] for r in inn.over(GROUP)].count(reader) == 1

    # 3. After a restart nothing comes again, and the next article comes once.
    rig.process.stop()
    rig.start()
    later = fresh_message_id("later")
    rig.post(later, "after the restart")
    rig.wait_at_sink(later)
    rig.settle()
    counts = rig.at_sink()
    assert (counts[own], counts[reader], counts[later]) == (0, 1, 1)
    assert rig.queued(reader, "news-to-list") == 1


def test_inn_outage_is_logged_once_and_the_round_trip_resumes(rig: Rig, inn: Inn) -> None:
    rig.start(first=True)
    since = rig.process.log_mark()
    inn.stop()
    try:
        own = fresh_message_id("own-outage")
        rig.mail(own, "sent while the news server is down")
        rig.process.wait_for_log("NNTP poller poll: connection refused", since=since, timeout=30)
        # With interval 1s, polls fail at about 0, 1, 3 and 7 s: the waits double.
        time.sleep(9)
    finally:
        inn.start()
    rig.process.wait_for_log("answers again after", since=since, timeout=60)
    down = rig.process.log_text(since)
    waits = [
        int(w) for w in re.findall(r"poll: connection refused by \S+; next attempt in (\d+)s", down)
    ]
    assert len(waits) >= 3 and waits == [2**i for i in range(len(waits))], down
    failed = re.search(r"answers again after (\d+) failed poll", down)
    assert failed is not None and int(failed.group(1)) == len(waits)
    # The mail queued meanwhile is posted now, comes back through the poller and stops there.
    inn.wait_for_article(own, timeout=60)
    rig.process.wait_for_log(f"{own} not gated to mail", since=since, timeout=60)
    reader = fresh_message_id("reader-outage")
    rig.post(reader, "after the outage")
    rig.wait_at_sink(reader)
    rig.settle()
    counts = rig.at_sink()
    assert (counts[own], counts[reader]) == (0, 1)


def test_default_routes_run_without_a_news_server(tmp_path: Path) -> None:
    """The default routes.yaml, on free ports, with nothing listening where it expects INN."""
    no_server = free_port()
    text = (REPO_ROOT / "routes.yaml").read_text()
    # Every port the file listens on becomes a free one (TCP and UDP, for DNS).
    ports: dict[str, int] = {}

    def move(found: re.Match[str]) -> str:
        port = ports.setdefault(found.group(2), free_udp_tcp_port())
        return f"{found.group(1)}:{port}:interface=127.0.0.1"

    text = re.sub(r"\b(tcp|udp):(\d+):interface=127\.0\.0\.1", move, text)
    smtp, nntp, admin = ports["2525"], ports["1119"], ports["9100"]
    for old, new in (("tcp:127.0.0.1:119\n", f"tcp:127.0.0.1:{no_server}\n"),):
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "routes.yaml").write_text(text)
    shutil.copytree(REPO_ROOT / "plugins", tmp_path / "plugins")
    shutil.copy(REPO_ROOT / "users", tmp_path / "users")
    shutil.copy(REPO_ROOT / "webhook.secret", tmp_path / "webhook.secret")
    with GatewayProcess(tmp_path / "routes.yaml") as process:
        process.start([smtp, nntp, admin], timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=10) as ready:
            assert ready.status == 200
        since = process.log_mark()
        process.wait_for_log("NNTP poller news-poll: connection refused", timeout=30)

        # The NNTP listener takes a newsreader's post and files it in the Maildir as mail.
        mid = fresh_message_id("default")
        with NntpConnection(nntp) as conn:
            code, reply = conn.post(article_bytes(mid, "local.test", subject="to the gateway"))
        assert code == 240, reply
        deadline = time.monotonic() + 30
        while not (files := list((tmp_path / "var" / "mail" / "new").glob("*"))):
            assert time.monotonic() < deadline, process.log_text()[-3000:]
            time.sleep(0.1)
        (filed,) = [f.read_bytes() for f in files]
        assert f"Message-ID: {mid}".encode() in filed
        assert b"List-Id: <local-test.news.example.test>" in filed
        assert b"To: news@example.test" in filed

        # Mail for a group is accepted and waits in the spool for the news server.
        code, transcript = swaks_send(smtp, "local.test@news.example.test", timeout=60)
        assert code == SwaksExit.OK, transcript
        process.wait_for_log("route=mail-to-news", timeout=30)

        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=10) as ready:
            assert ready.status == 200
        log = process.log_text()
        (refused,) = [line for line in log.splitlines() if "news-poll: connection refused" in line]
        assert refused.endswith("next attempt in 60s"), refused
        assert "Traceback" not in log
        assert process.log_text(since).count("\n") < 40
