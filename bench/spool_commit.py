"""How fast can the spool make messages durable? SQLite group commit against files.

Runs, in one process and on the same disk (a temporary folder, or --dir):

* files: what a file-per-message queue does (Postfix's queue, a Maildir): write
  the message to its own file, fsync it, rename it into place, fsync the folder.
  ``--writers`` threads do this at once, so the disk sees as many flushes in
  parallel as it can take.
* sqlite: the gateway's spool (gateway.spool.SqliteSpool): ``--writers``
  concurrent put() calls at a time through its writer thread, which commits
  whatever queued up during the previous flush in one transaction.

Reports messages made durable per second and, for SQLite, messages per commit.

    python bench/spool_commit.py [--messages 5000] [--size 4096] [--writers 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, task

from gateway.message import MailMessage
from gateway.spool import SqliteSpool, Stored


def files(folder: Path, messages: int, size: int, writers: int) -> float:
    tmp, new = folder / "tmp", folder / "new"
    tmp.mkdir(parents=True)
    new.mkdir()
    body = os.urandom(size)
    counter = iter(range(messages))
    lock = threading.Lock()

    def write_one(_: int) -> None:
        with lock:
            n = next(counter)
        path = tmp / f"m{n}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(path, new / f"m{n}")
        dirfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    started = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write_one, range(messages)))
    return messages / (time.perf_counter() - started)


def sqlite(folder: Path, messages: int, size: int, writers: int) -> tuple[float, float]:
    result: dict[str, float] = {}

    async def run(reactor: object) -> None:
        spool = SqliteSpool(folder, reactor)
        await spool.open()
        body = b"x" * size
        sem = defer.DeferredSemaphore(writers)

        def one(n: int) -> defer.Deferred[object]:
            msg = MailMessage.from_bytes(
                b"Subject: bench\nMessage-ID: <%d@bench>\n\n" % n + body,
                sender="a@b.test",
                recipients=["x@relay.test"],
            )
            return sem.run(
                lambda: defer.Deferred.fromCoroutine(spool.put([Stored(msg, "r", ("d",))]))
            )

        started = time.perf_counter()
        await defer.gatherResults([one(n) for n in range(messages)])
        result["rate"] = messages / (time.perf_counter() - started)
        result["per_commit"] = spool.writes / max(1, spool.commits)
        await spool.close()
        print(
            f"sqlite (WAL, synchronous=FULL, group commit): {result['rate']:8.0f} messages/s,"
            f" {result['per_commit']:.1f} messages per commit",
            flush=True,
        )

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))  # type: ignore[arg-type]
    return result["rate"], result["per_commit"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--writers", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=None, help="folder on the disk to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        file_rate = files(Path(scratch) / "files", args.messages, args.size, args.writers)
        print(
            f"files (write, fsync, rename, fsync folder): {file_rate:8.0f} messages/s", flush=True
        )
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        try:
            sqlite(Path(scratch) / "spool", args.messages, args.size, args.writers)
        except SystemExit:
            pass


if __name__ == "__main__":
    main()
