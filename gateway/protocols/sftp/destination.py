"""The SFTP destination: uploads written to an SFTP server over one SSH connection.

The connection is made when the first delivery needs it and kept for those that
follow (several at once share it: SFTP takes many requests in flight); it is
dropped after a minute without work, or when the server or a timeout ends it,
and made again by the next delivery.  The server's key must be in the
``known_hosts`` file (for ``[host]:port`` or ``host``): any other key is
refused, and the deliveries wait in the spool.

A file goes to ``<folder>/<name>.<id>.part`` first (its folders made as
needed), written in pipelined 32 KiB blocks, flushed with the
``fsync@openssh.com`` extension when the server has it, and then renamed to
its name: with ``overwrite``, by ``posix-rename@openssh.com`` (which replaces
the old file at once); without, by a plain SFTP rename, which fails if the
name is taken, so an existing file is never replaced.  A delivery broken off
leaves at most the ``.part`` file, which the next try writes again from the
start and removes on failure.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Awaitable
from typing import Any, TypeVar

from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.error import HostKeyChanged
from twisted.conch.ssh import channel, common, connection, filetransfer, keys, transport, userauth
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from gateway.message import FileMessage, Kind, Message
from gateway.ports import FileProblem, FileSink, Outcome, tidy_name
from gateway.protocols.sftp.config import SftpDestinationConfig

log = Logger(namespace="gateway.sftp")


def _warnings_only(event: dict[str, Any]) -> None:
    if event.get("log_level", LogLevel.info) >= LogLevel.warn:
        globalLogPublisher(event)


# Conch logs every packet at info: only its warnings and errors reach the gateway's log.
_OBSERVER: Any = _warnings_only  # an ILogObserver (zope interfaces are opaque to mypy)
_CONCH_LOG = Logger(namespace="gateway.sftp.ssh", observer=_OBSERVER)

BLOCK = 32 * 1024  # bytes per SFTP write (every server takes this much)
IN_FLIGHT = 32  # writes sent before the first is answered
IDLE = 60.0  # seconds without deliveries before the connection is closed

_T = TypeVar("_T")

# Conch has no type hints: what is called on it goes through these names, typed Any.
_Key: Any = keys.Key
_UserAuthClient: Any = userauth.SSHUserAuthClient
_SSHConnection: Any = connection.SSHConnection
_FileTransferClient: Any = filetransfer.FileTransferClient
_SSHChannel: Any = channel.SSHChannel
_Failure: Any = Failure
_SHA256: Any = keys.FingerprintFormats.SHA256_BASE64


class SftpFailure(Exception):
    """The connection could not be made or kept: try again later."""


class _Transport(transport.SSHClientTransport):
    _log = _CONCH_LOG

    def __init__(self, session: _Session) -> None:
        self.session = session

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred[bool]:
        config = self.session.config
        try:
            key = _Key.fromString(hostKey)
            # As OpenSSH shows it: SHA256:<base64 without padding>.
            shown = "SHA256:" + key.fingerprint(_SHA256).rstrip("=")
            known = KnownHostsFile.fromPath(FilePath(str(config.known_hosts)))
            names = [f"[{config.url.host}]:{config.port}".encode(), config.url.host.encode()]
            if config.port == 22:
                names.reverse()
            for name in names:
                if known.hasHostKey(name, key):
                    return defer.succeed(True)
        except HostKeyChanged:
            self.session.problem = (
                f"the server's key ({shown}) is not the one in"
                f" {config.known_hosts}: refused (a new key, or someone in between)"
            )
            return defer.fail(SftpFailure(self.session.problem))
        except (OSError, keys.BadKeyError) as exc:
            self.session.problem = f"cannot check the server's key: {exc}"
            return defer.fail(SftpFailure(self.session.problem))
        self.session.problem = f"the server's key ({shown}) is not in {config.known_hosts}"
        return defer.fail(SftpFailure(self.session.problem))

    def connectionSecure(self) -> None:
        self.requestService(_Auth(self.session, _Connection(self.session)))

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        text = description.decode("utf-8", "replace")
        if reasonCode == transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
            text = f"the server refused the key for {self.session.config.url.user}"
        self.session.problem = self.session.problem or text

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self.session.lost(reason or _Failure(ConnectionLost("the connection closed")))


class _Auth(userauth.SSHUserAuthClient):
    _log = _CONCH_LOG
    preferredOrder = [b"publickey"]

    def __init__(self, session: _Session, instance: Any) -> None:
        _UserAuthClient.__init__(self, session.config.url.user.encode(), instance)
        self.session = session
        self._tried = False

    def getPublicKey(self) -> Any:
        if self._tried:
            return None  # one key only
        self._tried = True
        return self.session.key.public()

    def getPrivateKey(self) -> defer.Deferred[Any]:
        return defer.succeed(self.session.key)

    def getPassword(self, prompt: bytes | None = None) -> defer.Deferred[bytes] | None:
        return None


class _Connection(connection.SSHConnection):
    _log = _CONCH_LOG

    def __init__(self, session: _Session) -> None:
        _SSHConnection.__init__(self)
        self.session = session

    def serviceStarted(self) -> None:
        _SSHConnection.serviceStarted(self)
        _SSHConnection.openChannel(self, _Channel(self.session, conn=self))


class _Client(filetransfer.FileTransferClient):
    _log = _CONCH_LOG

    def __init__(self, session: _Session) -> None:
        _FileTransferClient.__init__(self)
        self.session = session
        self.extensions: dict[bytes, bytes] = {}

    def gotServerVersion(self, serverVersion: int, extData: dict[bytes, bytes]) -> None:
        self.extensions = dict(extData)
        self.session.ready(self)


class _Channel(channel.SSHChannel):
    _log = _CONCH_LOG
    name = b"session"

    def __init__(self, session: _Session, **kw: Any) -> None:
        _SSHChannel.__init__(self, **kw)
        self.session = session
        self._client: Any = None

    def channelOpen(self, specificData: bytes) -> None:
        conn: Any = self.conn
        requested = conn.sendRequest(self, b"subsystem", common.NS(b"sftp"), wantReply=True)
        requested.addCallbacks(self._started, self._refused)

    def _started(self, _: object) -> None:
        client: Any = _Client(self.session)
        client.makeConnection(self)
        self._client = client

    def dataReceived(self, data: bytes) -> None:
        if self._client is not None:
            self._client.dataReceived(data)

    def _refused(self, failure: Failure) -> None:
        self.session.problem = "the server has no SFTP subsystem for this user"
        _SSHChannel.loseConnection(self)

    def closed(self) -> None:
        if self._client is not None:
            self._client.connectionLost(_Failure(ConnectionLost("the SFTP channel closed")))
        conn: Any = self.conn
        conn.transport.loseConnection()


class _Factory(protocol.ClientFactory):
    noisy = False

    def __init__(self, session: _Session) -> None:
        self.session = session

    def buildProtocol(self, addr: Any) -> _Transport:
        built = _Transport(self.session)
        built.factory = self
        return built

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.session.lost(reason)


class _Session:
    """One SSH connection with its SFTP channel, from connecting to closing."""

    def __init__(self, config: SftpDestinationConfig, key: Any, reactor: Any) -> None:
        self.config = config
        self.key = key
        self.reactor = reactor
        self.problem = ""
        self.client: _Client | None = None
        self.closed = False
        self._waiters: list[defer.Deferred[_Client]] = []
        self._connector: Any = reactor.connectTCP(
            config.url.host, config.port, _Factory(self), timeout=float(config.connect_timeout)
        )

    def wait(self) -> defer.Deferred[_Client]:
        """The SFTP client once the connection is up and logged in; SftpFailure if not."""
        waiter: defer.Deferred[_Client] = defer.Deferred()
        if self.client is not None:
            waiter.callback(self.client)
        elif self.closed:
            waiter.errback(SftpFailure(self.problem or "the connection closed"))
        else:
            self._waiters.append(waiter)
        return waiter

    def ready(self, client: _Client) -> None:
        self.client = client
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(client)

    def lost(self, reason: Failure) -> None:
        self.closed = True
        self.client = None
        self.problem = self.problem or _describe(reason)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(SftpFailure(self.problem))

    def close(self) -> None:
        self._connector.disconnect()


def _describe(reason: Failure | BaseException) -> str:
    value = reason.value if isinstance(reason, Failure) else reason
    if isinstance(value, ConnectError):
        if isinstance(value.osError, int):
            return f"cannot connect: {os.strerror(value.osError)}"
        return f"cannot connect: {value.osError or value}"
    return str(value) or type(value).__name__


class SftpDestination(FileSink):
    def __init__(self, config: SftpDestinationConfig, reactor: Any) -> None:
        self.config = config
        self.name = config.name
        self.kinds = frozenset({Kind.FILE})
        self.reactor = reactor
        self.key = _Key.fromFile(str(config.key))
        self._session: _Session | None = None
        self._busy = 0
        self._idle: Any = None

    # --- the connection ---

    async def _client(self) -> Any:
        session = self._session
        if session is None or session.closed:
            session = self._session = _Session(self.config, self.key, self.reactor)
        try:
            return await self._wait(session.wait(), float(self.config.connect_timeout))
        except SftpFailure:
            if self._session is session:
                self._drop()
            raise

    async def _wait(self, awaited: Awaitable[_T], timeout: float, step: str = "") -> _T:
        """``awaited``'s result within ``timeout`` seconds; a refusal names ``step``."""
        deferred = defer.ensureDeferred(_as_coroutine(awaited))
        deferred.addTimeout(timeout, self.reactor)
        try:
            return await deferred
        except defer.TimeoutError:
            self._drop("the server did not answer in time")
            raise SftpFailure(f"no answer from the server within {timeout:g}s") from None
        except filetransfer.SFTPError as exc:
            if not step:
                raise
            raise _Refused(step, exc) from None

    def _drop(self, why: str = "") -> None:
        """Close the connection (``why`` is logged when it was in use)."""
        session, self._session = self._session, None
        if session is not None:
            if why and session.client is not None:
                log.info("SFTP {name}: closing the connection: {why}", name=self.name, why=why)
            session.close()

    # --- deliveries ---

    async def deliver(self, message: Message) -> Outcome:
        if not isinstance(message, FileMessage) or not message.path:
            return Outcome.permanent(f"SFTP takes uploaded files, not {message.kind}")
        if message.append:
            return Outcome.permanent(
                "SFTP cannot add to the end of a file all at once (an upload by APPE):"
                " a retry could add a piece twice"
            )
        self._busy += 1
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        try:
            target = await self._put(message)
        except FileProblem as exc:
            return Outcome.permanent(exc.detail)
        except _Exists as exc:
            return Outcome.permanent(f"{exc} exists already (set overwrite: true to replace it)")
        except SftpFailure as exc:
            return Outcome.temporary(f"{self.config.url.host}:{self.config.port}: {exc}")
        except _Refused as exc:
            return Outcome.temporary(str(exc))
        except filetransfer.SFTPError as exc:
            return Outcome.temporary(f"the server refused: {exc.message} (SFTP code {exc.code})")
        except (ConnectionLost, ConnectError, EOFError) as exc:
            self._drop("the connection broke")
            return Outcome.temporary(f"the connection broke: {_describe(exc)}")
        except OSError as exc:
            return Outcome.temporary(f"cannot read the spooled file: {exc.strerror or exc}")
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle = self.reactor.callLater(IDLE, self._drop, "idle")
        return Outcome.delivered(f"saved as {target}")

    async def _put(self, message: FileMessage) -> str:
        name = tidy_name(message.name)
        folder = self.config.url.folder
        target = posixpath.join(folder, name) if folder else name
        parent, leaf = posixpath.split(target)
        temporary = posixpath.join(parent, f".{leaf}.{message.id}.part")
        timeout = float(self.config.timeout)
        client = await self._client()
        if parent:
            await self._folders(client, parent, timeout)
        if not self.config.overwrite and await self._exists(client, target, timeout):
            raise _Exists(target)
        flags = filetransfer.FXF_WRITE | filetransfer.FXF_CREAT | filetransfer.FXF_TRUNC
        opening = client.openFile(temporary.encode(), flags, {})
        handle = await self._wait(opening, timeout, f"opening {temporary}")
        renamed = False
        try:
            await self._copy(handle, message.path, timeout)
            if b"fsync@openssh.com" in client.extensions:
                # A ClientFile's ``handle`` is kept as the SSH string it is sent as.
                flushing = client.extendedRequest(b"fsync@openssh.com", handle.handle)
                await self._wait(flushing, timeout, f"flushing {temporary}")
            await self._wait(handle.close(), timeout, f"closing {temporary}")
            handle = None
            if self.config.overwrite and b"posix-rename@openssh.com" in client.extensions:
                request = common.NS(temporary.encode()) + common.NS(target.encode())
                renaming = client.extendedRequest(b"posix-rename@openssh.com", request)
                await self._wait(renaming, timeout, f"renaming {temporary} to {target}")
            else:
                if self.config.overwrite:
                    await self._remove(client, target, timeout)
                try:
                    await self._wait(
                        client.renameFile(temporary.encode(), target.encode()), timeout
                    )
                except _Refused:
                    if await self._exists(client, target, timeout):
                        raise _Exists(target) from None
                    raise
            renamed = True
        finally:
            if handle is not None:
                handle.close().addErrback(lambda _: None)
            if not renamed and self._session is not None and self._session.client is client:
                _forget(client, temporary)
        return target

    async def _copy(self, handle: Any, path: str, timeout: float) -> None:
        """Write the local file in blocks, IN_FLIGHT of them unanswered at most."""
        pending: list[defer.Deferred[Any]] = []
        offset = 0
        with open(path, "rb") as source:
            while True:
                block = source.read(BLOCK)
                if not block:
                    break
                pending.append(handle.writeChunk(offset, block))
                offset += len(block)
                if len(pending) >= IN_FLIGHT:
                    await self._wait(pending.pop(0), timeout, "writing")
        for written in pending:
            await self._wait(written, timeout, "writing")

    async def _folders(self, client: Any, folder: str, timeout: float) -> None:
        """Make ``folder`` and the folders above it that are missing."""
        missing: list[str] = []
        path = folder
        while path and path not in ("/", ".") and not await self._exists(client, path, timeout):
            missing.append(path)
            path = posixpath.dirname(path)
        for path in reversed(missing):
            try:
                await self._wait(client.makeDirectory(path.encode(), {}), timeout)
            except filetransfer.SFTPError as exc:
                if not await self._exists(client, path, timeout):  # made meanwhile: fine
                    raise _Refused(f"making the folder {path}", exc) from None

    async def _exists(self, client: Any, path: str, timeout: float) -> bool:
        try:
            await self._wait(client.getAttrs(path.encode()), timeout)
        except filetransfer.SFTPError as exc:
            if exc.code == filetransfer.FX_NO_SUCH_FILE:
                return False
            raise
        return True

    async def _remove(self, client: Any, path: str, timeout: float) -> None:
        try:
            await self._wait(client.removeFile(path.encode()), timeout)
        except filetransfer.SFTPError as exc:
            if exc.code != filetransfer.FX_NO_SUCH_FILE:
                raise

    async def close(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._drop("the gateway stops")


def _forget(client: Any, path: str) -> None:
    """Remove a temporary file, not waiting for the answer (a failure is no matter)."""
    client.removeFile(path.encode()).addErrback(lambda _: None)


class _Refused(Exception):
    """The server refused a step of the delivery."""

    def __init__(self, step: str, error: filetransfer.SFTPError) -> None:
        super().__init__(f"the server refused {step}: {error.message} (SFTP code {error.code})")


class _Exists(Exception):
    """The name is taken and the destination may not overwrite it."""


async def _as_coroutine(awaited: Awaitable[_T]) -> _T:
    return await awaited


__all__ = ["SftpDestination", "SftpFailure"]
