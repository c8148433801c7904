"""A file read from a network connection as it arrives: what the file sources that fetch
over the network (HTTP, FTP) share.

The pieces are kept as they arrived (no copying into one buffer); a read takes
whole pieces, cutting one only when it asks for less.  Reading from the
connection pauses once ``AHEAD`` bytes wait for the client and resumes below
half of that, so a file of any size costs the same memory.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred

from gateway.ports import FileProblem, FileReader

AHEAD = 256 * 1024  # bytes read from the server beyond what the client has taken


class StreamedFile(FileReader):
    """Fed by ``arrived`` and ``ended``; ``pause``, ``resume`` and ``stop`` act on the
    connection (a subclass says how)."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.pieces: deque[bytes] = deque()
        self.held = 0  # bytes in pieces
        self.done = False
        self.problem: FileProblem | None = None
        self.paused = False
        self.waiting: Deferred[None] | None = None
        self.wanted = 0

    # --- what the connection's side does ---

    def pause(self) -> None:
        """Stop reading from the connection."""

    def resume(self) -> None:
        """Read from the connection again."""

    def stop(self) -> None:
        """The reader is closed before the end: give the transfer up."""

    def arrived(self, data: bytes) -> None:
        self.pieces.append(data)
        self.held += len(data)
        if self.held > AHEAD and not self.paused:
            self.paused = True
            self.pause()
        if self.held >= self.wanted:
            self._wake()

    def ended(self, problem: FileProblem | None) -> None:
        """The end of the file; ``problem`` when it broke off."""
        self.done = True
        self.problem = problem
        self._wake()

    def _wake(self) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback(None)

    # --- FileReader ---

    async def read(self, n: int) -> bytes:
        while self.held < n and not self.done:
            self.wanted = n
            self.waiting = Deferred()
            await self.waiting
        if self.problem is not None and self.held < n:
            raise self.problem
        return self._take(n)

    def read_now(self, n: int) -> bytes | None:
        """What has arrived, up to ``n`` bytes (None when nothing has, yet)."""
        if not self.held:
            if not self.done:
                return None
            if self.problem is not None:
                raise self.problem
            return b""
        return self._take(n)

    def _take(self, n: int) -> bytes:
        taken: list[bytes] = []
        want = n
        while want > 0 and self.pieces:
            piece = self.pieces.popleft()
            if len(piece) > want:
                self.pieces.appendleft(piece[want:])
                piece = piece[:want]
            taken.append(piece)
            want -= len(piece)
        chunk = taken[0] if len(taken) == 1 else b"".join(taken)
        self.held -= len(chunk)
        if self.paused and self.held < AHEAD // 2:
            self.paused = False
            self.resume()
        return chunk

    def close(self) -> None:
        if not self.done:
            self.stop()
        self.done = True
