"""Tests for the embedded spool (SQLite) in inline mode: no reactor, no threads, no sleeps."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.message import Article, DnsQuery, Headers, MailMessage, Message
from gateway.spool import (
    DEAD,
    QUEUED,
    Delivery,
    SpoolError,
    SqliteSpool,
    Stored,
    decode_message,
    encode_message,
)
from tests.support.deferreds import run

T = TypeVar("T")

START = 1_700_000_000.0


class FakeTime:
    """The spool's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def spool(tmp_path: Path, clock: FakeTime) -> Iterator[SqliteSpool]:
    s = SqliteSpool(tmp_path / "spool", clock=clock, reserve=0)
    run(s.open())
    yield s
    run(s.close())


def mail(
    n: int = 1,
    *,
    msgid: str | None = "auto",
    recipients: tuple[str, ...] = ("a@x.test",),
    sender: str = "s@client.test",
    received: float = START,
) -> MailMessage:
    header = f"Subject: message {n}\n"
    if msgid is not None:
        header += (
            f"Message-ID: <{n}@client.test>\n" if msgid == "auto" else f"Message-ID: {msgid}\n"
        )
    return MailMessage.from_bytes(
        (header + f"\nbody {n}\n").encode(),
        sender=sender,
        recipients=recipients,
        listener="in",
        client="127.0.0.1",
        received=received,
    )


def put(spool: SqliteSpool, message: Message, *destinations: str) -> list[Delivery]:
    return run(spool.put([Stored(message, "r", destinations or ("a",))]))


def table_rows(spool: SqliteSpool, table: str) -> int:
    """Rows of a table, read through a connection of its own (as the queue command would)."""
    with sqlite3.connect(spool.path) as db:
        (count,) = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
    return int(count)


# --- the life of a delivery ------------------------------------------------------


def test_put_due_load_delivered(spool: SqliteSpool, clock: FakeTime) -> None:
    message = mail(1, recipients=("a@x.test", "b@x.test"))
    [delivery] = put(spool, message, "relay")
    assert delivery.destination == "relay"
    assert delivery.recipients == ("a@x.test", "b@x.test")
    assert delivery.msgid == "<1@client.test>"
    assert delivery.state == QUEUED and delivery.attempts == 0
    assert delivery.next_try == clock.now
    assert delivery.created == message.received

    assert run(spool.due("other", clock.now, 10, frozenset())) == []
    [due] = run(spool.due("relay", clock.now, 10, frozenset()))
    assert due == delivery
    loaded = run(spool.load(due))
    assert isinstance(loaded, MailMessage)
    assert loaded == message
    history = run(spool.history(delivery.id))
    assert history == [(clock.now, "accepted by route r")]

    run(spool.delivered(due, "250 ok", None))
    assert run(spool.due("relay", clock.now, 10, frozenset())) == []
    assert run(spool.entries(QUEUED)) == []
    assert run(spool.history(delivery.id)) == []
    assert table_rows(spool, "messages") == 0


def test_due_is_oldest_first_and_honours_limit_and_exclude(
    spool: SqliteSpool, clock: FakeTime
) -> None:
    ids = []
    for n in range(5):
        [d] = put(spool, mail(n), "relay")
        ids.append(d.id)
        clock.now += 1
    due = run(spool.due("relay", clock.now, 2, frozenset()))
    assert [d.id for d in due] == ids[:2]
    due = run(spool.due("relay", clock.now, 2, frozenset(ids[:2])))
    assert [d.id for d in due] == ids[2:4]
    # Only what is due by then.
    due = run(spool.due("relay", START + 1.5, 10, frozenset()))
    assert [d.id for d in due] == ids[:2]


def test_defer_records_the_try(spool: SqliteSpool, clock: FakeTime) -> None:
    [d] = put(spool, mail(1, recipients=("a@x.test", "b@x.test")), "relay")
    clock.now += 5
    run(spool.defer(d, clock.now + 60, "451 try later", ("b@x.test",)))
    [queued] = run(spool.entries(QUEUED))
    assert queued.attempts == 1
    assert queued.next_try == clock.now + 60
    assert queued.last_error == "451 try later"
    assert queued.recipients == ("b@x.test",)
    assert run(spool.due("relay", clock.now + 59, 10, frozenset())) == []
    [due] = run(spool.due("relay", clock.now + 60, 10, frozenset()))
    # The message comes back with the recipients still to deliver.
    loaded = run(spool.load(due))
    assert isinstance(loaded, MailMessage)
    assert loaded.recipients == ("b@x.test",)
    assert run(spool.history(d.id))[-1] == (clock.now, "deferred: 451 try later")
    run(spool.defer(due, clock.now + 120, "451 still", ("b@x.test",)))
    assert run(spool.entries(QUEUED))[0].attempts == 2


def test_kill_makes_a_dead_letter_and_retry_revives_it(spool: SqliteSpool, clock: FakeTime) -> None:
    [d] = put(spool, mail(1), "relay")
    [other] = put(spool, mail(2), "relay")
    run(spool.kill(d, "550 no such user"))
    [dead] = run(spool.entries(DEAD))
    assert dead.id == d.id and dead.state == DEAD
    assert dead.last_error == "550 no such user" and dead.attempts == 1
    assert [x.id for x in run(spool.entries(QUEUED))] == [other.id]
    # A dead letter is never due, however late it is.
    assert [x.id for x in run(spool.due("relay", clock.now + 1e9, 10, frozenset()))] == [other.id]
    assert run(spool.history(d.id))[-1][1] == "dead letter: 550 no such user"
    stats = run(spool.stats())
    assert (stats.queued, stats.dead) == (1, 1)

    clock.now += 100
    assert run(spool.retry([d.id])) == 1
    assert run(spool.entries(DEAD)) == []
    revived = next(x for x in run(spool.entries(QUEUED)) if x.id == d.id)
    assert revived.state == QUEUED and revived.next_try == clock.now
    assert run(spool.retry(["no-such-id"])) == 0


def test_retry_all_makes_everything_due_now(spool: SqliteSpool, clock: FakeTime) -> None:
    [a] = put(spool, mail(1), "relay")
    [b] = put(spool, mail(2), "relay")
    run(spool.defer(a, clock.now + 3600, "later", a.recipients))
    run(spool.kill(b, "dead"))
    clock.now += 1
    assert run(spool.retry(None)) == 2
    due = run(spool.due("relay", clock.now, 10, frozenset()))
    assert {d.id for d in due} == {a.id, b.id}


def test_drop(spool: SqliteSpool) -> None:
    [a, b] = put(spool, mail(1), "relay", "box")
    assert run(spool.drop(a.id)) is True
    assert run(spool.drop(a.id)) is False
    assert run(spool.history(a.id)) == []
    assert table_rows(spool, "messages") == 1  # b still needs it
    assert run(spool.drop(b.id)) is True
    assert table_rows(spool, "messages") == 0
    assert run(spool.drop("no-such-id")) is False


def test_message_shared_by_deliveries_goes_with_the_last_one(spool: SqliteSpool) -> None:
    deliveries = put(spool, mail(1), "relay", "box", "archive")
    assert len({d.message_id for d in deliveries}) == 1
    assert table_rows(spool, "messages") == 1
    first, second, third = deliveries
    run(spool.delivered(first, "ok", None))
    assert table_rows(spool, "messages") == 1
    assert run(spool.load(second)) == run(spool.load(third))
    run(spool.kill(second, "550"))  # a dead letter still needs its message
    run(spool.delivered(third, "ok", None))
    assert table_rows(spool, "messages") == 1
    assert isinstance(run(spool.load(second)), MailMessage)
    run(spool.delivered(second, "ok after retry", None))
    assert table_rows(spool, "messages") == 0
    with pytest.raises(SpoolError, match="missing"):
        run(spool.load(second))


def test_history_keeps_every_event_in_order(spool: SqliteSpool, clock: FakeTime) -> None:
    [d] = put(spool, mail(1), "relay")
    for n in range(3):
        clock.now += 10
        run(spool.defer(d, clock.now + 1, f"try {n}", d.recipients))
    clock.now += 10
    run(spool.kill(d, "gave up"))
    assert run(spool.history(d.id)) == [
        (START, "accepted by route r"),
        (START + 10, "deferred: try 0"),
        (START + 20, "deferred: try 1"),
        (START + 30, "deferred: try 2"),
        (START + 40, "dead letter: gave up"),
    ]


def test_stats(spool: SqliteSpool, clock: FakeTime) -> None:
    stats = run(spool.stats())
    assert (stats.queued, stats.dead, stats.oldest) == (0, 0, None)
    put(spool, mail(1, received=START - 50), "relay")
    [b] = put(spool, mail(2, received=START - 100), "relay")
    put(spool, mail(3, received=START - 10), "relay", "box")
    run(spool.kill(b, "dead"))
    stats = run(spool.stats())
    assert (stats.queued, stats.dead) == (3, 1)
    assert stats.oldest == START - 50  # the oldest queued one; dead letters do not count


# --- queue ids -----------------------------------------------------------------


def test_the_deliveries_of_a_message_are_filed_under_its_queue_id(spool: SqliteSpool) -> None:
    message = mail(1)
    other = mail(2)
    rows = run(
        spool.put(
            [
                Stored(message, "r1", ("a", "b")),
                Stored(message, "r2", ("c",), queue_id=message.id),
                Stored(other, "r3", ("a",)),
            ]
        )
    )
    assert [d.id for d in rows] == [f"{message.id}.{n}" for n in (1, 2, 3)] + [f"{other.id}.1"]
    assert [d.queue_id for d in rows] == [message.id] * 3 + [other.id]
    assert [d.id for d in run(spool.find(message.id))] == [d.id for d in rows[:3]]
    [one] = run(spool.find(f"{message.id}.2"))
    assert (one.route, one.destination) == ("r1", "b")
    # A Message-ID, with or without its angle brackets, names the deliveries too.
    assert [d.id for d in run(spool.find("<2@client.test>"))] == [f"{other.id}.1"]
    assert [d.id for d in run(spool.find("2@client.test"))] == [f"{other.id}.1"]
    assert run(spool.find("NOSUCH")) == []
    assert run(spool.entry(f"{message.id}.3")) == rows[2]


def test_a_message_stored_twice_gets_new_delivery_numbers(spool: SqliteSpool) -> None:
    message = mail(1)
    first = put(spool, message, "a", "b")
    again = put(spool, message, "a")
    assert [d.id for d in first + again] == [f"{message.id}.{n}" for n in (1, 2, 3)]
    assert len(run(spool.find(message.id))) == 3


def test_a_spool_from_before_queue_ids_is_opened_and_its_rows_keep_their_ids(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    with sqlite3.connect(folder / "spool.sqlite") as db:
        db.executescript(
            """
            CREATE TABLE messages (id TEXT PRIMARY KEY, data BLOB NOT NULL);
            CREATE TABLE deliveries (
                id TEXT PRIMARY KEY, message_id TEXT NOT NULL, route TEXT NOT NULL,
                destination TEXT NOT NULL, recipients TEXT NOT NULL, msgid TEXT NOT NULL,
                created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                next_try REAL NOT NULL, last_error TEXT NOT NULL DEFAULT '', state TEXT NOT NULL
            );
            """
        )
        db.execute("INSERT INTO messages VALUES ('M1', ?)", (encode_message(mail(1)),))
        db.execute(
            "INSERT INTO deliveries VALUES"
            " ('OLD1', 'M1', 'r', 'a', '[\"a@x.test\"]', '<1@client.test>', 1.0, 0, 1.0, '',"
            " 'queued')"
        )
    s = SqliteSpool(folder, clock=FakeTime(), reserve=0)
    run(s.open())
    try:
        [old] = run(s.find("OLD1"))
        assert (old.id, old.queue_id) == ("OLD1", "OLD1")
        new = put(s, mail(2))
        assert new[0].id.endswith(".1")
        assert [d.id for d in run(s.entries(QUEUED))] == ["OLD1", new[0].id]
    finally:
        run(s.close())


# --- duplicates --------------------------------------------------------------------


def test_seen_remembers_delivered_message_ids_per_destination(
    spool: SqliteSpool, clock: FakeTime
) -> None:
    [d] = put(spool, mail(1), "relay")
    assert run(spool.seen("relay", "<1@client.test>", 0)) is False
    clock.now += 10
    run(spool.delivered(d, "ok", clock.now - 3600))
    assert run(spool.seen("relay", "<1@client.test>", clock.now - 3600)) is True
    assert run(spool.seen("relay", "<1@client.test>", clock.now)) is True
    # Delivered before the window's start: not a duplicate any more.
    assert run(spool.seen("relay", "<1@client.test>", clock.now + 1)) is False
    assert run(spool.seen("box", "<1@client.test>", 0)) is False
    assert run(spool.seen("relay", "<2@client.test>", 0)) is False


def test_delivered_forgets_message_ids_older_than_the_window(
    spool: SqliteSpool, clock: FakeTime
) -> None:
    [old] = put(spool, mail(1), "relay")
    run(spool.delivered(old, "ok", clock.now - 3600))
    assert table_rows(spool, "delivered") == 1
    clock.now += 7200
    [new] = put(spool, mail(2), "relay")
    run(spool.delivered(new, "ok", clock.now - 3600))
    assert run(spool.seen("relay", "<1@client.test>", 0)) is False  # forgotten, even with since=0
    assert run(spool.seen("relay", "<2@client.test>", 0)) is True
    assert table_rows(spool, "delivered") == 1


def test_delivered_without_window_or_message_id_remembers_nothing(spool: SqliteSpool) -> None:
    [a] = put(spool, mail(1), "relay")
    run(spool.delivered(a, "duplicate", None))
    [b] = put(spool, mail(2, msgid=None), "relay")
    assert b.msgid == ""
    run(spool.delivered(b, "ok", 0))
    assert table_rows(spool, "delivered") == 0


# --- failures --------------------------------------------------------------------


def test_put_refuses_what_is_not_stored(spool: SqliteSpool) -> None:
    query = DnsQuery(wire=b"\x00" * 12, qname="x.test", qtype=1)
    with pytest.raises(SpoolError, match="not stored"):
        run(spool.put([Stored(query, "r", ("a",))]))
    assert table_rows(spool, "deliveries") == 0


def test_put_keeps_the_reserve_free(tmp_path: Path, clock: FakeTime) -> None:
    """A message that would leave less than ``reserve`` bytes free is refused, and nothing of it
    is stored; the changes that free space still go through."""
    s = SqliteSpool(tmp_path / "spool", clock=clock, reserve=0)
    run(s.open())
    [kept] = put(s, mail(1), "relay")
    run(s.close())
    free = s._free_space()
    huge = SqliteSpool(tmp_path / "spool", clock=clock, reserve=free)
    run(huge.open())
    try:
        with pytest.raises(SpoolError, match="disk is nearly full"):
            put(huge, mail(2), "relay")
        assert [d.id for d in run(huge.entries(QUEUED))] == [kept.id]
        assert table_rows(huge, "messages") == 1
        run(huge.delivered(kept, "ok", clock.now - 60))
        assert run(huge.entries(QUEUED)) == []
    finally:
        run(huge.close())


def test_a_full_database_fails_the_group_and_the_spool_goes_on(
    spool: SqliteSpool, clock: FakeTime
) -> None:
    """SQLite rolls back the whole transaction on SQLITE_FULL; the spool must say so and go on."""
    [before] = put(spool, mail(1), "relay")
    assert spool._inline is not None
    (pages,) = spool._inline.execute("PRAGMA page_count").fetchone()
    spool._inline.execute(f"PRAGMA max_page_count={pages + 2}")
    big = mail(2).replace_body(b"x" * 200_000)
    with pytest.raises(SpoolError, match="full"):
        put(spool, big, "relay")
    assert [d.id for d in run(spool.entries(QUEUED))] == [before.id]
    # Small changes still fit, and the spool takes messages again once there is room.
    run(spool.defer(before, clock.now + 1, "later", before.recipients))
    spool._inline.execute("PRAGMA max_page_count=1073741823")
    [after] = put(spool, big, "relay")
    assert run(spool.load(after)) == big


# --- serialisation -----------------------------------------------------------------

addresses = st.text(
    st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=40
)  # anything an SMTP client might send, also odd things
field_names = st.from_regex(rb"\A[!-9;-~]{1,20}\Z", fullmatch=True).map(lambda b: b.decode())
field_values = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    min_size=1,
    max_size=3,
).map(b"\n\t".join)  # folded with LF + white space


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fields=st.lists(st.tuples(field_names, field_values), max_size=6),
    body=st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"")),
    sender=addresses,
    recipients=st.lists(addresses, max_size=4),
    received=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_encode_decode_round_trip_mail(
    fields: list[tuple[str, bytes]],
    body: bytes,
    sender: str,
    recipients: list[str],
    received: float,
) -> None:
    header = b"".join(name.encode() + b":" + value + b"\n" for name, value in fields)
    raw = header + b"\n" + body
    message = MailMessage.from_bytes(
        raw,
        sender=sender,
        recipients=recipients,
        listener="in",
        client="127.0.0.1",
        received=received,
    )
    back = decode_message(encode_message(message))
    assert isinstance(back, MailMessage)
    assert back == message
    assert back.to_bytes() == raw
    assert back.sender == sender and back.recipients == tuple(recipients)


@settings(max_examples=300)
@given(raw=st.binary(max_size=400).map(lambda b: b.replace(b"\r", b"")))
def test_encode_decode_round_trip_of_any_bytes(raw: bytes) -> None:
    """Whatever the bytes (no header, junk, binary), the stored message reads back the same."""
    for message in (
        MailMessage.from_bytes(raw, sender="", recipients=["r@x.test"]),
        Article.from_bytes(raw, listener="news", client="::1"),
    ):
        back = decode_message(encode_message(message))
        assert back == message
        assert type(back) is type(message)


def test_stored_message_round_trips_through_the_spool(spool: SqliteSpool) -> None:
    message = mail(7).replace_headers(
        Headers((("Subject", b" caf\xc3\xa9 \xff"), ("X-Folded", b" a\n\tb")))
    )
    [d] = put(spool, message, "relay")
    assert run(spool.load(d)) == message


# --- the threads (writer and reader) ---------------------------------------------------


class ThreadReactor:
    """What the spool's threads need of a reactor: callFromThread, here into a queue the
    test drains in its own thread (as the reactor thread would)."""

    def __init__(self) -> None:
        import queue

        self.calls: queue.SimpleQueue[tuple[Any, tuple[Any, ...]]] = queue.SimpleQueue()

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.put((f, args))

    def wait_for(self, d: Deferred[T], timeout: float = 30.0) -> T:
        import time

        results: list[object] = []
        d.addBoth(results.append)
        deadline = time.monotonic() + timeout
        while not results:
            f, args = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            f(*args)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]  # type: ignore[return-value]


def test_reads_do_not_wait_behind_the_writer_and_see_each_commit(
    tmp_path: Path, clock: FakeTime
) -> None:
    import threading

    reactor = ThreadReactor()
    s = SqliteSpool(tmp_path / "spool", reactor, clock=clock, reserve=0)
    reactor.wait_for(Deferred.fromCoroutine(s.open()))
    try:
        [first] = reactor.wait_for(Deferred.fromCoroutine(s.put([Stored(mail(1), "r", ("a",))])))
        # A change that holds the writer (as a slow disk flush would).
        release = threading.Event()

        def slow(db: sqlite3.Connection) -> None:
            assert release.wait(30)

        held = s._submit(slow)
        two = mail(2)
        second = Deferred.fromCoroutine(s.put([Stored(two, "r", ("a",))]))
        # Queries are answered meanwhile, from the last commit.
        due = reactor.wait_for(Deferred.fromCoroutine(s.due("a", clock.now, 10, frozenset())))
        assert [d.id for d in due] == [first.id]
        assert not held.called and not second.called
        release.set()
        reactor.wait_for(held)
        [stored] = reactor.wait_for(second)
        # Once a change's commit has returned, every query sees it.
        due = reactor.wait_for(Deferred.fromCoroutine(s.due("a", clock.now, 10, frozenset())))
        assert [d.id for d in due] == [first.id, stored.id]
        assert reactor.wait_for(Deferred.fromCoroutine(s.load(stored))) == two
        # The reader cannot change anything, even by mistake.
        refused = s._submit(lambda db: db.execute("DELETE FROM deliveries"), write=False)
        with pytest.raises(SpoolError):
            reactor.wait_for(refused)
        assert table_rows(s, "deliveries") == 2
    finally:
        release.set()
        for jobs, thread in ((s._reads, s._reader), (s._jobs, s._thread)):
            jobs.put(None)
            if thread is not None:
                thread.join(30)
