"""The FTP destination: uploads sent to an FTP server.

Each delivery takes a logged-in connection (kept for the next one for a
minute, ``max_connections`` at most), makes the file's folders (MKD), checks
that its name is free unless ``overwrite`` (SIZE, else MDTM), sends it under
``.<name>.<id>.part`` over a passive data connection, and renames it into
place (RNFR/RNTO) once the server has answered 226.  With TLS (AUTH TLS) the
data connections are protected too (PROT P).

FTP has no way to ask the server to flush a file to its disk: the 226 is the
server's word that it has the file, and the gateway takes it.  Data
connections resume the control connection's TLS session (servers such as
vsftpd refuse them otherwise).
"""

from __future__ import annotations

import calendar
import posixpath
import time
from typing import Any

from twisted.internet import defer, ssl
from twisted.logger import Logger

from gateway.client_tls import UnverifiedTls, load_trust_root
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
from gateway.protocols.ftp.client import FtpFailure, FtpSession
from gateway.protocols.ftp.config import FtpDestinationConfig

log = Logger(namespace="gateway.ftp")

IDLE = 60.0  # seconds an unused connection is kept


class _Exists(Exception):
    pass


class FtpDestination(FileSink, FileSource):
    def __init__(self, config: FtpDestinationConfig, reactor: Any) -> None:
        self.config = config
        self.name = config.name
        self.kinds = frozenset({Kind.FILE})
        self.reactor = reactor
        self._tls = self._creator(config)
        self._idle: list[tuple[FtpSession, Any]] = []  # (session, its idle timer)
        self._slots = defer.DeferredSemaphore(config.max_connections)

    @staticmethod
    def _creator(config: FtpDestinationConfig) -> Any:
        if config.tls == "none":
            return None
        if not config.tls_verify:
            return UnverifiedTls(config.url.host)
        platform: Any = ssl.platformTrust  # untyped in Twisted
        trust: Any = load_trust_root(str(config.ca)) if config.ca is not None else platform()
        return ssl.optionsForClientTLS(config.url.host, trustRoot=trust)

    async def _session(self) -> FtpSession:
        while self._idle:
            session, timer = self._idle.pop()
            if timer.active():
                timer.cancel()
            if session.alive:
                return session
        config = self.config
        session = FtpSession(self.reactor, config.url.host, config.port, float(config.timeout))
        session.timeout = float(config.connect_timeout)
        try:
            await session.open(config.url.user, config.password, config.tls, self._tls, self._tls)
        except BaseException:
            session.close()
            raise
        session.timeout = float(config.timeout)
        return session

    def _release(self, session: FtpSession) -> None:
        if session.alive:
            timer = self.reactor.callLater(IDLE, self._expire, session)
            self._idle.append((session, timer))

    def _expire(self, session: FtpSession) -> None:
        self._idle = [(s, t) for s, t in self._idle if s is not session]
        session.close()

    async def deliver(self, message: Message) -> Outcome:
        if not isinstance(message, FileMessage) or not message.path:
            return Outcome.permanent(f"FTP takes uploaded files, not {message.kind}")
        if message.append:
            return Outcome.permanent(
                "FTP cannot add to the end of a file all at once (an upload by APPE):"
                " a retry could add a piece twice"
            )
        await self._slots.acquire()
        try:
            target = await self._put(message)
        except FileProblem as exc:
            return Outcome.permanent(exc.detail)
        except _Exists as exc:
            return Outcome.permanent(f"{exc} exists already (set overwrite: true to replace it)")
        except FtpFailure as exc:
            return Outcome.temporary(f"{self.config.url.host}:{self.config.port}: {exc}")
        except OSError as exc:
            return Outcome.temporary(f"cannot read the spooled file: {exc.strerror or exc}")
        finally:
            self._slots.release()
        return Outcome.delivered(f"saved as {target}")

    async def _put(self, message: FileMessage) -> str:
        name = tidy_name(message.name)
        folder = self.config.url.folder
        target = posixpath.join(folder, name) if folder else name
        parent, leaf = posixpath.split(target)
        temporary = posixpath.join(parent, f".{leaf}.{message.id}.part")
        session = await self._session()
        renamed = False
        try:
            if parent:
                await session.make_folders(parent)
            if not self.config.overwrite and await session.exists(target):
                raise _Exists(target)
            await session.store(temporary, message.path)
            if not self.config.overwrite and await session.exists(target):
                raise _Exists(target)  # arrived meanwhile: RNTO would replace it
            await session.rename(temporary, target)
            renamed = True
        except _Exists:
            await session.delete(temporary)
            self._release(session)
            raise
        except BaseException:
            # The conversation may be out of step (a reply not read): not used again.
            session.close()
            raise
        finally:
            if renamed:
                self._release(session)
        return target

    # --- reads: downloads, listings and look-ups (FTP and TFTP listeners) ---

    def _path(self, name: str) -> str:
        folder = self.config.url.folder
        relative = tidy_name(name) if name.strip("/\\") else ""
        if not relative:
            return folder or "/"
        return posixpath.join(folder, relative) if folder else relative

    async def _reading(self) -> FtpSession:
        await self._slots.acquire()
        try:
            return await self._session()
        except FtpFailure as exc:
            self._slots.release()
            raise FileProblem("unavailable", f"{self.config.url.host}: {exc}") from None
        except BaseException:
            self._slots.release()
            raise

    def _done_reading(self, session: FtpSession, ok: bool) -> None:
        self._slots.release()
        if ok:
            self._release(session)
        else:
            session.close()

    async def fetch(self, name: str) -> FileReader:
        path = self._path(name)
        session = await self._reading()
        try:
            size = None
            reply = await session.command(f"SIZE {path}")
            if reply.code == 213 and reply.text.strip().isdigit():
                size = int(reply.text.strip())
            download = await session.retrieve(f"RETR {path}", size)
        except FtpFailure as exc:
            self._done_reading(session, exc.reply is not None)
            raise _problem(name, exc) from None
        download.finished.addCallbacks(
            lambda _: self._done_reading(session, True),
            lambda _: self._done_reading(session, False),
        )
        return download

    async def info(self, name: str) -> FileInfo:
        path = self._path(name)
        leaf = posixpath.basename(path)
        session = await self._reading()
        ok = True
        try:
            if "MLST" in session.features:
                reply = await session.command(f"MLST {path}", 250)
                lines = reply.text.split("\n")
                facts = _facts(lines[1] if len(lines) > 2 else "")
                return _info(leaf, facts)
            reply = await session.command(f"SIZE {path}")
            if reply.code == 213 and reply.text.strip().isdigit():
                modified = None
                stamp = await session.command(f"MDTM {path}")
                if stamp.code == 213:
                    modified = _time(stamp.text.strip())
                return FileInfo(leaf, int(reply.text.strip()), modified)
            # Not a file: a folder if the server lets the session enter it.
            entered = await session.command(f"CWD {path}")
            if entered.code == 250:
                await session.command(f"CWD {session.home}")
                return FileInfo(leaf, None, None, True)
            raise FtpFailure(f"SIZE {path}", reply)
        except FtpFailure as exc:
            ok = exc.reply is not None
            raise _problem(name, exc) from None
        finally:
            self._done_reading(session, ok)

    async def listing(self, name: str) -> list[FileInfo]:
        path = self._path(name)
        session = await self._reading()
        try:
            machine = "MLST" in session.features
            download = await session.retrieve(f"{'MLSD' if machine else 'LIST'} {path}", None)
            text = b""
            while block := await download.read(64 * 1024):
                text += block
                if len(text) > LISTING_LIMIT:
                    download.close()
                    raise FileProblem("unavailable", f"the listing of {path} is too long")
            await download.finished
        except FtpFailure as exc:
            self._done_reading(session, exc.reply is not None)
            raise _problem(name, exc) from None
        except BaseException:
            self._done_reading(session, False)
            raise
        self._done_reading(session, True)
        lines = text.decode("utf-8", "replace").splitlines()
        found = [_mlsd_entry(line) if machine else _list_entry(line) for line in lines]
        return sorted((e for e in found if e is not None), key=lambda e: e.name)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for session, timer in idle:
            if timer.active():
                timer.cancel()
            session.close()


LISTING_LIMIT = 16 * 1024 * 1024


def _problem(name: str, failure: FtpFailure) -> FileProblem:
    """What a refused read is, in a file source's words."""
    reply = failure.reply
    if reply is None:
        return FileProblem("unavailable", str(failure))
    if reply.code in (550, 553, 450):
        return FileProblem("not-found", f"no file '{name}' ({reply.code} {reply.text})")
    if reply.code in (530, 532, 534):
        return FileProblem("denied", f"'{name}': {reply.code} {reply.text}")
    return FileProblem("unavailable", str(failure))


def _facts(line: str) -> dict[str, str]:
    """The facts of an MLST/MLSD entry (RFC 3659 7.2), keys in lower case."""
    facts, _, _ = line.strip().partition(" ")
    out: dict[str, str] = {}
    for fact in facts.split(";"):
        key, equals, value = fact.partition("=")
        if equals:
            out[key.lower()] = value
    return out


def _time(stamp: str) -> float | None:
    try:
        when = time.strptime(stamp[:14], "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return float(calendar.timegm(when))


def _info(name: str, facts: dict[str, str]) -> FileInfo:
    size = facts.get("size", "")
    folder = facts.get("type", "").lower() in ("dir", "cdir", "pdir")
    modified = _time(facts["modify"]) if "modify" in facts else None
    return FileInfo(name, int(size) if size.isdigit() and not folder else None, modified, folder)


def _mlsd_entry(line: str) -> FileInfo | None:
    facts, space, name = line.partition(" ")
    if not space or not name:
        return None
    parsed = _facts(facts + " ")
    if parsed.get("type", "").lower() in ("cdir", "pdir"):
        return None  # the folder itself and its parent
    return _info(name, parsed)


def _list_entry(line: str) -> FileInfo | None:
    """A line of a Unix ``ls -l`` listing (what LIST gives when MLSD is not there)."""
    fields = line.split(None, 8)
    if len(fields) < 9 or fields[0][:1] not in ("-", "d", "l"):
        return None
    name = fields[8]
    if fields[0].startswith("l"):
        name = name.split(" -> ")[0]
    folder = fields[0].startswith("d")
    size = int(fields[4]) if fields[4].isdigit() and not folder else None
    return None if name in (".", "..") else FileInfo(name, size, None, folder)
