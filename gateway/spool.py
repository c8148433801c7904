"""The durable spool: messages owed to destinations, kept on disk until delivered.

A listener stores a message here and only then says yes to its sender.  The
embedded backend is SQLite in WAL mode with ``synchronous=FULL``: one writer
thread runs every change, and changes that arrive while a commit is in
progress are committed together in the next one (group commit), so many
concurrent arrivals share one disk flush instead of paying one each.  Queries
run on a second connection in a reader thread, so they never wait behind a
flush and see every change whose commit has returned.

``SpoolBackend`` is the interface the rest of the gateway uses.  Another
backend (on a broker shared by several gateway nodes) implements the same
methods; nothing outside this module touches SQL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import queue
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.disk import fsync_folder
from gateway.message import (
    FileMessage,
    MailMessage,
    Message,
    NotStored,
    decode_message,
    encode_message,
    new_message_id,
)

log = Logger(namespace="gateway.spool")

T = TypeVar("T")

QUEUED = "queued"
DEAD = "dead"

# Disk space the embedded spool keeps free for recording deliveries (see SqliteSpool).
RESERVE = 1024 * 1024


class SpoolError(Exception):
    """The spool cannot keep a message (disk full, unwritable); the sender should retry."""


@dataclass(frozen=True)
class Delivery:
    """One stored message owed to one destination."""

    id: str
    message_id: str  # the stored payload, shared by the deliveries of one routed message
    route: str
    destination: str
    recipients: tuple[str, ...]  # for mail: the recipients still to deliver
    msgid: str  # the RFC 5322 Message-ID, "" if none (for duplicates and listings)
    created: float
    attempts: int = 0
    next_try: float = 0.0
    last_error: str = ""
    state: str = QUEUED
    # The id the sender was given ("250 Ok: queued as ID"), shared by every delivery
    # of that message; a delivery's own id is "ID.N".  Rows from before queue ids: id.
    queue_id: str = ""
    # When `gateway queue retry` last revived it from the dead letters (0: never);
    # max_age counts from then, so a revived delivery gets a whole schedule again.
    revived: float = 0.0
    # Its sender has had a bounce for it: a second failure after a revival sends none.
    bounced: bool = False

    @property
    def since(self) -> float:
        """When this delivery's schedule began: arrival, or its latest revival."""
        return max(self.created, self.revived)


@dataclass(frozen=True)
class Stored:
    """What put() needs: a routed message, its route and its destinations.

    The deliveries are filed under ``queue_id``, the id of the message as it
    arrived (the routed copies of one message share it); by default the routed
    message's own id.
    """

    message: Message
    route: str
    destinations: tuple[str, ...]
    queue_id: str = ""


@dataclass(frozen=True)
class Stats:
    queued: int
    dead: int
    oldest: float | None  # arrival time of the oldest queued delivery


class SpoolBackend(Protocol):
    """What the gateway needs from a spool.  Every method returns once the change is durable.

    Deliveries are claimed by a node before it tries them, so that several nodes
    sharing one backend never try the same delivery at once; the embedded
    backend has one node and claims in memory.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def put(
        self, items: Sequence[Stored], state: Mapping[str, str] | None = None
    ) -> list[Delivery]:
        """Store messages and their deliveries; raise SpoolError if it cannot.

        ``state`` entries (see set_state) are written in the same transaction, so
        a poller's high-water mark moves exactly when its article is stored.
        """
        ...

    async def get_state(self, key: str) -> str | None:
        """A value a listener keeps across restarts (a poller's high-water mark)."""
        ...

    async def set_state(self, key: str, value: str) -> None: ...

    async def due(
        self, destination: str, now: float, limit: int, exclude: frozenset[str]
    ) -> list[Delivery]:
        """Queued deliveries to ``destination`` whose next try is due, oldest first."""
        ...

    def stored_form(self, message: Message, message_id: str) -> Message:
        """``message`` as the spool holds it once stored as ``message_id`` (an upload's
        content has moved into files/)."""
        ...

    async def load(self, delivery: Delivery) -> Message:
        """The message of a delivery, with the delivery's remaining recipients."""
        ...

    async def delivered(self, delivery: Delivery, note: str, forget_before: float | None) -> None:
        """Forget a delivery (and its message when no delivery needs it any more).

        With ``forget_before``, also remember the delivery's Message-ID for the
        duplicate check, and forget those remembered before that time.
        """
        ...

    async def defer(
        self, delivery: Delivery, next_try: float, error: str, recipients: tuple[str, ...]
    ) -> None:
        """Record a failed try; try again at ``next_try`` for ``recipients``."""
        ...

    async def kill(self, delivery: Delivery, error: str, bounced: bool = False) -> None:
        """Make the delivery a dead letter; ``bounced``: its sender has been told."""
        ...

    async def seen(self, destination: str, msgid: str, since: float) -> bool:
        """Whether ``msgid`` was delivered to ``destination`` after ``since``."""
        ...

    async def entries(self, state: str) -> list[Delivery]: ...

    async def entry(self, delivery_id: str) -> Delivery | None:
        """The delivery with this id, queued or dead; None if there is none."""
        ...

    async def find(self, key: str) -> list[Delivery]:
        """The deliveries that ``key`` names, queued or dead: the one with that delivery
        id, else those of the message with that queue id, else those whose
        Message-ID it is (with or without its angle brackets)."""
        ...

    async def history(self, delivery_id: str) -> list[tuple[float, str]]: ...

    async def retry(
        self, delivery_ids: Sequence[str] | None, by: str = "'gateway queue retry'"
    ) -> int:
        """Make deliveries (all when None, dead ones included) due now; the number changed.
        A dead letter's history says it was revived ``by`` whom."""
        ...

    async def drop(self, delivery_id: str) -> bool: ...

    async def stats(self) -> Stats: ...


# --- the embedded backend ---------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    route TEXT NOT NULL,
    destination TEXT NOT NULL,
    recipients TEXT NOT NULL,
    msgid TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    queue_id TEXT NOT NULL DEFAULT '',
    revived REAL NOT NULL DEFAULT 0,
    bounced INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, state, next_try);
CREATE INDEX IF NOT EXISTS deliveries_message ON deliveries (message_id);
CREATE TABLE IF NOT EXISTS history (
    delivery_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_delivery ON history (delivery_id);
CREATE TABLE IF NOT EXISTS delivered (
    destination TEXT NOT NULL,
    msgid TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (destination, msgid)
);
CREATE INDEX IF NOT EXISTS delivered_at ON delivered (at);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_COLUMNS = (
    "id, message_id, route, destination, recipients, msgid, created, attempts, next_try,"
    " last_error, state, queue_id, revived, bounced"
)
# Columns added since the first spools; an older spool gets them when it is opened.
_ADDED_COLUMNS = {
    "queue_id": "TEXT NOT NULL DEFAULT ''",
    "revived": "REAL NOT NULL DEFAULT 0",
    "bounced": "INTEGER NOT NULL DEFAULT 0",
}
_QUEUE_ID_INDEX = "CREATE INDEX IF NOT EXISTS deliveries_queue ON deliveries (queue_id)"


def _row(row: Sequence[Any]) -> Delivery:
    return Delivery(
        id=row[0],
        message_id=row[1],
        route=row[2],
        destination=row[3],
        recipients=tuple(json.loads(row[4])),
        msgid=row[5],
        created=row[6],
        attempts=row[7],
        next_try=row[8],
        last_error=row[9],
        state=row[10],
        queue_id=row[11] or row[0],
        revived=row[12],
        bounced=bool(row[13]),
    )


class _Job:
    __slots__ = ("deferred", "error", "func", "result", "write")

    def __init__(self, func: Callable[[sqlite3.Connection], Any], write: bool) -> None:
        self.func = func
        self.write = write
        self.deferred: Deferred[Any] = Deferred()
        self.result: Any = None
        self.error: BaseException | None = None


def _as_spool_error(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError | OSError):
        text = str(exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            text = "disk full"
        return SpoolError(f"the spool cannot store the message: {text}")
    return exc


class SqliteSpool:
    """The embedded spool: one SQLite file in WAL mode, one writer thread, group commit."""

    def __init__(
        self,
        directory: str | Path,
        reactor: Any = None,
        *,
        clock: Callable[[], float] = time.time,
        reserve: int = RESERVE,
    ) -> None:
        """With a reactor, changes run on the writer thread; without one (the ``gateway
        queue`` command, tests) they run at once in the caller's thread.

        ``reserve`` bytes of the disk are kept free: a new message that would eat
        into them is refused, so that the changes that record deliveries (and so
        free space again) can still be written when the disk fills up.
        """
        self.directory = Path(directory)
        self.path = self.directory / "spool.sqlite"
        # Uploads (file messages) keep their content out of the database: in
        # incoming/ while they arrive, in files/ (named by message id) once stored.
        self.incoming = self.directory / "incoming"
        self.files = self.directory / "files"
        self.reactor = reactor
        self.clock = clock
        self.reserve = reserve
        self._claimed = 0  # bytes promised to the messages of the transaction being built
        self._room: int | None = None  # free bytes when the transaction began (see _check_room)
        self._page_size = 4096
        self._inline: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._reads: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._reader: threading.Thread | None = None
        self._opened: Deferred[None] | None = None
        self.commits = 0  # how many disk flushes; the group-commit ratio is jobs/commits
        self.writes = 0

    # --- the writer thread ---

    def _connect(self) -> sqlite3.Connection:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=10000")  # the queue command may write at the same time
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=OFF")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in columns:
                db.execute(f"ALTER TABLE deliveries ADD COLUMN {column} {kind}")
        db.execute(_QUEUE_ID_INDEX)
        (page,) = db.execute("PRAGMA page_size").fetchone()
        self._page_size = int(page)
        return db

    def _run(self, db: sqlite3.Connection) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            batch = [job]
            # Everything that queued up while the last commit was flushing goes
            # into this transaction: that is the group commit.
            while len(batch) < 512:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)
                    break
                batch.append(more)
            self._execute(db, batch)
            # One wake-up of the reactor for the whole group, not one per change.
            self.reactor.callFromThread(self._fire_all, batch)
        db.close()

    def _read(self, db: sqlite3.Connection) -> None:
        """The reader thread: queries on a connection of their own, never behind a flush."""
        while True:
            job = self._reads.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < 512:
                try:
                    more = self._reads.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._reads.put(None)
                    break
                batch.append(more)
            for j in batch:
                try:
                    j.result = j.func(db)
                except BaseException as exc:
                    j.error = _as_spool_error(exc)
            self.reactor.callFromThread(self._fire_all, batch)
        db.close()

    def _execute(self, db: sqlite3.Connection, batch: list[_Job]) -> None:
        self._claimed = 0
        self._room = None
        writes = [j for j in batch if j.write]
        for j in batch:
            if not j.write:
                try:
                    j.result = j.func(db)
                except BaseException as exc:
                    j.error = _as_spool_error(exc)
        if not writes:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            for j in writes:
                j.error = _as_spool_error(exc)
            self._reclaim(db)
            return
        lost: BaseException | None = None
        for j in writes:
            db.execute("SAVEPOINT job")
            try:
                j.result = j.func(db)
                db.execute("RELEASE job")
            except BaseException as exc:
                j.error = _as_spool_error(exc)
                if not db.in_transaction:
                    # SQLite rolled the whole transaction back (a full disk does):
                    # every change of the group is lost and fails.
                    lost = exc
                    break
                # One bad change fails alone; the rest of the group still commits.
                db.execute("ROLLBACK TO job")
                db.execute("RELEASE job")
        try:
            if lost is not None:
                raise lost
            db.execute("COMMIT")
            self.commits += 1
            self.writes += len(writes)
        except BaseException as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for j in writes:
                j.error = _as_spool_error(exc)
                j.result = None
        self._reclaim(db)

    def _free_space(self) -> int:
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def _check_room(self, db: sqlite3.Connection, size: int) -> None:
        """Refuse a message that would eat into the space kept for recording deliveries."""
        # The message is written to the WAL, then copied into the database file by
        # the next checkpoint; until the WAL is reused both copies take space.
        # Pages freed by delivered messages are reused before the file grows.
        need = 2 * size
        if self._room is None:
            # Measured once per transaction: later messages of the same group are
            # counted against it through _claimed.
            (unused,) = db.execute("PRAGMA freelist_count").fetchone()
            self._room = self._free_space() + int(unused) * self._page_size
        free = self._room - self._claimed
        if free - need < self.reserve:
            raise SpoolError(
                f"the spool's disk is nearly full ({max(0, free) // 1024} KiB free,"
                f" {(need + self.reserve) // 1024} KiB needed); free some space on it"
            )
        self._claimed += need

    def _reclaim(self, db: sqlite3.Connection) -> None:
        """When the disk runs low, move the WAL into the database file and truncate it."""
        if self._free_space() >= 2 * self.reserve:
            return
        # Without waiting: a reader in another process (the queue command) only
        # postpones it to the next commit.
        db.execute("PRAGMA busy_timeout=0")
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass
        finally:
            db.execute("PRAGMA busy_timeout=10000")

    @classmethod
    def _fire_all(cls, batch: list[_Job]) -> None:
        for job in batch:
            cls._fire(job)

    @staticmethod
    def _fire(job: _Job) -> None:
        if job.error is not None:
            job.deferred.errback(job.error)
        else:
            job.deferred.callback(job.result)

    def _submit(self, func: Callable[[sqlite3.Connection], T], write: bool = True) -> Deferred[T]:
        job = _Job(func, write)
        if self._inline is not None:
            self._execute(self._inline, [job])
            self._fire(job)
            return job.deferred
        if self._thread is None:
            raise SpoolError("the spool is not open")
        if not write and self._reader is not None:
            self._reads.put(job)
        else:
            self._jobs.put(job)
        return job.deferred

    # --- SpoolBackend ---

    async def open(self) -> None:
        try:
            db = self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from None
        if self.reactor is None:
            self._inline = db  # the queue command, beside a running gateway: no sweep
            return
        try:
            self._sweep_contents(db)
        except (sqlite3.Error, OSError) as exc:
            db.close()
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from None
        try:
            reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            reader.execute("PRAGMA busy_timeout=10000")
            reader.execute("PRAGMA query_only=ON")
        except (sqlite3.Error, OSError) as exc:
            db.close()
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from None
        # Reads (due deliveries, duplicate checks, messages to load) have a thread and
        # a connection of their own: in WAL mode they see the last commit at once
        # instead of waiting behind the writer's disk flush.
        self._reader = threading.Thread(
            target=self._read, args=(reader,), name="spool-reader", daemon=True
        )
        self._reader.start()
        self._thread = threading.Thread(
            target=self._run, args=(db,), name="spool-writer", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        thread, self._thread = self._thread, None
        reader, self._reader = self._reader, None
        if reader is not None:
            self._reads.put(None)
            await Deferred.fromCoroutine(_join(self.reactor, reader))
        if thread is None:
            return
        self._jobs.put(None)
        await Deferred.fromCoroutine(_join(self.reactor, thread))

    async def put(
        self, items: Sequence[Stored], state: Mapping[str, str] | None = None
    ) -> list[Delivery]:
        now = self.clock()
        rows: list[Delivery] = []
        payloads: list[tuple[str, bytes]] = []
        numbers: dict[str, int] = {}
        moves: list[tuple[Path, Path]] = []  # upload contents: incoming -> files
        for item in items:
            payload_id = new_message_id(now)
            try:
                payloads.append((payload_id, encode_message(item.message)))
            except NotStored as exc:
                raise SpoolError(str(exc)) from None
            if isinstance(item.message, FileMessage):
                if not item.message.path:
                    raise SpoolError(f"file {item.message.name} has no content to store")
                moves.append((Path(item.message.path), self.files / payload_id))
            recipients = item.message.recipients if isinstance(item.message, MailMessage) else ()
            msgid = getattr(item.message, "message_id", None) or ""
            queue_id = item.queue_id or item.message.id
            for destination in item.destinations:
                number = numbers[queue_id] = numbers.get(queue_id, 0) + 1
                rows.append(
                    Delivery(
                        id=f"{queue_id}.{number}",
                        message_id=payload_id,
                        route=item.route,
                        destination=destination,
                        recipients=tuple(recipients),
                        msgid=msgid,
                        created=item.message.received,
                        next_try=now,
                        queue_id=queue_id,
                    )
                )

        def insert(db: sqlite3.Connection, rows: list[Delivery]) -> None:
            db.executemany(
                f"INSERT INTO deliveries ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,0,0)",
                [
                    (
                        d.id,
                        d.message_id,
                        d.route,
                        d.destination,
                        json.dumps(d.recipients),
                        d.msgid,
                        d.created,
                        0,
                        d.next_try,
                        "",
                        QUEUED,
                        d.queue_id,
                    )
                    for d in rows
                ],
            )

        def store(db: sqlite3.Connection) -> list[Delivery]:
            nonlocal rows
            self._check_room(db, sum(len(data) for _, data in payloads))
            if moves:
                self._move_in(moves)
            db.executemany("INSERT INTO messages (id, data) VALUES (?, ?)", payloads)
            db.execute("SAVEPOINT rows")
            try:
                insert(db, rows)
                db.execute("RELEASE rows")
            except sqlite3.IntegrityError:
                # The same message stored a second time: its deliveries go on after
                # those already filed under its queue id.
                db.execute("ROLLBACK TO rows")
                db.execute("RELEASE rows")
                rows = _renumbered(db, rows)
                insert(db, rows)
            db.executemany(
                "INSERT INTO history (delivery_id, at, event) VALUES (?, ?, ?)",
                [(d.id, now, f"accepted by route {d.route}") for d in rows],
            )
            if state:
                db.executemany(
                    "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", state.items()
                )
            return rows

        return await self._submit(store)

    async def get_state(self, key: str) -> str | None:
        def query(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._submit(query, write=False)

    async def set_state(self, key: str, value: str) -> None:
        def change(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

        await self._submit(change)

    async def due(
        self, destination: str, now: float, limit: int, exclude: frozenset[str]
    ) -> list[Delivery]:
        def query(db: sqlite3.Connection) -> list[Delivery]:
            cur = db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE destination = ? AND state = ?"
                " AND next_try <= ? ORDER BY next_try LIMIT ?",
                (destination, QUEUED, now, limit + len(exclude)),
            )
            # The excluded ones (being tried now) are skipped before they are decoded.
            rows = [row for row in cur.fetchall() if row[0] not in exclude]
            return [_row(row) for row in rows[:limit]]

        return await self._submit(query, write=False)

    async def load(self, delivery: Delivery) -> Message:
        def query(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT data FROM messages WHERE id = ?", (delivery.message_id,)
            ).fetchone()
            return None if row is None else bytes(row[0])

        data = await self._submit(query, write=False)
        if data is None:
            raise SpoolError(f"message {delivery.message_id} of delivery {delivery.id} is missing")
        try:
            message = decode_message(data)
        except NotStored as exc:
            raise SpoolError(str(exc)) from None
        if isinstance(message, MailMessage):
            message = message.with_recipients(delivery.recipients)
        elif isinstance(message, FileMessage):
            content = self.files / delivery.message_id
            if not content.exists():
                raise SpoolError(f"the content of file {message.name} ({content}) is missing")
            message = message.evolve(path=str(content))
        return message

    def stored_form(self, message: Message, message_id: str) -> Message:
        if isinstance(message, FileMessage):
            return message.evolve(path=str(self.files / message_id))  # as load() gives it
        return message

    async def delivered(self, delivery: Delivery, note: str, forget_before: float | None) -> None:
        now = self.clock()

        def change(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM deliveries WHERE id = ?", (delivery.id,))
            db.execute("DELETE FROM history WHERE delivery_id = ?", (delivery.id,))
            gone = _forget_unused_message(db, delivery.message_id)
            if delivery.msgid and forget_before is not None:
                db.execute(
                    "INSERT OR REPLACE INTO delivered (destination, msgid, at) VALUES (?, ?, ?)",
                    (delivery.destination, delivery.msgid, now),
                )
                db.execute("DELETE FROM delivered WHERE at < ?", (forget_before,))
            return gone

        if await self._submit(change):
            self._remove_content(delivery.message_id)

    async def defer(
        self, delivery: Delivery, next_try: float, error: str, recipients: tuple[str, ...]
    ) -> None:
        now = self.clock()

        def change(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_try = ?, last_error = ?,"
                " recipients = ? WHERE id = ? AND state = ?",
                (next_try, error, json.dumps(recipients), delivery.id, QUEUED),
            )
            db.execute(
                "INSERT INTO history (delivery_id, at, event) VALUES (?, ?, ?)",
                (delivery.id, now, f"deferred: {error}"),
            )

        await self._submit(change)

    async def kill(self, delivery: Delivery, error: str, bounced: bool = False) -> None:
        now = self.clock()

        def change(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, state = ?,"
                " bounced = bounced OR ? WHERE id = ?",
                (error, DEAD, bounced, delivery.id),
            )
            db.execute(
                "INSERT INTO history (delivery_id, at, event) VALUES (?, ?, ?)",
                (delivery.id, now, f"dead letter: {error}"),
            )

        await self._submit(change)

    async def seen(self, destination: str, msgid: str, since: float) -> bool:
        def query(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM delivered WHERE destination = ? AND msgid = ? AND at >= ?",
                (destination, msgid, since),
            ).fetchone()
            return row is not None

        return await self._submit(query, write=False)

    async def entries(self, state: str) -> list[Delivery]:
        def query(db: sqlite3.Connection) -> list[Delivery]:
            cur = db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE state = ? ORDER BY created", (state,)
            )
            return list(map(_row, cur.fetchall()))

        return await self._submit(query, write=False)

    async def entry(self, delivery_id: str) -> Delivery | None:
        def query(db: sqlite3.Connection) -> Delivery | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()
            return None if row is None else _row(row)

        return await self._submit(query, write=False)

    async def find(self, key: str) -> list[Delivery]:
        bare = key.strip()
        msgid = bare if bare.startswith("<") else f"<{bare}>"

        def query(db: sqlite3.Connection) -> list[Delivery]:
            for where, value in (("id", bare), ("queue_id", bare), ("msgid", msgid)):
                cur = db.execute(
                    f"SELECT {_COLUMNS} FROM deliveries WHERE {where} = ? ORDER BY created, id",
                    (value,),
                )
                found = list(map(_row, cur.fetchall()))
                if found:
                    return found
            return []

        return await self._submit(query, write=False)

    async def history(self, delivery_id: str) -> list[tuple[float, str]]:
        def query(db: sqlite3.Connection) -> list[tuple[float, str]]:
            cur = db.execute(
                "SELECT at, event FROM history WHERE delivery_id = ? ORDER BY at, rowid",
                (delivery_id,),
            )
            return [(float(a), str(e)) for a, e in cur.fetchall()]

        return await self._submit(query, write=False)

    async def retry(
        self, delivery_ids: Sequence[str] | None, by: str = "'gateway queue retry'"
    ) -> int:
        now = self.clock()
        # A dead letter brought back starts a new schedule: its tries count from zero
        # and max_age from now.  A queued delivery only becomes due now.
        revive = (
            "UPDATE deliveries SET attempts = 0, revived = ?, next_try = ?, state = ?"
            " WHERE state = ?"
        )
        hurry = "UPDATE deliveries SET next_try = ? WHERE state = ?"
        note = (
            "INSERT INTO history (delivery_id, at, event) SELECT id, ?, ? FROM deliveries"
            " WHERE state = ?"
        )
        event = f"revived from the dead letters by {by}"

        def change(db: sqlite3.Connection) -> int:
            # The queued ones first: those revived next must not be counted twice.
            if delivery_ids is None:
                count = db.execute(hurry, (now, QUEUED)).rowcount
                db.execute(note, (now, event, DEAD))
                return int(count) + int(db.execute(revive, (now, now, QUEUED, DEAD)).rowcount)
            count = 0
            for i in delivery_ids:
                count += db.execute(hurry + " AND id = ?", (now, QUEUED, i)).rowcount
                db.execute(note + " AND id = ?", (now, event, DEAD, i))
                count += db.execute(revive + " AND id = ?", (now, now, QUEUED, DEAD, i)).rowcount
            return count

        return await self._submit(change)

    async def drop(self, delivery_id: str) -> bool:
        def change(db: sqlite3.Connection) -> tuple[bool, str]:
            row = db.execute(
                "SELECT message_id FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()
            if row is None:
                return False, ""
            db.execute("DELETE FROM deliveries WHERE id = ?", (delivery_id,))
            db.execute("DELETE FROM history WHERE delivery_id = ?", (delivery_id,))
            return True, row[0] if _forget_unused_message(db, row[0]) else ""

        dropped, unused = await self._submit(change)
        if unused:
            self._remove_content(unused)
        return dropped

    # --- upload contents ---

    def upload(self) -> IncomingFile:
        """A new file in incoming/ for an upload to be written into as it arrives; it
        refuses to grow into the space kept free for recording deliveries."""
        if self.reserve and self._free_space() < self.reserve:
            raise OSError(errno.ENOSPC, "the spool's disk is full (its reserve is kept free)")
        self.incoming.mkdir(exist_ok=True, mode=0o700)  # made with the first upload
        return IncomingFile(self.incoming, lambda: self._free_space() >= self.reserve)

    def _move_in(self, moves: list[tuple[Path, Path]]) -> None:
        """On the writer thread, in the transaction that stores them: each upload's content
        into files/, the folder flushed before the commit acknowledges them."""
        done: list[tuple[Path, Path]] = []
        try:
            self.files.mkdir(exist_ok=True, mode=0o700)
            moved: dict[Path, Path] = {}
            for source, target in moves:
                if source in moved:  # the same upload routed twice: one content, two names
                    os.link(moved[source], target)
                    done.append((target, target))
                    continue
                os.rename(source, target)
                moved[source] = target
                done.append((source, target))
            fsync_folder(self.files)
        except OSError as exc:
            for source, target in reversed(done):  # put back: the transaction is rolled back
                with contextlib.suppress(OSError):
                    if source == target:
                        os.unlink(target)  # a second name
                    else:
                        os.rename(target, source)
            raise SpoolError(f"cannot store an upload in {self.files}: {exc}") from None

    def _remove_content(self, message_id: str) -> None:
        """After the commit that forgot a message: its upload content, if it had one."""
        with contextlib.suppress(OSError):
            (self.files / message_id).unlink(missing_ok=True)

    def _sweep_contents(self, db: sqlite3.Connection) -> None:
        """At open: uploads that never finished (never acknowledged) and contents of
        messages no longer in the database (a crash between the commit and the unlink)."""
        for leftover in self.incoming.iterdir() if self.incoming.is_dir() else ():
            with contextlib.suppress(OSError):
                leftover.unlink()
        for content in self.files.iterdir() if self.files.is_dir() else ():
            known = db.execute("SELECT 1 FROM messages WHERE id = ?", (content.name,)).fetchone()
            if known is None:
                with contextlib.suppress(OSError):
                    content.unlink()

    async def stats(self) -> Stats:
        def query(db: sqlite3.Connection) -> Stats:
            queued, oldest = db.execute(
                "SELECT COUNT(*), MIN(created) FROM deliveries WHERE state = ?", (QUEUED,)
            ).fetchone()
            (dead,) = db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE state = ?", (DEAD,)
            ).fetchone()
            return Stats(int(queued), int(dead), oldest)

        return await self._submit(query, write=False)


def _renumbered(db: sqlite3.Connection, rows: list[Delivery]) -> list[Delivery]:
    """``rows`` with delivery numbers after the highest already filed under their queue id."""
    taken: dict[str, int] = {}
    out = []
    for d in rows:
        if d.queue_id not in taken:
            ids = db.execute("SELECT id FROM deliveries WHERE queue_id = ?", (d.queue_id,))
            numbers = [int(i.rpartition(".")[2]) for (i,) in ids if i.rpartition(".")[2].isdigit()]
            taken[d.queue_id] = max(numbers, default=0)
        taken[d.queue_id] += 1
        out.append(dataclasses.replace(d, id=f"{d.queue_id}.{taken[d.queue_id]}"))
    return out


def _forget_unused_message(db: sqlite3.Connection, message_id: str) -> bool:
    """Delete the message when no delivery needs it any more; whether it was."""
    gone = db.execute(
        "DELETE FROM messages WHERE id = ? AND NOT EXISTS"
        " (SELECT 1 FROM deliveries WHERE message_id = ?)",
        (message_id, message_id),
    ).rowcount
    return bool(gone)


class IncomingFile:
    """An upload being written into the spool's incoming folder.

    ``write`` hands each piece to the operating system as it arrives (an error
    such as a full disk is raised at once); ``finish`` flushes it to disk, after
    which put() may store it; ``discard`` removes it (a broken-off upload).
    """

    CHECK_EVERY = 1024 * 1024  # bytes written between two looks at the free space

    def __init__(self, folder: Path, room: Callable[[], bool] = lambda: True) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix="upload-")
        self.path = name
        self.size = 0
        self._fd: int | None = fd
        self._room = room
        self._unchecked = 0

    def write(self, data: bytes) -> None:
        assert self._fd is not None, "the upload is finished"
        self._unchecked += len(data)
        if self._unchecked >= self.CHECK_EVERY:
            self._unchecked = 0
            if not self._room():
                raise OSError(errno.ENOSPC, "the spool's disk is full (its reserve is kept free)")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)

    def finish(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)


async def _join(reactor: Any, thread: threading.Thread) -> None:
    from twisted.internet import threads

    await threads.deferToThreadPool(reactor, reactor.getThreadPool(), thread.join, 30)
