"""Where a message's content goes while it arrives: memory for small ones, a file for the rest.

A server codec writes the content of a message (SMTP DATA, an NNTP article)
into a sink as it decodes it, and asks for all of it once the end-of-data line
came.  ``SpillingSink`` keeps the first ``memory`` octets in memory and moves
to an unlinked temporary file beyond that, so a connection holds a bounded
amount of memory however large its message, and a client that sends most of a
large message and hangs up leaves nothing behind: ``close`` drops the parts
and the file.  ``MemorySink`` keeps everything in memory (codec tests).
"""

from __future__ import annotations

import tempfile
from typing import IO, Protocol

__all__ = ["DataSink", "MemorySink", "SpillingSink"]


class DataSink(Protocol):
    def write(self, data: bytes) -> None:
        """Add content; never raises (a failure is kept in ``error``)."""

    def getvalue(self) -> bytes:
        """Everything written so far."""

    def close(self) -> None:
        """Drop the content; the sink is not used again."""

    @property
    def error(self) -> str | None:
        """Why the content could not be kept (a full disk), or None."""


class MemorySink:
    """Every part in memory."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)

    def close(self) -> None:
        self._parts = []

    @property
    def error(self) -> str | None:
        return None


class SpillingSink:
    """The first ``memory`` octets in memory, the rest in an unlinked file in ``directory``."""

    __slots__ = ("_directory", "_error", "_file", "_memory", "_parts", "_size")

    def __init__(self, memory: int = 256 * 1024, directory: str | None = None) -> None:
        self._memory = memory
        self._directory = directory
        self._parts: list[bytes] = []
        self._size = 0
        self._file: IO[bytes] | None = None
        self._error: str | None = None

    @property
    def spilled(self) -> bool:
        """Whether the content went to a file."""
        return self._file is not None

    @property
    def error(self) -> str | None:
        return self._error

    def write(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            if self._file is not None:
                self._file.write(data)
                return
            self._parts.append(data)
            self._size += len(data)
            if self._size > self._memory:
                # Kept open across writes; close() closes it (and it is unlinked already).
                self._file = tempfile.TemporaryFile(  # noqa: SIM115
                    prefix="gateway-data-", dir=self._directory
                )
                self._file.write(b"".join(self._parts))
                self._parts = []
        except OSError as exc:
            self._fail(exc)

    def getvalue(self) -> bytes:
        if self._file is None:
            return b"".join(self._parts)
        try:
            self._file.seek(0)
            return self._file.read()
        except OSError as exc:
            self._fail(exc)
            return b""

    def close(self) -> None:
        self._parts = []
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass  # the file is unlinked already: closing frees it whatever happens

    def _fail(self, exc: OSError) -> None:
        self._error = f"cannot keep the message's content: {exc.strerror or exc}"
        self.close()
