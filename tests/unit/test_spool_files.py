"""Uploads in the spool: their content is a file of its own, moved into files/ in the
transaction that stores the message, read back from there, and removed with the message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.message import FileMessage
from gateway.ports import FileProblem
from gateway.protocols.folder.destination import Exists, store_file
from gateway.spool import SpoolError, SqliteSpool, Stored
from tests.support.deferreds import run


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[SqliteSpool]:
    s = SqliteSpool(tmp_path / "spool", reserve=0)
    run(s.open())
    yield s
    run(s.close())


def _upload(spool: SqliteSpool, data: bytes, name: str = "sw1.cfg") -> FileMessage:
    upload = spool.upload()
    for i in range(0, len(data), 512):
        upload.write(data[i : i + 512])
    upload.finish()
    assert Path(upload.path).parent == spool.incoming
    return FileMessage(name=name, size=upload.size, path=upload.path, listener="boot")


def test_an_upload_is_moved_into_the_spool_and_read_back_from_there(spool: SqliteSpool) -> None:
    data = b"hostname sw1\n" * 1000
    message = _upload(spool, data)
    [first, second] = run(spool.put([Stored(message, "uploads", ("inbox", "backup"))]))
    assert not Path(message.path).exists()  # no longer in incoming/
    loaded = run(spool.load(first))
    assert isinstance(loaded, FileMessage)
    assert (loaded.name, loaded.size, loaded.listener) == ("sw1.cfg", len(data), "boot")
    assert Path(loaded.path).parent == spool.files
    assert Path(loaded.path).read_bytes() == data
    # The content stays while a delivery needs it, and goes with the last one.
    run(spool.delivered(first, "saved", None))
    assert Path(loaded.path).exists()
    run(spool.delivered(second, "saved", None))
    assert not Path(loaded.path).exists()


def test_a_dropped_upload_takes_its_content_along(spool: SqliteSpool) -> None:
    [delivery] = run(spool.put([Stored(_upload(spool, b"x" * 10), "r", ("inbox",))]))
    path = run(spool.load(delivery)).path  # type: ignore[attr-defined]
    assert run(spool.drop(delivery.id))
    assert not Path(path).exists()


def test_an_upload_whose_content_is_gone_is_not_stored(spool: SqliteSpool) -> None:
    message = _upload(spool, b"x")
    Path(message.path).unlink()
    with pytest.raises(SpoolError, match="cannot store an upload"):
        run(spool.put([Stored(message, "r", ("inbox",))]))
    assert run(spool.stats()).queued == 0
    with pytest.raises(SpoolError, match="no content"):
        run(spool.put([Stored(FileMessage(name="x"), "r", ("inbox",))]))


def test_a_missing_content_file_is_a_spool_error_at_load(spool: SqliteSpool) -> None:
    [delivery] = run(spool.put([Stored(_upload(spool, b"x"), "r", ("inbox",))]))
    (spool.files / delivery.message_id).unlink()
    with pytest.raises(SpoolError, match=r"content of file sw1\.cfg .* is missing"):
        run(spool.load(delivery))


def test_at_start_unfinished_uploads_and_orphaned_contents_are_swept(
    spool: SqliteSpool,
) -> None:
    half = spool.upload()
    half.write(b"half an upload, never acknowledged")
    [kept] = run(spool.put([Stored(_upload(spool, b"kept"), "r", ("inbox",))]))
    orphan = spool.files / "ORPHAN"
    orphan.write_bytes(b"from a crash between a commit and its unlink")
    assert spool._inline is not None
    spool._sweep_contents(spool._inline)
    assert list(spool.incoming.iterdir()) == []
    assert not orphan.exists()
    assert (spool.files / kept.message_id).read_bytes() == b"kept"


def test_an_upload_broken_off_leaves_nothing(spool: SqliteSpool) -> None:
    upload = spool.upload()
    upload.write(b"partial")
    upload.discard()
    assert list(spool.incoming.iterdir()) == []


def test_a_folder_gets_the_file_whole_and_keeps_what_is_there(tmp_path: Path) -> None:
    source = tmp_path / "content"
    source.write_bytes(b"new\n")
    root = tmp_path / "inbox"
    target = store_file(root, "/backups/sw1.cfg", str(source), overwrite=False)
    assert target == root / "backups" / "sw1.cfg" and target.read_bytes() == b"new\n"
    source.write_bytes(b"newer\n")
    with pytest.raises(Exists):
        store_file(root, "backups/sw1.cfg", str(source), overwrite=False)
    assert target.read_bytes() == b"new\n"
    store_file(root, "backups/sw1.cfg", str(source), overwrite=True)
    assert target.read_bytes() == b"newer\n"
    with pytest.raises(FileProblem, match="leads out of the folder"):
        store_file(root, "../escape.cfg", str(source), overwrite=True)
    assert sorted(p.name for p in (root / "backups").iterdir()) == ["sw1.cfg"]  # no .part left


def test_an_upload_does_not_eat_the_space_kept_for_recording_deliveries(tmp_path: Path) -> None:
    free = [10 * 1024 * 1024]
    s = SqliteSpool(tmp_path / "spool", reserve=5 * 1024 * 1024)
    s._free_space = lambda: free[0]  # type: ignore[method-assign]
    run(s.open())
    try:
        upload = s.upload()
        upload.write(b"x" * (2 * 1024 * 1024))
        free[0] = 4 * 1024 * 1024  # the disk fills up meanwhile
        with pytest.raises(OSError, match="reserve is kept free"):
            upload.write(b"x" * (1024 * 1024))
        upload.discard()
        with pytest.raises(OSError, match="reserve is kept free"):
            s.upload()
    finally:
        run(s.close())


def test_one_upload_routed_twice_is_stored_under_both_messages(spool: SqliteSpool) -> None:
    message = _upload(spool, b"twice")
    first, second = run(
        spool.put([Stored(message, "a", ("inbox",)), Stored(message, "b", ("backup",))])
    )
    assert first.message_id != second.message_id
    for delivery in (first, second):
        path = run(spool.load(delivery)).path  # type: ignore[attr-defined]
        assert Path(path).read_bytes() == b"twice"
    run(spool.delivered(first, "saved", None))
    assert Path(run(spool.load(second)).path).read_bytes() == b"twice"  # type: ignore[attr-defined]


def test_an_append_is_kept_in_the_spool_and_adds_to_the_folders_file(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    message = _upload(spool, b"second\n", "log/app.log")
    appended = FileMessage(name=message.name, size=message.size, path=message.path,
                           listener="drop", append=True)  # fmt: skip
    [delivery] = run(spool.put([Stored(appended, "uploads", ("inbox",))]))
    loaded = run(spool.load(delivery))
    assert isinstance(loaded, FileMessage) and loaded.append
    root = tmp_path / "inbox"
    (root / "log").mkdir(parents=True)
    (root / "log" / "app.log").write_bytes(b"first\n")
    # Appending never needs overwrite: nothing that was there is lost.
    store_file(root, loaded.name, loaded.path, overwrite=False, append=True)
    assert (root / "log" / "app.log").read_bytes() == b"first\nsecond\n"
    store_file(root, "log/new.log", loaded.path, overwrite=False, append=True)
    assert (root / "log" / "new.log").read_bytes() == b"second\n"
    assert sorted(p.name for p in (root / "log").iterdir()) == ["app.log", "new.log"]


class _HeldPool:
    """A thread pool that runs nothing until told: what a delivery hands it waits."""

    def __init__(self) -> None:
        self.waiting: list[tuple[object, object, tuple[object, ...]]] = []

    def callInThreadWithCallback(self, done: object, work: object, *args: object) -> None:
        self.waiting.append((done, work, args))

    def run_one(self) -> None:
        done, work, args = self.waiting.pop(0)
        done(True, work(*args))  # type: ignore[operator]


class _Reactor:
    def __init__(self) -> None:
        self.pool = _HeldPool()

    def getThreadPool(self) -> _HeldPool:
        return self.pool

    def callFromThread(self, call: object, *args: object) -> None:
        call(*args)  # type: ignore[operator]


def test_appends_to_one_name_are_written_one_at_a_time(tmp_path: Path) -> None:
    from twisted.internet.defer import ensureDeferred

    from gateway.protocols.folder.config import FolderDestinationConfig
    from gateway.protocols.folder.destination import FolderDestination

    root = tmp_path / "inbox"
    root.mkdir()
    (root / "app.log").write_bytes(b"0\n")
    reactor = _Reactor()
    folder = FolderDestination(
        FolderDestinationConfig(name="inbox", path=str(root), uploads=True),  # type: ignore[arg-type]
        reactor,
    )
    outcomes = []
    for n in (1, 2):
        part = tmp_path / f"part{n}"
        part.write_bytes(f"{n}\n".encode())
        message = FileMessage(name="app.log", size=2, path=str(part), listener="drop", append=True)
        ensureDeferred(folder.deliver(message)).addCallback(outcomes.append)
    # Both appends start from the old file only if both run at once: the second waits.
    assert len(reactor.pool.waiting) == 1
    reactor.pool.run_one()
    assert len(reactor.pool.waiting) == 1
    reactor.pool.run_one()
    assert [o.ok for o in outcomes] == [True, True]
    assert (root / "app.log").read_bytes() == b"0\n1\n2\n"
