"""An FTP client for the FTP destination: a control connection that sends one command at a
time and reads its replies, passive data connections (EPSV, else PASV) and AUTH TLS
(RFC 4217) with protected data connections.

A passive reply's address is not used: data connections go to the address of
the control connection (as curl's ``--ftp-skip-pasv-ip``), which a server
behind NAT often names wrongly and which a hostile one could point elsewhere.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from gateway.ports import FileProblem
from gateway.protocols._streamed import StreamedFile
from gateway.protocols.ftp.codec import Reply
from gateway.protocols.ftp.data import Paced

BLOCK = 256 * 1024
_EPSV = re.compile(r"\((.)\1\1(\d+)\1\)")
_PASV = re.compile(r"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)")


class FtpFailure(Exception):
    """The server answered otherwise than hoped (``reply``), or the connection failed."""

    def __init__(self, what: str, reply: Reply | None = None) -> None:
        text = f"{what}: {reply.code} {reply.text}" if reply is not None else what
        super().__init__(text)
        self.reply = reply


class _Control(LineOnlyReceiver):
    """The control connection: replies in, commands out."""

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self) -> None:
        self.made: defer.Deferred[_Control] = defer.Deferred()
        self._waiting: deque[defer.Deferred[Reply]] = deque()
        self._replies: deque[Reply] = deque()
        self._lines: list[str] = []
        self._code = ""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if self._code:
            self._lines.append(text)
            if text.startswith(self._code + " "):
                self._reply(int(self._code), "\n".join(self._lines))
            return
        if len(text) >= 3 and text[:3].isdigit():
            if text[3:4] == "-":
                self._code = text[:3]
                self._lines = [text[4:]]
                return
            self._reply(int(text[:3]), text[4:])
        # Anything else is no reply: ignored.

    def lineLengthExceeded(self, line: bytes) -> None:
        transport: Any = self.transport
        transport.loseConnection()

    def _reply(self, code: int, text: str) -> None:
        self._code = ""
        self._lines = []
        reply = Reply(code, text)
        if self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.called:  # else its command was given up (timed out): dropped
                waiter.callback(reply)
        else:
            self._replies.append(reply)

    def reply(self) -> defer.Deferred[Reply]:
        """The next reply."""
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self.lost is not None:
            return defer.fail(ConnectionLost(self.lost.getErrorMessage()))
        waiter: defer.Deferred[Reply] = defer.Deferred()
        self._waiting.append(waiter)
        return waiter

    def send(self, command: str) -> defer.Deferred[Reply]:
        self.sendLine(command.encode("utf-8"))
        return self.reply()

    def sendLine(self, line: bytes) -> None:
        transport: Any = self.transport
        transport.write(line + b"\r\n")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        if not self.made.called:
            self.made.errback(reason)
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.called:
                waiter.errback(ConnectionLost(reason.getErrorMessage()))


class _Data(Paced):
    """A data connection that sends a file and closes."""

    def __init__(self, tls: Any) -> None:
        super().__init__()
        self.tls = tls
        self.made: defer.Deferred[_Data] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self.tls is not None:
            transport.startTLS(self.tls)
        transport.registerProducer(self, True)
        self.made.callback(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.made.called:
            self.made.errback(reason)
        self.gone()
        self.reason = reason
        self.lost.callback(None)  # (a Failure given to callback would count as an error)

    async def send_file(self, path: str) -> int:
        """Write the file at ``path``, close cleanly; the bytes sent."""
        transport: Any = self.transport
        sent = 0
        with open(path, "rb") as source:
            while not self.lost.called:
                block = source.read(BLOCK)
                if not block:
                    break
                transport.write(block)
                sent += len(block)
                await self.drained()
        if self.lost.called:
            raise FtpFailure("the server closed the data connection")
        transport.unregisterProducer()
        transport.loseConnection()
        await self.lost
        reason = self.reason
        if reason is None or not isinstance(reason.value, ConnectionDone):
            why = reason.getErrorMessage() if reason is not None else "lost"
            raise FtpFailure(f"the data connection broke off: {why}")
        return sent


class _Incoming(TwistedProtocol):
    """A data connection that brings a file (RETR) or a listing (MLSD, NLST) in."""

    def __init__(self, tls: Any, reader: StreamedFile) -> None:
        self.tls = tls
        self.reader = reader
        self.made: defer.Deferred[_Incoming] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self.tls is not None:
            transport.startTLS(self.tls)
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.reader.arrived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.made.called:
            self.made.errback(reason)
        self.reason = reason
        self.lost.callback(None)

    @property
    def clean(self) -> bool:
        return self.reason is not None and isinstance(self.reason.value, ConnectionDone)


class Download(StreamedFile):
    """A file coming in over a data connection; ``finished`` fires with the server's final
    reply once the connection has ended (or with FtpFailure)."""

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.connection: _Incoming | None = None
        self.finished: defer.Deferred[Reply] = defer.Deferred()

    def _transport(self) -> Any:
        return self.connection.transport if self.connection is not None else None

    def pause(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.pauseProducing()

    def resume(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.resumeProducing()

    def stop(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.abortConnection()


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, protocol: _Control | _Data | _Incoming) -> None:
        self.built = protocol

    def buildProtocol(self, addr: Any) -> _Control | _Data | _Incoming:
        return self.built

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.built.made.called:
            self.built.made.errback(reason)


@implementer(IOpenSSLClientConnectionCreator)
class _Resuming:
    """TLS for a data connection that resumes the control connection's TLS session, as
    servers that check it ask (vsftpd's require_ssl_reuse, on by default): proof that the
    data connection comes from the client that logged in."""

    def __init__(self, creator: Any, control: _Control) -> None:
        self.creator = creator
        self.control = control

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        connection = self.creator.clientConnectionForTLS(tls_protocol)
        transport: Any = self.control.transport
        tls: Any = getattr(transport, "protocol", None)  # the TLS layer under the control
        handle = tls.getHandle() if tls is not None else None
        session = handle.get_session() if handle is not None else None
        if session is not None:
            connection.set_session(session)
        return connection


class FtpSession:
    """One logged-in control connection to a server."""

    def __init__(self, reactor: Any, host: str, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.control = _Control()
        self.data_tls: Any = None  # a client TLS creator once PROT P is in force
        self.features: set[str] = set()
        self.home = "/"  # the folder the login put the session in (PWD)
        self.closed = False

    @property
    def alive(self) -> bool:
        return not self.closed and self.control.lost is None

    async def _wait(self, deferred: defer.Deferred[Any], what: str) -> Any:
        deferred.addTimeout(self.timeout, self.reactor)
        try:
            return await deferred
        except defer.TimeoutError:
            self.close()
            raise FtpFailure(f"no answer within {self.timeout:g}s to {what}") from None
        except (ConnectionLost, ConnectionDone) as exc:
            self.close()
            raise FtpFailure(f"the server closed the connection during {what}: {exc}") from None

    async def command(self, text: str, *expected: int) -> Reply:
        """Send ``text``; its reply, which must have one of the ``expected`` codes (when
        given), else FtpFailure."""
        shown = "PASS ..." if text.startswith("PASS ") else text
        reply: Reply = await self._wait(self.control.send(text), shown)
        if expected and reply.code not in expected:
            raise FtpFailure(shown, reply)
        return reply

    async def open(
        self, user: str, password: str, tls: str, creator: Any, data_creator: Any
    ) -> None:
        """Connect and log in; with ``tls`` "may" or "require", AUTH TLS first."""
        self.reactor.connectTCP(self.host, self.port, _Factory(self.control), timeout=self.timeout)
        try:
            await self._wait(self.control.made, "connecting")
        except Exception as exc:
            raise FtpFailure(f"cannot connect: {_reason(exc)}") from None
        greeting: Reply = await self._wait(self.control.reply(), "the greeting")
        if greeting.code != 220:
            raise FtpFailure("the server's greeting", greeting)
        if tls != "none":
            reply = await self.command("AUTH TLS")
            if reply.code == 234:
                transport: Any = self.control.transport
                transport.startTLS(creator)
                await self.command("PBSZ 0", 200)
                await self.command("PROT P", 200)
                self.data_tls = _Resuming(data_creator, self.control)
            elif tls == "require":
                raise FtpFailure("the server offers no TLS (tls: require)", reply)
        reply = await self.command(f"USER {user}", 230, 331, 332)
        if reply.code == 331:
            await self.command(f"PASS {password}", 230, 202)
        elif reply.code == 332:
            raise FtpFailure("the server wants an account (ACCT), which is not supported", reply)
        await self.command("TYPE I", 200)
        where = await self.command("PWD")
        if where.code == 257 and where.text.startswith('"'):
            self.home = where.text[1:].rsplit('"', 1)[0].replace('""', '"')
        feat = await self.command("FEAT")
        if feat.code == 211:
            self.features = {line.strip().split(" ")[0].upper() for line in feat.text.split("\n")}

    async def exists(self, path: str) -> bool | None:
        """Whether ``path`` is there (SIZE, or MDTM); None when the server says neither."""
        for verb in ("SIZE", "MDTM"):
            reply = await self.command(f"{verb} {path}")
            if reply.code == 213:
                return True
            if reply.code == 550:
                return False
        return None

    async def make_folders(self, folder: str) -> None:
        """MKD each folder of ``folder`` from the top (those there already refuse: fine)."""
        parts = [p for p in folder.split("/") if p]
        path = "/" if folder.startswith("/") else ""
        for part in parts:
            path = f"{path}{part}"
            await self.command(f"MKD {path}")
            path += "/"

    async def store(self, path: str, source: str) -> int:
        """Upload the local file ``source`` as ``path``: EPSV (else PASV), STOR, 226."""
        port = await self._passive()
        data = _Data(self.data_tls)
        self.reactor.connectTCP(self.host, port, _Factory(data), timeout=self.timeout)
        try:
            await self._wait(data.made, "opening the data connection")
        except FtpFailure:
            raise
        except Exception as exc:  # the connection was refused
            raise FtpFailure(f"cannot open the data connection: {_reason(exc)}") from None
        try:
            await self.command(f"STOR {path}", 125, 150)
        except FtpFailure:
            transport: Any = data.transport
            transport.abortConnection()
            raise
        sent = await self._wait(defer.ensureDeferred(data.send_file(source)), "sending the file")
        reply: Reply = await self._wait(self.control.reply(), f"STOR {path}")
        if reply.code not in {226, 250}:
            raise FtpFailure(f"STOR {path}", reply)
        return int(sent)

    async def retrieve(self, command: str, size: int | None) -> Download:
        """Send ``command`` (RETR, MLSD, NLST) and stream what comes over the data connection:
        the Download is handed back once the server says it sends (150); its ``finished``
        fires after the end with the final reply. FtpFailure if the server refuses."""
        port = await self._passive()
        download = Download(size)
        data = _Incoming(self.data_tls, download)
        download.connection = data
        self.reactor.connectTCP(self.host, port, _Factory(data), timeout=self.timeout)
        try:
            await self._wait(data.made, "opening the data connection")
        except FtpFailure:
            raise
        except Exception as exc:  # the connection was refused
            raise FtpFailure(f"cannot open the data connection: {_reason(exc)}") from None
        try:
            await self.command(command, 125, 150)
        except FtpFailure:
            transport: Any = data.transport
            transport.abortConnection()
            raise
        defer.ensureDeferred(self._finish(download, data, command)).chainDeferred(download.finished)
        return download

    async def _finish(self, download: Download, data: _Incoming, command: str) -> Reply:
        await data.lost
        problem = None if data.clean else FileProblem("unavailable", "the transfer broke off")
        try:
            reply: Reply = await self._wait(self.control.reply(), command)
        except FtpFailure as exc:
            download.ended(FileProblem("unavailable", str(exc)))
            raise
        if reply.code not in (226, 250):
            problem = FileProblem("unavailable", f"{command}: {reply.code} {reply.text}")
        download.ended(problem)
        if problem is not None:
            raise FtpFailure(command, reply)
        return reply

    async def _passive(self) -> int:
        if "EPSV" in self.features or not self.features:
            reply = await self.command("EPSV")
            found = _EPSV.search(reply.text) if reply.code == 229 else None
            if found is not None:
                return int(found.group(2))
        reply = await self.command("PASV", 227)
        numbers = _PASV.search(reply.text)
        if numbers is None:
            raise FtpFailure("PASV gave no address", reply)
        return int(numbers.group(5)) * 256 + int(numbers.group(6))

    async def rename(self, old: str, new: str) -> None:
        await self.command(f"RNFR {old}", 350)
        await self.command(f"RNTO {new}", 250)

    async def delete(self, path: str) -> None:
        await self.command(f"DELE {path}")

    def close(self) -> None:
        self.closed = True
        transport: Any = self.control.transport
        if transport is not None and self.control.lost is None:
            transport.write(b"QUIT\r\n")
            transport.loseConnection()


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
