"""The FTP destination: uploads sent to an FTP server.

Each delivery takes a logged-in connection (kept for the next one for a
minute, ``max_connections`` at most), makes the file's folders (MKD), checks
that its name is free unless ``overwrite`` (SIZE, else MDTM), sends it under
``.<name>.<id>.part`` over a passive data connection, and renames it into
place (RNFR/RNTO) once the server has answered 226.  With TLS (AUTH TLS) the
data connections are protected too (PROT P).

FTP has no way to ask the server to flush a file to its disk: the 226 is the
server's word that it has the file, and the gateway takes it.  Servers that
insist on resuming the control connection's TLS session on data connections
(vsftpd's ``require_ssl_reuse=YES``) are not supported yet.
"""

from __future__ import annotations

import posixpath
from typing import Any

from twisted.internet import defer, ssl
from twisted.logger import Logger

from gateway.client_tls import UnverifiedTls, load_trust_root
from gateway.message import FileMessage, Kind, Message
from gateway.ports import FileProblem, FileSink, Outcome, tidy_name
from gateway.protocols.ftp.client import FtpFailure, FtpSession
from gateway.protocols.ftp.config import FtpDestinationConfig

log = Logger(namespace="gateway.ftp")

IDLE = 60.0  # seconds an unused connection is kept


class _Exists(Exception):
    pass


class FtpDestination(FileSink):
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
            return UnverifiedTls(config.host)
        platform: Any = ssl.platformTrust  # untyped in Twisted
        trust: Any = load_trust_root(str(config.ca)) if config.ca is not None else platform()
        return ssl.optionsForClientTLS(config.host, trustRoot=trust)

    async def _session(self) -> FtpSession:
        while self._idle:
            session, timer = self._idle.pop()
            if timer.active():
                timer.cancel()
            if session.alive:
                return session
        config = self.config
        session = FtpSession(self.reactor, config.host, config.port, float(config.timeout))
        session.timeout = float(config.connect_timeout)
        try:
            await session.open(config.user, config.password, config.tls, self._tls, self._tls)
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
        await self._slots.acquire()
        try:
            target = await self._put(message)
        except FileProblem as exc:
            return Outcome.permanent(exc.detail)
        except _Exists as exc:
            return Outcome.permanent(f"{exc} exists already (set overwrite: true to replace it)")
        except FtpFailure as exc:
            return Outcome.temporary(f"{self.config.host}:{self.config.port}: {exc}")
        except OSError as exc:
            return Outcome.temporary(f"cannot read the spooled file: {exc.strerror or exc}")
        finally:
            self._slots.release()
        return Outcome.delivered(f"saved as {target}")

    async def _put(self, message: FileMessage) -> str:
        name = tidy_name(message.name)
        folder = self.config.folder
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

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for session, timer in idle:
            if timer.active():
                timer.cancel()
            session.close()
