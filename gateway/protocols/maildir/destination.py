"""Maildir delivery: write into tmp/, fsync, rename into new/, fsync the folder.

Following the Maildir convention, a message is visible to readers only once
it is complete and on disk.  The disk work runs in the reactor's thread pool
so a slow disk does not stall the event loop.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from pathlib import Path

from twisted.internet import threads
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.logger import Logger

from gateway.disk import fsync_folder
from gateway.message import Article, Kind, MailMessage, Message
from gateway.ports import Deliverer, Outcome
from gateway.protocols.maildir.config import MaildirDestinationConfig

log = Logger(namespace="gateway.maildir")

_counter = itertools.count(1)


def _host_part() -> str:
    # '/' and ':' are not allowed in Maildir names; the convention escapes them.
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def _envelope_lines(message: Message) -> bytes:
    if isinstance(message, MailMessage):
        lines = [f"Return-Path: <{message.sender}>"]
        lines += [f"Delivered-To: {rcpt}" for rcpt in message.recipients]
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    return b""


def write_maildir(root: Path, data: bytes) -> Path:
    """Deliver ``data`` into the Maildir at ``root`` and return the new file's path."""
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    now = time.time()
    seconds = int(now)
    unique = f"M{int((now - seconds) * 1_000_000)}P{os.getpid()}Q{next(_counter)}"
    name = f"{seconds}.{unique}.{_host_part()}"
    tmp = root / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    final = root / "new" / name
    try:
        os.rename(tmp, final)
        fsync_folder(root / "new")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


class MaildirDestination(Deliverer):
    kinds = frozenset({Kind.MAIL, Kind.ARTICLE})

    def __init__(self, config: MaildirDestinationConfig, reactor: IReactorCore) -> None:
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.root = Path(config.path)

    async def deliver(self, message: Message) -> Outcome:
        if not isinstance(message, (MailMessage, Article)):
            return Outcome.permanent(f"a Maildir takes mail and articles, not {message.kind}")
        data = _envelope_lines(message) + message.to_bytes()
        reactor = self.reactor
        try:
            if IReactorThreads.providedBy(reactor):
                path = await threads.deferToThreadPool(
                    reactor, reactor.getThreadPool(), write_maildir, self.root, data
                )
            else:
                path = write_maildir(self.root, data)
        except OSError as exc:
            # A full disk, a quota or a permission problem may be fixed by the
            # operator, so the sender should try again rather than bounce.
            reason = errno.errorcode.get(exc.errno or 0, "error")
            return Outcome.temporary(
                f"cannot write to Maildir {self.root}: {exc.strerror or exc} ({reason})"
            )
        return Outcome.delivered(f"saved as {path.name}")

    async def close(self) -> None:
        return None
