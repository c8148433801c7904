"""Files served from a local folder, by the name a client asks for.

A name is taken relative to the folder whatever it starts with (PXE clients
often ask for ``/pxelinux.0``; backslashes count as slashes), and it must
stay inside the folder: ``..`` that climbs out, or a symbolic link that leads
out, is refused, as tftpd-hpa refuses with ``-s``.  Reads are plain reads of a
local file (as tftpd does): one block at a time, on the event loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

from gateway.message import Kind
from gateway.ports import FileProblem, FileReader, FileSource
from gateway.protocols.folder.config import FolderDestinationConfig


class _LocalFile(FileReader):
    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size

    async def read(self, n: int) -> bytes:
        try:
            return self.handle.read(n)
        except OSError as exc:
            raise FileProblem("unavailable", f"reading failed: {exc.strerror or exc}") from None

    def close(self) -> None:
        self.handle.close()


def inside(root: Path, name: str) -> Path:
    """The path of ``name`` below ``root``; FileProblem("denied") if it leads elsewhere."""
    parts: list[str] = []
    for part in name.replace("\\", "/").split("/"):
        if part == "..":
            if not parts:
                raise FileProblem("denied", f"'{name}' leads out of the folder")
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    if not parts:
        raise FileProblem("not-found", f"'{name}' names no file")
    path = root.joinpath(*parts)
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise FileProblem("not-found", f"no file '{name}'") from None
    except OSError as exc:
        raise FileProblem("denied", f"'{name}': {exc.strerror or exc}") from None
    if not real.is_relative_to(root.resolve()):
        raise FileProblem("denied", f"'{name}' leads out of the folder (a link)")
    return real


class FolderDestination(FileSource):
    def __init__(self, config: FolderDestinationConfig, reactor: Any) -> None:
        self.config = config
        self.name = config.name
        self.kinds = frozenset({Kind.FILE})
        self.root = Path(config.path)

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

    async def close(self) -> None:
        return None
