"""The FTP listener: logins, passive and active data connections, and what each file
command does.

Uploads (STOR, APPE, STOU) are written into the spool as they arrive, flushed
to disk, stored as a file message for the router, and only then answered
226; a transfer cut short, too large, or refused by the router is thrown away
and answered with its code (426, 552, 553...).  Downloads, listings and
SIZE/MDTM/MLST/CWD are answered from the file source (a folder) of the first
route whose conditions the name meets, or refused with 550.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterable
from typing import Any

from twisted.internet import threads
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from gateway.listening import StreamListener, message_metric, retry_after
from gateway.message import FileMessage
from gateway.ports import (
    FileInfo,
    FileProblem,
    FileSink,
    FileSource,
    GatewayPort,
    Metric,
    Reason,
    Status,
    Verdict,
)
from gateway.protocols._files import file_source, select_route, takes_uploads
from gateway.protocols._line_server import drain_sessions
from gateway.protocols.ftp import codec
from gateway.protocols.ftp.codec import FileRequest, Reply
from gateway.protocols.ftp.config import FtpListenerConfig
from gateway.protocols.ftp.data import (
    DataConnection,
    NoPassivePort,
    PassivePorts,
    TransferFailed,
    same_host,
)
from gateway.protocols.ftp.server import FtpServerFactory, FtpServerProtocol
from gateway.users import Login, Users

log = Logger(namespace="gateway.ftp")


class _TooLarge(Exception):
    pass


# What an upload the router did not take is answered (RFC 959 codes).
_REFUSED = {
    Reason.NO_ROUTE: 553,
    Reason.POLICY: 550,
    Reason.BAD_ADDRESS: 553,
    Reason.UNAUTHENTICATED: 530,
    Reason.DUPLICATE: 553,
    Reason.TOO_BIG: 552,
}


def refusal(verdict: Verdict) -> str:
    """The reply to an upload the gateway did not store, as one line."""
    if verdict.status is Status.TEMPORARY:
        code = 421 if verdict.reason is Reason.SHUTTING_DOWN else 451
        if verdict.reason is Reason.UNAVAILABLE:
            code = 452
        return f"{code} Not stored, try again later: {verdict.detail}"
    return f"{_REFUSED.get(verdict.reason, 550)} Not stored: {verdict.detail}"


def _reply(line: str) -> Reply:
    code, _, text = line.partition(" ")
    return Reply(int(code), text)


def _ipv4(host: str) -> str | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return str(mapped) if mapped is not None else None
    return str(address)


class FtpListener(StreamListener[FtpListenerConfig]):
    """One configured FTP listener: its server factory, and the server's FtpHandler."""

    def __init__(self, config: FtpListenerConfig, gateway: GatewayPort, reactor: Any) -> None:
        super().__init__(config, gateway, reactor)
        self.users = Users(reactor, config.name)
        self.users.configure(config.users, config.users_file)
        self.rejected = 0
        self.tempfail = 0
        self.outcomes: dict[tuple[str, str], int] = {}  # (command, outcome) -> transfers
        self.bytes_received = 0
        self.bytes_sent = 0
        self._factory = FtpServerFactory(
            self,
            reactor=reactor,
            guard=self.guard,
            tls=self.tls,
            ports=self._ports(config),
            login_without_tls=config.login_without_tls,
            data_tls=config.data_tls,
            active=config.active,
            idle_timeout=float(config.idle_timeout),
            data_timeout=float(config.data_timeout),
            session_timeout=float(config.session_timeout),
        )

    @staticmethod
    def _ports(config: FtpListenerConfig) -> PassivePorts:
        span = config.passive_ports
        return PassivePorts(span.low, span.high) if span is not None else PassivePorts()

    # --- Listener ---

    def factory(self) -> FtpServerFactory:
        return self._factory

    def reconfigure(self, config: FtpListenerConfig) -> None:
        if config.passive_ports != self.config.passive_ports:
            self._factory.ports = self._ports(config)
        super().reconfigure(config)
        factory = self._factory
        factory.tls = self.tls
        factory.login_without_tls = config.login_without_tls
        factory.data_tls = config.data_tls
        factory.active = config.active
        factory.idle_timeout = float(config.idle_timeout)
        factory.data_timeout = float(config.data_timeout)
        factory.session_timeout = float(config.session_timeout)
        self.users.configure(config.users, config.users_file, strict=False)

    async def drain(self, timeout: float) -> None:
        """Close idle sessions now; give those in a transfer ``timeout`` seconds."""
        await drain_sessions(
            self.guard.connections,
            self.reactor,
            timeout,
            lambda session: session.close_with(Reply(421, "Service shutting down")),
        )

    def metrics(self) -> Iterable[Metric]:
        yield from super().metrics()
        name = self.name
        yield message_metric(name, self.accepted, self.rejected, self.tempfail)
        transfers = Metric(
            "gateway_ftp_transfers",
            "FTP transfers by listener, command (STOR, RETR, LIST ...) and outcome: complete,"
            " refused (by a route or the router), aborted (the data connection broke off or"
            " stalled), failed (the disk or the source)",
            "counter",
            ("listener", "command", "outcome"),
        )
        for (command, outcome), n in sorted(self.outcomes.items()):
            transfers.add((name, command, outcome), n)
        yield transfers
        yield Metric(
            "gateway_ftp_received_bytes",
            "Bytes of FTP uploads stored in the spool",
            "counter",
            ("listener",),
        ).add((name,), self.bytes_received)
        yield Metric(
            "gateway_ftp_sent_bytes",
            "Bytes sent in FTP downloads and listings",
            "counter",
            ("listener",),
        ).add((name,), self.bytes_sent)

    # --- FtpHandler ---

    def on_connect(self, session: FtpServerProtocol) -> Reply | None:
        if self.gateway.stopping:
            return Reply(421, "Service shutting down")
        return None

    async def on_login(self, session: FtpServerProtocol, user: str, password: str) -> Reply:
        login, wait = await self.users.log_in(self.guard, session.peer_host, user, password)
        if login is Login.OK:
            return Reply(230, f"Logged in as {user}")
        if login is Login.LIMITED:
            return Reply(
                421,
                f"Too many failed logins from {session.peer_host}, try again in"
                f" {retry_after(wait)} seconds",
            )
        return Reply(530, "Login incorrect")

    def on_passive(self, session: FtpServerProtocol, extended: bool) -> Reply:
        local = session.local_host
        announced = self.config.passive_address or _ipv4(local)
        if not extended and announced is None:
            return Reply(425, "PASV names IPv4 addresses only: use EPSV")
        try:
            port = session.channel().listen(local, session.codec.protected)
        except NoPassivePort as exc:
            log.warn("listener {listener}: {error}", listener=self.name, error=exc)
            return Reply(425, "No passive port is free; try again later")
        except CannotListenError as exc:
            log.error(
                "listener {listener}: no passive port: {error}", listener=self.name, error=exc
            )
            return Reply(425, "Cannot open a passive port")
        if extended:
            return Reply(229, f"Entering Extended Passive Mode (|||{port}|)")
        assert announced is not None
        numbers = ",".join([*announced.split("."), str(port // 256), str(port % 256)])
        return Reply(227, f"Entering Passive Mode ({numbers})")

    def on_active(self, session: FtpServerProtocol, host: str, port: int) -> Reply:
        if not same_host(host, session.peer_host):
            log.warn(
                "listener {listener}: {client} asked for a data connection to {host}; refused",
                listener=self.name,
                client=session.peer,
                host=host,
            )
            return Reply(500, "Illegal PORT: data connections go to your own address only")
        if port < 1024:
            return Reply(500, "Illegal PORT: not to a port below 1024")
        if ":" in host and ":" not in session.local_host:
            return Reply(522, "Network protocol not supported, use (1)")
        session.channel().target(host, port, session.codec.protected)
        return Reply(200, "PORT command successful")

    async def on_file(self, session: FtpServerProtocol, request: FileRequest) -> Reply:
        verb = request.verb
        if verb in ("STOR", "APPE", "STOU"):
            return await self._store(session, request)
        if verb in ("RETR", "LIST", "NLST", "MLSD"):
            return await self._send(session, request)
        return await self._info(session, request)

    # --- uploads ---

    async def _store(self, session: FtpServerProtocol, request: FileRequest) -> Reply:
        name = request.path.lstrip("/")
        if request.verb == "STOU":
            # A name of its own, beside the one given (its extension kept for the routes).
            base = name if request.given else f"{name}/upload".lstrip("/")
            folder, _, leaf = base.rpartition("/")
            stem, dot, extension = leaf.rpartition(".")
            leaf = (
                f"{stem}.{os.urandom(6).hex()}.{extension}"
                if dot and stem
                else (f"{leaf}.{os.urandom(6).hex()}")
            )
            name = f"{folder}/{leaf}" if folder else leaf
        if not name:
            return Reply(553, "Name a file to store")
        if request.offset:
            return Reply(554, "REST is for downloads here: send the whole file again")
        refused = self._transfer_refused(session)
        if refused is not None:
            return refused
        table = self.gateway.current()
        route = select_route(
            table.routes_for(self.name), name, session.peer_host, session.user, reading=False
        )
        if route is None:
            self._count(request.verb, "refused")
            return Reply(553, f"No route takes uploads named {name}")
        if not takes_uploads(table, route):
            self._count(request.verb, "refused")
            return Reply(553, f"{name} is for downloads only")
        if request.verb == "APPE" and not takes_uploads(table, route, appending=True):
            self._count(request.verb, "refused")
            return Reply(550, f"{name} cannot be added to here (APPE): store it whole with STOR")
        try:
            upload = self.gateway.upload()
        except OSError as exc:
            log.error("listener {listener}: upload refused: {error}", listener=self.name, error=exc)
            return Reply(452, "Insufficient storage space: the server cannot take files now")
        channel = session.channel()
        try:
            connection = await channel.open(session.local_host)
        except TransferFailed as exc:
            upload.discard()
            return Reply(425, f"Cannot open the data connection: {exc}")
        mode = "ASCII" if request.ascii else "BINARY"
        if request.verb == "STOU":
            session.preliminary(Reply(150, f"FILE: /{name}"))
        else:
            session.preliminary(Reply(150, f"Ok to send data ({mode} mode)"))
        limit = int(self.config.max_size)
        held = [False]  # TYPE A: a CR at the end of the last block

        def sink(data: bytes) -> None:
            if request.ascii:
                data, held[0] = codec.ascii_to_local(data, held[0])
            if upload.size + len(data) > limit:
                raise _TooLarge()
            upload.write(data)

        try:
            await connection.receive(sink)
            if held[0]:
                upload.write(b"\r")
            if not session.open:
                raise TransferFailed("the control connection closed")
            await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), upload.finish
            )
        except _TooLarge:
            upload.discard()
            self._count(request.verb, "refused")
            return Reply(552, f"Exceeded storage allocation: more than {limit} bytes")
        except OSError as exc:
            upload.discard()
            self._count(request.verb, "failed")
            log.error(
                "listener {listener}: an upload failed: {error}", listener=self.name, error=exc
            )
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return Reply(452, "Insufficient storage space; try again later")
            return Reply(451, "Local error writing the file; try again later")
        except TransferFailed as exc:
            upload.discard()
            self._count(request.verb, "aborted")
            return Reply(426, f"Transfer aborted: {exc}")
        finally:
            channel.done()
        return await self._submit(session, request, name, upload)

    async def _submit(
        self, session: FtpServerProtocol, request: FileRequest, name: str, upload: Any
    ) -> Reply:
        message = FileMessage(
            name=name,
            size=upload.size,
            path=upload.path,
            append=request.verb == "APPE",
            listener=self.name,
            client=session.peer_host,
            user=session.user,
        )
        verdict = await self.gateway.submit(message)
        if not verdict.ok:
            upload.discard()
            if verdict.status is Status.TEMPORARY:
                self.tempfail += 1
            else:
                self.rejected += 1
            self._count(request.verb, "refused")
            return _reply(refusal(verdict))
        # Stored, its content moved into the spool; or turned into something else
        # (file_to_mail), the content no longer needed.
        upload.discard()
        self.accepted += 1
        self.bytes_received += upload.size
        self._count(request.verb, "complete")
        log.info(
            "listener {listener}: {client} ({user}) stored {name}, {size} bytes, as {id}",
            listener=self.name,
            client=session.peer,
            user=session.user,
            name=name,
            size=upload.size,
            id=message.id,
        )
        unique = f" as /{name}" if request.verb == "STOU" else ""
        return Reply(226, f"Transfer complete: {upload.size} bytes stored{unique} ({message.id})")

    # --- downloads and listings ---

    def _source(self, session: FtpServerProtocol, name: str) -> FileSource | None:
        table = self.gateway.current()
        route = select_route(
            table.routes_for(self.name), name, session.peer_host, session.user, reading=True
        )
        return None if route is None else file_source(table, route)

    def _takes_uploads(self, session: FtpServerProtocol) -> bool:
        """Some route of the listener takes uploads from this client and user."""
        table = self.gateway.current()
        for route in table.routes_for(self.name):
            match = route.match
            if match.user and session.user not in match.user:
                continue
            if route.transforms or any(
                isinstance(d, FileSink) and d.takes_uploads
                for d in map(table.destination, route.to)
            ):
                return True
        return False

    async def _send(self, session: FtpServerProtocol, request: FileRequest) -> Reply:
        name = request.path.lstrip("/")
        verb = request.verb
        listing = verb != "RETR"
        source = self._source(session, f"{name}/" if listing and name else name)
        if source is None and listing and name:
            source = self._source(session, name)
        entries: list[FileInfo] = []
        reader = None
        try:
            if source is None:
                if listing and not name:
                    entries = []  # the top, where no route serves: nothing to show
                else:
                    return Reply(550, f"/{name}: no such file here")
            elif listing:
                entries = await source.listing(name)
            else:
                reader = await source.fetch(name)
        except FileProblem as problem:
            return self._problem(verb, name, problem)
        refused = self._transfer_refused(session)
        if refused is not None:
            if reader is not None:
                reader.close()
            return refused
        channel = session.channel()
        try:
            connection = await channel.open(session.local_host)
        except TransferFailed as exc:
            if reader is not None:
                reader.close()
            return Reply(425, f"Cannot open the data connection: {exc}")
        try:
            if reader is not None:
                size = f" ({reader.size} bytes)" if reader.size is not None else ""
                session.preliminary(Reply(150, f"Opening data connection for /{name}{size}"))
                sent = await connection.send(reader, offset=request.offset, ascii=request.ascii)
            else:
                session.preliminary(Reply(150, "Here comes the listing"))
                sent = await self._send_listing(connection, verb, entries)
        except FileProblem as problem:
            connection.abort("the source failed")
            self._count(verb, "failed")
            return Reply(451, f"Transfer aborted: {problem.detail}")
        except TransferFailed as exc:
            self._count(verb, "aborted")
            return Reply(426, f"Transfer aborted: {exc}")
        finally:
            if reader is not None:
                reader.close()
            channel.done()
        self.bytes_sent += sent
        self._count(verb, "complete")
        return Reply(226, "Transfer complete")

    async def _send_listing(
        self, connection: DataConnection, verb: str, entries: list[FileInfo]
    ) -> int:
        now = self.reactor.seconds()
        if verb == "NLST":
            lines = [e.name for e in entries if not e.folder]
        elif verb == "MLSD":
            lines = [codec.mlst_facts(e.name, e.size, e.modified, e.folder) for e in entries]
        else:
            lines = [codec.list_line(e.name, e.size, e.modified, e.folder, now) for e in entries]
        text = "".join(line + "\r\n" for line in lines).encode("utf-8", "replace")
        if text:
            await connection.write(text)
        await connection.finish()
        return len(text)

    async def _info(self, session: FtpServerProtocol, request: FileRequest) -> Reply:
        name = request.path.lstrip("/")
        verb = request.verb
        source = self._source(session, f"{name}/" if verb == "CWD" and name else name)
        if source is None and name:
            source = self._source(session, name)
        if source is None:
            if verb == "CWD" and (not name or self._takes_uploads(session)):
                return Reply(250, f"Folder is now /{name}")
            return Reply(550, f"/{name}: no such file here")
        try:
            info = await source.info(name)
        except FileProblem as problem:
            if verb == "CWD" and problem.reason == "not-found" and self._takes_uploads(session):
                return Reply(250, f"Folder is now /{name} (for uploads)")
            return self._problem(verb, name, problem)
        if verb == "CWD":
            if not info.folder:
                return Reply(550, f"/{name} is not a folder")
            return Reply(250, f"Folder is now /{name}")
        if verb == "MLST":
            facts = codec.mlst_facts(request.path, info.size, info.modified, info.folder)
            return Reply(250, f"Listing /{name}\n {facts}\nEnd")
        if info.folder:
            return Reply(550, f"/{name} is a folder")
        if verb == "SIZE":
            if info.size is None:
                return Reply(550, f"/{name}: its size is not known")
            return Reply(213, str(info.size))
        if info.modified is None:
            return Reply(550, f"/{name}: its time is not known")
        return Reply(213, codec.timestamp(info.modified))

    # --- shared ---

    def _transfer_refused(self, session: FtpServerProtocol) -> Reply | None:
        if self.gateway.stopping:
            return Reply(421, "Service shutting down")
        if not session.channel().ready:
            return Reply(425, "Use PASV, EPSV, PORT or EPRT first")
        if self.config.data_tls and session.codec.tls and not session.codec.protected:
            return Reply(521, "Data connections must be protected here: send PBSZ 0 and PROT P")
        return None

    def _problem(self, verb: str, name: str, problem: FileProblem) -> Reply:
        if problem.reason == "unavailable":
            self._count(verb, "failed")
            return Reply(451, f"/{name}: {problem.detail}; try again later")
        self._count(verb, problem.reason)
        if problem.reason == "denied":
            return Reply(550, f"/{name}: permission denied ({problem.detail})")
        return Reply(550, f"/{name}: no such file")

    def _count(self, command: str, outcome: str) -> None:
        self.outcomes[command, outcome] = self.outcomes.get((command, outcome), 0) + 1
