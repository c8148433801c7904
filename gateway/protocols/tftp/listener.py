"""The TFTP listener: read requests routed by name to a file source, uploads stored in the
spool for the route's destinations, each transfer on a port of its own.

A request is answered at once when it cannot be served: an address outside
``allow`` (access violation), a name no route serves or the source does not
have (file not found), a read of a name for uploads only or an upload of a
name for reads only (access violation), ``max_transfers`` already running
(busy), an upload announced larger than ``max_size`` (disk full), a
malformed packet (illegal operation).  Otherwise the options the client asked
for are negotiated and a ReadTransfer sends the file the route's destination
opened, or a WriteTransfer receives the upload into the spool, from a new port.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from gateway.config import Route, client_allowed, udp_endpoint_args
from gateway.listening import Listener, ListeningPort
from gateway.message import FileMessage
from gateway.ports import (
    FileProblem,
    FileSource,
    GatewayPort,
    Metric,
    Reason,
)
from gateway.protocols._files import file_dry_run, file_source, select_route, takes_uploads
from gateway.protocols.tftp import codec
from gateway.protocols.tftp.codec import TftpError
from gateway.protocols.tftp.config import TftpListenerConfig
from gateway.protocols.tftp.transfer import ReadTransfer, WriteTransfer

log = Logger(namespace="gateway.tftp")

_CODES = {
    "not-found": codec.FILE_NOT_FOUND,
    "denied": codec.ACCESS_VIOLATION,
    "unavailable": codec.NOT_DEFINED,
}


class _Server(DatagramProtocol):
    """The listening port: requests only (transfers have ports of their own)."""

    def __init__(self, listener: TftpSockets, interface: str) -> None:
        self.listener = listener
        self.interface = interface

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.listener.request(self, datagram, (addr[0], addr[1]))

    def reply(self, client: tuple[str, int], code: int, text: str) -> None:
        udp: Any = self.transport  # zope's interfaces type its methods without self
        if udp is not None:
            udp.write(codec.error(code, text), client)


class TftpSockets(Listener[TftpListenerConfig]):
    def __init__(self, config: TftpListenerConfig, gateway: GatewayPort, reactor: Any) -> None:
        super().__init__(config, gateway, reactor)
        self.transfers: set[ReadTransfer | WriteTransfer] = set()
        self.opening = 0  # requests whose file is being opened
        self.outcomes: dict[tuple[str, str], int] = {}  # (route, outcome) -> transfers
        self.refusals: dict[str, int] = {}  # error code name -> requests refused
        self.bytes_sent = 0
        self.bytes_received = 0  # of uploads stored

    async def listen_on(self, description: str) -> ListeningPort:
        number, interface = udp_endpoint_args(description)
        port: ListeningPort = self.reactor.listenUDP(
            number, _Server(self, interface), interface=interface
        )
        return port

    def reconfigure(self, config: TftpListenerConfig) -> None:
        self.config = config

    # --- requests ---

    def request(self, server: _Server, datagram: bytes, client: tuple[str, int]) -> None:
        host = client[0]
        try:
            packet = codec.parse(datagram)
        except TftpError as exc:
            self._refuse(server, client, exc.code, exc.text)
            return
        if not isinstance(packet, codec.Request):
            self._refuse(server, client, codec.ILLEGAL_OPERATION, "expected RRQ or WRQ")
            return
        if self.gateway.stopping:
            self._refuse(server, client, codec.NOT_DEFINED, "the server is shutting down")
            return
        if self.config.allow and not client_allowed(self.config.allow, host):
            self._refuse(server, client, codec.ACCESS_VIOLATION, "not allowed from this address")
            return
        if len(self.transfers) + self.opening >= self.config.max_transfers:
            self._refuse(server, client, codec.NOT_DEFINED, "busy: too many transfers, try later")
            return
        table = self.gateway.current()
        route = select_route(
            table.routes_for(self.name), packet.filename, host, reading=packet.is_read
        )
        if route is None:
            self._refuse(server, client, codec.FILE_NOT_FOUND, "no route serves this name")
            self._trace(client, packet.filename, None, "no route")
            return
        if not packet.is_read:
            self._upload(server, packet, route, client)
            return
        source = file_source(table, route)
        if source is None:
            self._refuse(server, client, codec.ACCESS_VIOLATION, "this name is for uploads only")
            return
        self.requests += 1
        self.opening += 1
        Deferred.fromCoroutine(self._start(server, packet, route, source, client)).addErrback(
            lambda f: log.failure("TFTP request from {client} failed", f, client=client)
        )

    async def _start(
        self,
        server: _Server,
        packet: codec.Request,
        route: Route,
        source: FileSource,
        client: tuple[str, int],
    ) -> None:
        try:
            reader = await source.fetch(packet.filename)
        except FileProblem as problem:
            self._refuse(server, client, _CODES[problem.reason], problem.detail[:200])
            self._count(route.name, problem.reason)
            self._trace(client, packet.filename, route, problem.reason)
            return
        finally:
            self.opening -= 1
        terms = codec.negotiate(
            packet,
            reader.size,
            max_blksize=self.config.max_blksize,
            max_windowsize=self.config.max_windowsize,
        )

        def done(outcome: str, sent: int, detail: str) -> None:
            self.transfers.discard(transfer)
            self.bytes_sent += sent
            self._finished("read", client, packet.filename, route, outcome, sent, detail)

        transfer = ReadTransfer(
            client,
            reader,
            terms,
            netascii=packet.mode == "netascii",
            timeout=float(self.config.timeout),
            retries=self.config.retries,
            reactor=self.reactor,
            done=done,
        )
        self._open(server, client, transfer, reader.close)

    def _upload(
        self, server: _Server, packet: codec.Request, route: Route, client: tuple[str, int]
    ) -> None:
        """A write request: received into the spool, stored as a file message for the
        route's destinations, and only then given its final ACK."""
        if not takes_uploads(self.gateway.current(), route):
            self._refuse(server, client, codec.ACCESS_VIOLATION, "this name is for reads only")
            return
        terms = codec.negotiate(
            packet,
            None,
            max_blksize=self.config.max_blksize,
            max_windowsize=self.config.max_windowsize,
        )
        limit = int(self.config.max_size)
        if terms.tsize is not None and terms.tsize > limit:
            self._refuse(server, client, codec.DISK_FULL, f"larger than {limit} octets")
            return
        try:
            upload = self.gateway.upload()
        except OSError as exc:
            log.error("TFTP upload refused: {error}", error=exc)
            self._refuse(server, client, codec.DISK_FULL, "the server cannot take files now")
            return
        self.requests += 1
        name, host = packet.filename, client[0]

        async def store(size: int) -> tuple[int, str] | None:
            await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), upload.finish
            )
            message = FileMessage(
                name=name, size=size, path=upload.path, listener=self.name, client=host
            )
            verdict = await self.gateway.submit(message)
            if verdict.ok:
                self.accepted += 1
                # Stored, its content moved into the spool; or turned into something else
                # (file_to_mail), the content no longer needed.
                upload.discard()
                return None
            code = _UPLOAD_ERRORS.get(verdict.reason, codec.NOT_DEFINED)
            return code, (verdict.detail or verdict.reason.value)[:200]

        def done(outcome: str, size: int, detail: str) -> None:
            self.transfers.discard(transfer)
            self.bytes_received += size if outcome == "complete" else 0
            self._finished("wrote", client, name, route, outcome, size, detail)

        transfer = WriteTransfer(
            client,
            upload,
            terms,
            netascii=packet.mode == "netascii",
            timeout=float(self.config.timeout),
            retries=self.config.retries,
            max_size=limit,
            reactor=self.reactor,
            store=lambda size: Deferred.fromCoroutine(store(size)),
            done=done,
        )
        self._open(server, client, transfer, upload.discard)

    def _open(
        self,
        server: _Server,
        client: tuple[str, int],
        transfer: ReadTransfer | WriteTransfer,
        release: Callable[[], None],
    ) -> None:
        """Start ``transfer`` on a port of its own (on the listener's address)."""
        self.transfers.add(transfer)
        try:
            self.reactor.listenUDP(0, transfer, interface=server.interface)
        except CannotListenError as exc:
            self.transfers.discard(transfer)
            release()
            self._refuse(server, client, codec.NOT_DEFINED, "no port free for the transfer")
            log.error("TFTP: no port for a transfer: {error}", error=exc)

    def _finished(
        self,
        verb: str,
        client: tuple[str, int],
        name: str,
        route: Route,
        outcome: str,
        size: int,
        detail: str,
    ) -> None:
        self._count(route.name, outcome)
        self._trace(client, name, route, outcome)
        log.info(
            "{listener}: {client} {verb} {name} by route {route}: {outcome}, {size} bytes{detail}",
            listener=self.name,
            client=f"{client[0]}:{client[1]}",
            verb=verb,
            name=name,
            route=route.name,
            outcome=outcome,
            size=size,
            detail=f" ({detail})" if detail else "",
        )

    def _refuse(self, server: _Server, client: tuple[str, int], code: int, text: str) -> None:
        server.reply(client, code, text)
        reason = _CODE_NAMES.get(code, str(code))
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def _count(self, route: str, outcome: str) -> None:
        self.outcomes[route, outcome] = self.outcomes.get((route, outcome), 0) + 1

    def _trace(self, client: tuple[str, int], name: str, route: Route | None, outcome: str) -> None:
        tracer = self.gateway.tracer
        if tracer.active:
            tracer.emit(
                "tftp",
                listener=self.name,
                client=client[0],
                name=name,
                route=route.name if route is not None else "",
                destinations=list(route.to) if route is not None else [],
                outcome=outcome,
            )

    # --- life cycle and metrics ---

    async def drain(self, timeout: float) -> None:
        """Transfers running at shutdown get ``timeout`` seconds, then an error packet."""
        deadline = self.reactor.seconds() + timeout
        while self.transfers and self.reactor.seconds() < deadline:
            wait: Deferred[None] = Deferred()
            self.reactor.callLater(0.05, wait.callback, None)
            await wait
        for transfer in list(self.transfers):
            transfer.abort(codec.NOT_DEFINED, "the server is shutting down")

    def metrics(self) -> Iterable[Metric]:
        transfers = Metric(
            "gateway_tftp_transfers",
            "TFTP read transfers by listener, route and outcome: complete, timeout (the"
            " client stopped ACKing), aborted, failed, not-found, denied, unavailable",
            "counter",
            ("listener", "route", "outcome"),
        )
        for (route, outcome), n in sorted(self.outcomes.items()):
            transfers.add((self.name, route, outcome), n)
        refused = Metric(
            "gateway_tftp_refusals",
            "TFTP requests answered with an error packet at once, by error",
            "counter",
            ("listener", "error"),
        )
        for reason, n in sorted(self.refusals.items()):
            refused.add((self.name, reason), n)
        return (
            transfers,
            refused,
            Metric(
                "gateway_tftp_sent_bytes",
                "File bytes sent in TFTP DATA blocks (retransmissions not counted)",
                "counter",
                ("listener",),
            ).add((self.name,), self.bytes_sent),
            Metric(
                "gateway_tftp_received_bytes",
                "Bytes of TFTP uploads stored in the spool",
                "counter",
                ("listener",),
            ).add((self.name,), self.bytes_received),
            Metric(
                "gateway_listener_open_connections",
                "Connections (for TFTP: transfers) open now",
                "gauge",
                ("listener",),
            ).add((self.name,), len(self.transfers)),
        )


# What an upload the gateway did not store gets (RFC 1350 has few codes).
_UPLOAD_ERRORS = {
    Reason.NO_ROUTE: codec.ACCESS_VIOLATION,
    Reason.POLICY: codec.ACCESS_VIOLATION,
    Reason.BAD_ADDRESS: codec.ACCESS_VIOLATION,
    Reason.UNAUTHENTICATED: codec.ACCESS_VIOLATION,
    Reason.DUPLICATE: codec.FILE_EXISTS,
    Reason.TOO_BIG: codec.DISK_FULL,
    Reason.UNAVAILABLE: codec.DISK_FULL,
}

_CODE_NAMES = {
    codec.NOT_DEFINED: "not-defined",
    codec.FILE_NOT_FOUND: "file-not-found",
    codec.ACCESS_VIOLATION: "access-violation",
    codec.ILLEGAL_OPERATION: "illegal-operation",
    codec.UNKNOWN_TID: "unknown-tid",
    codec.DISK_FULL: "disk-full",
    codec.FILE_EXISTS: "file-exists",
}


# What the shared dry run calls TFTP's refusals.
tftp_dry_run = file_dry_run(
    "TFTP",
    not_allowed="access violation",
    not_found="file not found",
    too_big="disk full",
)
