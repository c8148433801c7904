"""The spool's promises, checked on a real gateway process with real smtp-sink upstreams.

A 250 means the message is on disk: ``kill -9`` loses nothing that got one, a
restart picks up what waited, a Message-ID is delivered once, a slow upstream
does not hold up the others, and a full or unwritable disk makes the listener
answer ``452 4.3.1`` instead of taking mail it cannot keep.

Set CRASH_RUNS=10 to run the kill -9 test ten times in a row.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import smtplib
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.peers import LOOPBACK, GatewayProcess, SinkMessage, SmtpSink, free_port, small_disk

CRASH_RUNS = int(os.environ.get("CRASH_RUNS", "1"))
CRASH_MESSAGES = 2000
CRASH_CLIENTS = 20
CRASH_KILL_AT = 500  # messages at the sink when the gateway is killed
CRASH_CONCURRENCY = 10  # the upstream's concurrency: at most this many are in flight
CRASH_DEADLINE = 80.0  # seconds for one whole run


# --------------------------------------------------------------------------- helpers


def write_config(
    tmp_path: Path,
    port: int,
    destinations: dict[str, str],
    routes: dict[str, str],
    *,
    spool: Path | None = None,
    max_size: str = "1MiB",
) -> Path:
    """routes.yaml with one SMTP listener; ``destinations`` maps a name to its YAML flow
    mapping, ``routes`` a recipient domain to the destination that takes it."""
    lines = [
        "version: 1",
        "shutdown_timeout: 3s",
        *([f"spool: {spool}"] if spool is not None else []),
        "listeners:",
        "  mail-in:",
        "    protocol: smtp",
        f"    listen: tcp:{port}:interface=127.0.0.1",
        "    hostname: gw.test",
        f"    max_size: {max_size}",
        "destinations:",
        *(f"  {name}: {spec}" for name, spec in destinations.items()),
        "routes:",
    ]
    for domain, dest in routes.items():
        pattern = "@" + domain.replace(".", "\\.") + "$"
        lines += [
            f"  - name: to-{dest}",
            "    from: mail-in",
            f"    match: {{rcpt: '{pattern}'}}",
            f"    to: {dest}",
        ]
    path = tmp_path / "routes.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def smtp_upstream(port: int, **settings: object) -> str:
    values = {"retry_min": "1s", "retry_max": "2s", **settings}
    extra = "".join(f", {key}: {value}" for key, value in values.items())
    return f'{{protocol: smtp, connect: "tcp:127.0.0.1:{port}", tls: none{extra}}}'


def message_bytes(seq: int, *, msgid: str | None, rcpt: str, body_size: int = 1024) -> bytes:
    """A message that says which one it is (X-Seq) and whose body can be checked; CRLF line
    endings, as SMTP wants them (smtplib sends bytes as they are)."""
    header = f"From: <from@client.test>\nTo: <{rcpt}>\nSubject: message {seq}\nX-Seq: {seq}\n"
    if msgid is not None:
        header += f"Message-ID: {msgid}\n"
    return ((header + "\n").encode() + body_for(seq, body_size)).replace(b"\n", b"\r\n")


def body_for(seq: int, size: int) -> bytes:
    line = f"{seq:08d} " + "x" * 63 + "\n"
    return (line * (size // len(line) + 1)).encode()


def send(
    port: int, data: bytes, rcpt: str, *, sender: str = "from@client.test", timeout: float = 30
) -> tuple[int, str]:
    """One message over a new connection: the answer to the final dot as (code, text)."""
    with smtplib.SMTP(LOOPBACK, port, timeout=timeout) as client:
        client.ehlo("client.test")
        code, text = client.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = client.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = client.data(data)
        return code, text.decode()


def relay(
    port: int, seq: int, *, msgid: str | None = None, body_size: int = 1024
) -> tuple[int, str]:
    """Send message ``seq`` to to@relay.test; the answer to its final dot."""
    data = message_bytes(seq, msgid=msgid, rcpt="to@relay.test", body_size=body_size)
    return send(port, data, "to@relay.test")


def seq_of(message: SinkMessage) -> int:
    return int(message.headers["X-Seq"])


def arrivals(sink: SmtpSink) -> collections.Counter[int]:
    return collections.Counter(seq_of(m) for m in sink.messages())


def wait_arrived(sink: SmtpSink, wanted: set[int], timeout: float) -> collections.Counter[int]:
    """Wait until every message in ``wanted`` reached the sink; what arrived by then."""
    deadline = time.monotonic() + timeout
    while True:
        got = arrivals(sink)
        if wanted <= set(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def spool_rows(spool_file: Path) -> int:
    """Deliveries in a spool, read as the queue command would (a second connection)."""
    with contextlib.closing(sqlite3.connect(spool_file, timeout=10)) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM deliveries").fetchone()
    return int(count)


# --------------------------------------------------------------------------- kill -9


@dataclass
class Submitter:
    """SMTP clients on threads that behave like MTAs.

    Every message has a unique Message-ID and an X-Seq header. The client
    records which got a 250 to the final dot; a message whose connection broke
    before an answer, or that got a 4xx, is sent again later over a new
    connection (it may already be in the spool: "in doubt"), as an MTA would.
    """

    port: int
    total: int
    clients: int
    tag: str
    deadline: float
    todo: collections.deque[int] = field(default_factory=collections.deque)
    acked: dict[int, float] = field(default_factory=dict)
    in_doubt: set[int] = field(default_factory=set)
    refused: dict[int, str] = field(default_factory=dict)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.todo.extend(range(self.total))
        self.threads = [
            threading.Thread(target=self._client, name=f"smtp-client-{n}", daemon=True)
            for n in range(self.clients)
        ]
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(max(0.0, self.deadline - time.monotonic()) + 5)

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def _next(self) -> int | None:
        with self.lock:
            return self.todo.popleft() if self.todo else None

    def _client(self) -> None:
        client: smtplib.SMTP | None = None
        seq = self._next()
        while seq is not None and time.monotonic() < self.deadline:
            data = message_bytes(seq, msgid=f"<{seq}.{self.tag}@client.test>", rcpt="to@relay.test")
            sent_data = False
            try:
                if client is None:
                    client = smtplib.SMTP(LOOPBACK, self.port, timeout=20)
                    client.ehlo("client.test")
                code, text = client.mail("from@client.test")
                if code == 250:
                    code, text = client.rcpt("to@relay.test")
                if code == 250:
                    sent_data = True
                    code, text = client.data(data)
            except (OSError, smtplib.SMTPException) as exc:
                with self.lock:
                    self.errors[type(exc).__name__] += 1
                    if sent_data:
                        self.in_doubt.add(seq)
                    self.todo.append(seq)
                with contextlib.suppress(Exception):
                    client.close() if client is not None else None
                client = None
                time.sleep(0.05)  # the gateway is down: try again shortly
                seq = self._next()
                continue
            with self.lock:
                if code == 250:
                    self.acked[seq] = time.monotonic()
                elif 400 <= code < 500:
                    self.errors[str(code)] += 1
                    self.todo.append(seq)
                else:
                    self.refused[seq] = f"{code} {text.decode(errors='replace')}"
            if code != 250:
                with contextlib.suppress(Exception):
                    client.rset()
            seq = self._next()
        if client is not None:
            with contextlib.suppress(Exception):
                client.quit()


@pytest.mark.parametrize("run", range(1, CRASH_RUNS + 1))
def test_kill_9_loses_no_acknowledged_message(
    tmp_path: Path, smtp_sink: SmtpSink, run: int
) -> None:
    """kill -9 in the middle of 2,000 messages; restart; every message that got a 250 arrives.

    Why this is sound: our own SMTP clients (20 threads, smtplib) record the
    answer to each final dot, so "acknowledged" is exactly what the clients
    were promised. smtp-source would not do: it sets Message-Ids of its own but
    reports no per-message answers, and the gateway's ``outcome=queued`` lines
    are written after the commit but before the 250 leaves, so a kill in
    between would count a message whose client never got its 250. The clients
    act as MTAs: a message without an answer
    (connection cut by the kill) or with a 4xx is sent again after the restart,
    so in the end all 2,000 are acknowledged, and those sent twice carry the
    same Message-ID, which the duplicate rule removes.

    What may be delivered twice: deliveries in flight at the kill (the upstream
    said 250 but the gateway died before recording it). There are at most the
    destination's concurrency of those.
    """
    started = time.monotonic()
    deadline = started + CRASH_DEADLINE
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        {
            "relay": smtp_upstream(
                smtp_sink.port,
                concurrency=CRASH_CONCURRENCY,
                max_connections=CRASH_CONCURRENCY,
                timeout="10s",
            )
        },
        {"relay.test": "relay"},
    )
    spool_file = tmp_path / "var" / "spool" / "spool.sqlite"
    gw = GatewayProcess(config)
    gw.start(port)
    clients = Submitter(port, CRASH_MESSAGES, CRASH_CLIENTS, f"run{run}", deadline)
    try:
        clients.start()
        # Kill once CRASH_KILL_AT messages reached the sink, or three quarters were
        # acknowledged (a fast listener and a slow upstream), or after 20 s.
        kill_by = time.monotonic() + 20
        while (
            len(os.listdir(smtp_sink.dump_dir)) < CRASH_KILL_AT
            and clients.acked_count() < CRASH_MESSAGES * 3 // 4
            and time.monotonic() < kill_by
        ):
            time.sleep(0.005)
        gw.kill9()
        gw.wait(10)
        killed_at = time.monotonic() - started
        acked_at_kill = clients.acked_count()
        at_sink_at_kill = len(os.listdir(smtp_sink.dump_dir))
        queued_at_kill = spool_rows(spool_file)
        assert acked_at_kill < CRASH_MESSAGES, "the kill came after the last message: too late"
        gw.start(port)
        clients.join()
        assert not clients.refused, f"the gateway refused messages: {clients.refused}"
        assert len(clients.acked) == CRASH_MESSAGES, (
            f"only {len(clients.acked)} of {CRASH_MESSAGES} were acknowledged in time;"
            f" client errors {dict(clients.errors)}"
        )
        # Wait until the spool is empty: everything delivered, nothing left to send twice.
        while spool_rows(spool_file) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftover = spool_rows(spool_file)
        time.sleep(0.5)
        got = wait_arrived(smtp_sink, set(clients.acked), max(1.0, deadline - time.monotonic()))
    finally:
        gw.stop()
    elapsed = time.monotonic() - started
    messages = smtp_sink.messages()
    duplicates = sum(n - 1 for n in got.values())
    log = gw.log_text()
    figures = (
        f"run {run}: sent {CRASH_MESSAGES}, acknowledged {len(clients.acked)} (before the kill"
        f" {acked_at_kill}), in doubt at the kill {len(clients.in_doubt)}, at the sink at the kill"
        f" {at_sink_at_kill}, queued in the spool at the kill {queued_at_kill}; delivered"
        f" {len(messages)} ({len(got)} distinct), duplicates {duplicates}, removed as duplicates"
        f" {log.count('outcome=duplicate')}; killed after {killed_at:.1f} s, total {elapsed:.1f} s"
    )
    print(figures)
    missing = sorted(set(clients.acked) - set(got))
    assert not missing, f"acknowledged but never delivered: {missing[:20]}...; {figures}"
    assert set(got) <= set(range(CRASH_MESSAGES))
    assert leftover == 0, f"{leftover} deliveries still in the spool; {figures}"
    assert duplicates <= CRASH_CONCURRENCY, (
        f"more duplicates than deliveries can be in flight at once; {figures}:"
        f" {sorted(s for s, n in got.items() if n > 1)}"
    )
    for message in messages:
        seq = seq_of(message)
        assert message.body == body_for(seq, 1024), f"message {seq} arrived damaged"
        assert message.recipients == ["to@relay.test"]
    assert elapsed < 90, figures


# --------------------------------------------------------------------------- restart


def test_restart_tries_again_what_waited_for_a_down_upstream(tmp_path: Path) -> None:
    """With retry_min 1h, only the start-up pickup can deliver these within the test."""
    down = free_port()
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        {"relay": smtp_upstream(down, retry_min="1h", retry_max="2h")},
        {"relay.test": "relay"},
    )
    gw = GatewayProcess(config)
    gw.start(port)
    try:
        for seq in range(3):
            assert relay(port, seq, msgid=f"<restart-{seq}@client.test>")[0] == 250
        for seq in range(3):
            gw.wait_for_log(f"msgid=<restart-{seq}@client.test> route=to-relay destination=relay")
        assert gw.log_text().count("attempt=1 outcome=temporary") == 3
        gw.term()
        assert gw.wait(20) == 0
        with SmtpSink(tmp_path / "sink", port=down) as sink:
            mark = gw.log_mark()
            gw.start(port)
            got = sink.wait_for(3, timeout=10)
            assert sorted(seq_of(m) for m in got) == [0, 1, 2]
            assert "3 deliveries queued" in gw.log_text(since=mark)
            time.sleep(0.5)
            assert len(sink.messages()) == 3
    finally:
        gw.stop()


# --------------------------------------------------------------------------- duplicates


def test_a_message_id_is_delivered_once(tmp_path: Path, smtp_sink_factory) -> None:
    """The same Message-ID sent three times: while the first copy is still in flight (the
    upstream takes a second to answer DATA), and after it was delivered. One delivery."""
    sink = smtp_sink_factory(extra_args=["-w", "1"])
    port = free_port()
    config = write_config(
        tmp_path, port, {"relay": smtp_upstream(sink.port)}, {"relay.test": "relay"}
    )
    gw = GatewayProcess(config)
    gw.start(port)
    try:
        same = "<same-id@client.test>"
        assert relay(port, 1, msgid=same)[0] == 250
        assert relay(port, 2, msgid=same)[0] == 250  # the first copy is still on its way
        assert relay(port, 3, msgid="<other-id@client.test>")[0] == 250
        gw.wait_for_log("outcome=duplicate", timeout=10)
        gw.wait_for_log(
            f"msgid={same} route=to-relay destination=relay to=to@relay.test attempt=1 outcome=delivered"
        )
        assert relay(port, 4, msgid=same)[0] == 250  # after the first was delivered
        deadline = time.monotonic() + 10
        while gw.log_text().count("outcome=duplicate") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # a wrongly repeated delivery would reach the slow sink by now
        got = arrivals(sink)
    finally:
        gw.stop()
    with_same_id = [m for m in sink.messages() if m.headers["Message-ID"] == same]
    assert len(with_same_id) == 1, got
    assert got[3] == 1
    assert gw.log_text().count("outcome=duplicate") == 2


# --------------------------------------------------------------------------- slow upstream


def test_a_slow_upstream_does_not_delay_the_others(tmp_path: Path, smtp_sink_factory) -> None:
    slow = smtp_sink_factory(extra_args=["-w", "5"])  # 5 s before it answers DATA
    fast = smtp_sink_factory()
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        {
            "slow": smtp_upstream(slow.port, concurrency=2, timeout="30s"),
            "fast": smtp_upstream(fast.port, concurrency=2),
        },
        {"slow.test": "slow", "fast.test": "fast"},
    )
    gw = GatewayProcess(config)
    gw.start(port)
    n = 10
    try:
        started = time.monotonic()
        with smtplib.SMTP(LOOPBACK, port, timeout=30) as client:
            client.ehlo("client.test")
            for seq in range(n):
                for domain in ("slow.test", "fast.test"):
                    rcpt = f"x@{domain}"
                    client.mail("from@client.test")
                    client.rcpt(rcpt)
                    code, _ = client.data(message_bytes(seq, msgid=None, rcpt=rcpt))
                    assert code == 250
        accepted = time.monotonic() - started
        got = fast.wait_for(n, timeout=3)
        fast_done = time.monotonic() - started
        slow_done = len(slow.messages())
    finally:
        gw.stop()
    assert accepted < 3, f"the listener took {accepted:.1f} s to take {2 * n} messages"
    assert sorted(seq_of(m) for m in got) == list(range(n))
    assert fast_done < 4
    # The slow one is still busy with its first two messages (5 s each).
    assert slow_done < n, slow_done


# --------------------------------------------------------------------------- disk trouble


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the disk is full."""
    chunk = b"\0" * 65536
    with path.open("wb") as f:
        while True:
            try:
                f.write(chunk)
                f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())


def test_a_full_disk_gets_452_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "2m") as disk:
        down = free_port()
        port = free_port()
        config = write_config(
            tmp_path,
            port,
            {"relay": smtp_upstream(down, retry_min="1s", retry_max="1s")},
            {"relay.test": "relay"},
            spool=disk / "spool",
        )
        gw = GatewayProcess(config)
        gw.start(port)
        sink = SmtpSink(tmp_path / "sink", port=down)
        acked: set[int] = set()
        refused: set[int] = set()
        try:
            # The upstream is down: messages of 100 KB pile up until the disk is full.
            for seq in range(40):
                code, text = relay(port, seq, msgid=f"<full-{seq}@client.test>", body_size=100_000)
                if code == 250:
                    acked.add(seq)
                    continue
                assert (code, text[:5]) == (452, "4.3.1"), (code, text)
                refused.add(seq)
                if len(refused) == 3:
                    break
            assert refused, "the disk never filled up"
            assert len(acked) >= 2, f"only {len(acked)} messages fitted on the disk"
            assert gw.is_running()
            # The upstream is back: every acknowledged message arrives, exactly once.
            sink.start()
            got = wait_arrived(sink, acked, timeout=20)
            assert set(got) == acked, f"missing {sorted(acked - set(got))}"
            time.sleep(2)  # long enough for a repeated delivery to show
            got = arrivals(sink)
            assert set(got.values()) == {1}, got
            # Delivered mail made room: the listener takes messages again.
            seq = 100
            code, text = relay(port, seq)
            assert code == 250, text
            acked.add(seq)
            # Someone else fills the disk: 452 again, and no crash.
            filler = disk / "filler"
            fill(filler)
            for seq in (101, 102):
                code, text = relay(port, seq)
                assert (code, text[:5]) == (452, "4.3.1"), (code, text)
                refused.add(seq)
            assert gw.is_running()
            filler.unlink()
            seq = 103
            code, text = relay(port, seq)
            assert code == 250, text
            acked.add(seq)
            got = wait_arrived(sink, acked, timeout=10)
        finally:
            gw.stop()
            sink.stop()
    assert set(got) == acked, f"missing {sorted(acked - set(got))}"
    assert not set(got) & refused, "a message answered 452 was delivered"
    assert "not accepted" in gw.log_text()


def test_an_unwritable_spool_gets_452_and_recovers(
    disk_tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    """The spool's files turn unwritable while the gateway runs (as when ext4 remounts
    read-only after an error). ``chmod 0500`` on the folder would not do: root ignores it,
    and SQLite keeps its files open, so a folder's mode is never checked again; the
    immutable flag stops writes to open files, for root too."""
    port = free_port()
    config = write_config(
        disk_tmp_path, port, {"relay": smtp_upstream(smtp_sink.port)}, {"relay.test": "relay"}
    )
    gw = GatewayProcess(config)
    gw.start(port)
    # Not the -shm file: SQLite maps it into memory, and a write to a mapped page of an
    # immutable file kills the process with SIGBUS, which says nothing about the spool.
    files = [
        str(p) for p in (disk_tmp_path / "var" / "spool").iterdir() if not p.name.endswith("-shm")
    ]
    acked: set[int] = set()
    refused: set[int] = set()

    def attempt(seq: int) -> int:
        code, text = relay(port, seq, msgid=f"<rw-{seq}@client.test>")
        if code == 250:
            acked.add(seq)
        else:
            assert (code, text[:5]) == (452, "4.3.1"), (code, text)
            refused.add(seq)
        return code

    try:
        assert attempt(0) == 250
        smtp_sink.wait_for(1)
        locked = subprocess.run(
            ["chattr", "+i", *files], capture_output=True, text=True, check=False
        )
        if locked.returncode != 0:
            pytest.fail(
                f"chattr +i failed on the spool's files ({locked.stderr.strip()}); this test"
                " needs root and a file system with the immutable flag (ext4, xfs, btrfs).",
                pytrace=False,
            )
        try:
            assert [attempt(seq) for seq in (1, 2, 3)] == [452, 452, 452]
            assert gw.is_running()
        finally:
            subprocess.run(["chattr", "-i", *files], check=False)
        assert [attempt(seq) for seq in (4, 5)] == [250, 250]
        got = wait_arrived(smtp_sink, acked, timeout=10)
        time.sleep(0.5)
        got = arrivals(smtp_sink)
    finally:
        gw.stop()
    assert set(got) == acked == {0, 4, 5}
    assert set(got.values()) == {1}
    assert "disk I/O error" in gw.log_text() or "readonly" in gw.log_text()
