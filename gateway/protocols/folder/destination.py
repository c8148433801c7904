"""A local folder: files served from it by name (TFTP reads), and uploads delivered into it.

A name is taken relative to the folder whatever it starts with (PXE clients
often ask for ``/pxelinux.0``; backslashes count as slashes), and it must
stay inside the folder: ``..`` that climbs out, or a symbolic link that leads
out, is refused, as tftpd-hpa refuses with ``-s``.  Reads are plain reads of a
local file (as tftpd does): one block at a time, on the event loop.

With ``uploads: true``, an upload is copied from the spool into a hidden temporary file beside its
final name, flushed to disk, and then linked into place, so that a reader
never sees half a file; an existing file is kept (the delivery fails for
good, naming it) unless ``overwrite: true``.  The copy runs in the thread pool.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet import threads
from twisted.internet.defer import DeferredLock

from gateway.disk import fsync_folder
from gateway.message import FileMessage, Kind, Message
from gateway.ports import (
    FileInfo,
    FileProblem,
    FileReader,
    FileSink,
    FileSource,
    Outcome,
    tidy_name,
)
from gateway.protocols.folder.config import FolderDestinationConfig


class _LocalFile(FileReader):
    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size

    async def read(self, n: int) -> bytes:
        return self.read_now(n)

    def read_now(self, n: int) -> bytes:
        try:
            return self.handle.read(n)
        except OSError as exc:
            raise FileProblem("unavailable", f"reading failed: {exc.strerror or exc}") from None

    def close(self) -> None:
        self.handle.close()


def inside(root: Path, name: str) -> Path:
    """The existing file ``name`` below ``root`` ("" or "/": the root itself); FileProblem
    if it leads elsewhere or is not there."""
    path = root / tidy_name(name) if name.strip("/\\") else root
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise FileProblem("not-found", f"no file '{name}'") from None
    except OSError as exc:
        raise FileProblem("denied", f"'{name}': {exc.strerror or exc}") from None
    if not real.is_relative_to(root.resolve()):
        raise FileProblem("denied", f"'{name}' leads out of the folder (a link)")
    return real


class Exists(Exception):
    """The name is taken and the destination may not overwrite it."""


def store_file(root: Path, name: str, source: str, overwrite: bool, append: bool = False) -> Path:
    """Copy ``source`` to ``name`` below ``root`` (folders made as needed), durably; with
    ``append``, the file of that name (if any) followed by ``source`` replaces it at once."""
    target = root / tidy_name(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.parent.resolve().is_relative_to(root.resolve()):
        raise FileProblem("denied", f"'{name}' leads out of the folder (a link)")
    temporary = target.parent / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.part"
    try:
        with open(source, "rb") as src, open(temporary, "xb") as dst:
            if append:
                try:
                    with open(target, "rb") as old:
                        shutil.copyfileobj(old, dst, 1024 * 1024)
                except FileNotFoundError:
                    pass
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        if overwrite or append:
            os.replace(temporary, target)
        else:
            try:
                os.link(temporary, target)  # fails if the name is taken: nothing is lost
            except FileExistsError:
                raise Exists(str(target)) from None
        fsync_folder(target.parent)
    finally:
        temporary.unlink(missing_ok=True)
    return target


class FolderDestination(FileSink, FileSource):
    def __init__(self, config: FolderDestinationConfig, reactor: Any) -> None:
        self.config = config
        self.name = config.name
        self.kinds = frozenset({Kind.FILE})
        self.root = Path(config.path)
        self.reactor = reactor
        self.takes_uploads = config.uploads
        self.appends = True
        self._locks: dict[str, DeferredLock] = {}  # by name, while a delivery writes it

    async def fetch(self, name: str) -> FileReader:
        path = inside(self.root, name)
        if not path.is_file():
            raise FileProblem("not-found", f"'{name}' is not a file")
        try:
            handle = open(path, "rb")  # noqa: SIM115 (the reader closes it)
            size = os.fstat(handle.fileno()).st_size
        except PermissionError:
            raise FileProblem("denied", f"'{name}' is not readable") from None
        except OSError as exc:
            raise FileProblem("unavailable", f"'{name}': {exc.strerror or exc}") from None
        return _LocalFile(handle, size)

    async def info(self, name: str) -> FileInfo:
        path = inside(self.root, name)
        try:
            stat = path.stat()
        except OSError as exc:
            raise FileProblem("denied", f"'{name}': {exc.strerror or exc}") from None
        folder = path.is_dir()
        return FileInfo(path.name, None if folder else stat.st_size, stat.st_mtime, folder)

    async def listing(self, name: str) -> list[FileInfo]:
        path = inside(self.root, name)
        if not path.is_dir():
            return [await self.info(name)]
        root = self.root.resolve()
        entries: list[FileInfo] = []
        try:
            with os.scandir(path) as found:
                for entry in found:
                    if entry.name.startswith(".") and entry.name.endswith(".part"):
                        continue  # an upload being written
                    try:
                        real = Path(entry.path).resolve(strict=True)
                        stat = real.stat()
                    except OSError:
                        continue  # a dangling link
                    if not real.is_relative_to(root):
                        continue  # leads out of the folder: not served, not shown
                    folder = real.is_dir()
                    size = None if folder else stat.st_size
                    entries.append(FileInfo(entry.name, size, stat.st_mtime, folder))
        except OSError as exc:
            raise FileProblem("denied", f"'{name}': {exc.strerror or exc}") from None
        return sorted(entries, key=lambda e: e.name)

    async def deliver(self, message: Message) -> Outcome:
        if not isinstance(message, FileMessage) or not message.path:
            return Outcome.permanent(f"a folder takes uploaded files, not {message.kind}")
        if not self.takes_uploads:
            return Outcome.permanent(f"folder {self.root} is read-only (uploads: false)")
        overwrite = self.config.overwrite
        # Writes of one name go one at a time: two appends at once would each start from
        # the old file, and the second rename would lose the first one's part.
        lock = self._locks.setdefault(message.name, DeferredLock())
        await lock.acquire()
        try:
            target = await threads.deferToThreadPool(
                self.reactor,
                self.reactor.getThreadPool(),
                store_file,
                self.root,
                message.name,
                message.path,
                overwrite,
                message.append,
            )
        except Exists as exc:
            return Outcome.permanent(f"{exc} exists already (set overwrite: true to replace it)")
        except FileProblem as exc:
            return Outcome.permanent(exc.detail)
        except OSError as exc:
            # A full disk, a quota or permissions may be fixed: try again later.
            reason = errno.errorcode.get(exc.errno or 0, "error")
            return Outcome.temporary(
                f"cannot write into {self.root}: {exc.strerror or exc} ({reason})"
            )
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(message.name, None)
        return Outcome.delivered(f"saved as {target}")

    async def close(self) -> None:
        return None
