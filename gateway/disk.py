"""Making file changes durable, for the spool and the destinations that write files."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_folder(folder: str | Path) -> None:
    """Flush ``folder`` itself to disk, so that names just created or renamed in it stay
    after a crash (the files' own contents are flushed apart)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
