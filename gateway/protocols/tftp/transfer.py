"""TFTP transfers, each on a port of its own (RFC 1350's TID): reads (blocks out, ACKs
in) and uploads (blocks in, ACKs out).

The transfer sends a window of blocks (one, unless the client asked for a
``windowsize``) and waits for the ACK of the last; an ACK of an earlier
block starts the next window after it, and an ACK of a block already
acknowledged is ignored: blocks are sent again only when the wait runs out
(so a duplicate ACK never doubles the traffic, the Sorcerer's Apprentice bug
of RFC 1350).  The wait doubles at each retry, and after ``retries`` of them
the transfer ends.  Block numbers are 16 bits and roll over from 65535 to 0,
as tftpd-hpa does, so files of any size go through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from gateway.ports import FileProblem, FileReader
from gateway.protocols.tftp import codec
from gateway.protocols.tftp.codec import NetasciiDecoder, NetasciiEncoder, Terms, TftpError

log = Logger(namespace="gateway.tftp")

# (outcome: complete | timeout | aborted | failed, bytes sent, detail)
Done = Callable[[str, int, str], None]

MAX_WAIT = 16.0  # seconds: the longest wait between retries, however it doubled
READ_SIZE = 65536  # bytes asked of the source at a time


class _Transfer(DatagramProtocol):
    """What both directions share: the peer's port, the wait with back-off, the timer."""

    def __init__(
        self,
        client: tuple[str, int],
        terms: Terms,
        *,
        timeout: float,
        retries: int,
        reactor: Any,
        done: Done,
    ) -> None:
        self.client = client
        self.terms = terms
        self.timeout = terms.timeout or timeout
        self.retries = retries
        self.reactor = reactor
        self.on_done = done
        self.tries = 0
        self.wait = self.timeout
        self.timer: Any = None
        self.finished = False

    def _from_stranger(self, addr: Any) -> bool:
        """A packet from another port is not this transfer's (RFC 1350 section 4)."""
        if (addr[0], addr[1]) == self.client:
            return False
        self._send(codec.error(codec.UNKNOWN_TID, "unknown transfer ID"), addr)
        return True

    def _heard(self) -> None:
        """The peer answered: the next wait is the first again."""
        self.tries = 0
        self.wait = self.timeout

    def _again(self, awaited: str) -> bool:
        """The wait ran out: True to send again (the next wait doubled), False once the
        retries are spent (the peer is told)."""
        self.tries += 1
        if self.tries > self.retries:
            self._send(codec.error(codec.NOT_DEFINED, f"timed out waiting for {awaited}"))
            return False
        self.wait = min(self.wait * 2, MAX_WAIT)
        return True

    def _arm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.wait)  # cheaper than a new call for every block
        else:
            self.timer = self.reactor.callLater(self.wait, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def _expired(self) -> None:
        raise NotImplementedError

    def _send(self, packet: bytes, to: tuple[str, int] | None = None) -> None:
        udp: Any = self.transport  # zope's interfaces type its methods without self
        if udp is not None:
            udp.write(packet, to or self.client)

    def _stop_listening(self) -> None:
        udp: Any = self.transport
        if udp is not None:
            udp.stopListening()


class ReadTransfer(_Transfer):
    def __init__(
        self,
        client: tuple[str, int],
        reader: FileReader,
        terms: Terms,
        *,
        netascii: bool,
        timeout: float,
        retries: int,
        reactor: Any,
        done: Done,
    ) -> None:
        super().__init__(
            client, terms, timeout=timeout, retries=retries, reactor=reactor, done=done
        )
        self.reader = reader
        self.encoder = NetasciiEncoder() if netascii else None
        self.blksize = terms.blksize
        self.sent: list[tuple[int, bytes]] = []  # (absolute block number, packet) not yet ACKed
        self.acked = 0  # absolute number of the last block ACKed (0: the OACK, or nothing)
        self.next_block = 1
        self.last_block: int | None = None  # the short block that ends the file, once read
        self.buffer = b""
        self.at = 0  # where the next block starts in buffer
        self.at_end = False
        self.bytes_sent = 0
        self.reading = False
        self.oack: bytes | None = codec.oack(terms.reply) if terms.reply else None
        self.oack_waiting = False

    # --- life cycle ---

    def startProtocol(self) -> None:
        if self.oack is not None:
            self._send(self.oack)  # the client ACKs block 0, then blocks follow
            self.oack_waiting = True
            self._arm()
        else:
            self._fill()

    def _finish(self, outcome: str, detail: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        self._disarm()
        self.reader.close()
        self._stop_listening()
        self.on_done(outcome, self.bytes_sent, detail)

    def abort(self, code: int, text: str) -> None:
        """End the transfer now, telling the client why (shutdown, say)."""
        if not self.finished:
            self._send(codec.error(code, text))
            self._finish("aborted", text)

    # --- packets in ---

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.finished or self._from_stranger(addr):
            return
        if len(datagram) == 4 and datagram[:2] == b"\x00\x04":  # an ACK: the usual case
            self._acked(int.from_bytes(datagram[2:], "big"))
            return
        try:
            packet = codec.parse(datagram)
        except TftpError as exc:
            self._send(codec.error(exc.code, exc.text))
            self._finish("failed", exc.text)
            return
        if isinstance(packet, codec.Error):
            self._finish("aborted", f"the client ended it: error {packet.code} {packet.text}")
            return
        if not isinstance(packet, codec.Ack):
            self._send(codec.error(codec.ILLEGAL_OPERATION, "expected an ACK"))
            self._finish("failed", "the client sent something else than an ACK")
            return
        self._acked(packet.block)

    def _acked(self, block: int) -> None:
        if self.oack_waiting:
            if block == 0:  # the client takes the options: data follows
                self.oack_waiting = False
                self._heard()
                self._fill()
            return
        # Which of the blocks in flight (or the one acknowledged last) this 16-bit number is.
        newest = self.sent[-1][0] if self.sent else self.acked
        number = next((n for n in range(newest, self.acked, -1) if n & 0xFFFF == block), None)
        if number is None:
            return  # an old or duplicate ACK: ignored, never answered with data
        self.acked = number
        self.sent = [(n, p) for n, p in self.sent if n > number]
        self._heard()
        if self.last_block is not None and number >= self.last_block:
            self._finish("complete")
            return
        if self.sent:
            # A window acknowledged in part: the client missed the next block, so the
            # window starts again after the one it has (RFC 7440 section 4).
            for _, packet in self.sent:
                self._send(packet)
        self._fill()

    # --- blocks out ---

    def _fill(self) -> None:
        """Send blocks until the window is full or the file is over: at once while the
        source has the bytes ready (a local file, a web answer read ahead), else by
        waiting for them."""
        if self.reading or self.finished:
            return
        windowsize = self.terms.windowsize
        try:
            while self.last_block is None and len(self.sent) < windowsize:
                payload = self._payload_now()
                if payload is None:
                    break
                self._emit(payload)
        except FileProblem as problem:
            self._source_failed(problem)
            return
        if self.last_block is None and len(self.sent) < windowsize:
            self.reading = True
            Deferred.fromCoroutine(self._read_more()).addErrback(self._read_failed)
        else:
            self._arm()

    def _emit(self, payload: bytes) -> None:
        number = self.next_block
        self.next_block += 1
        packet = codec.data(number, payload)
        self.sent.append((number, packet))
        self.bytes_sent += len(payload)
        if len(payload) < self.blksize:
            self.last_block = number
        self._send(packet)

    async def _read_more(self) -> None:
        try:
            while (
                not self.finished
                and self.last_block is None
                and len(self.sent) < self.terms.windowsize
            ):
                payload = await self._next_payload()
                if self.finished:
                    return
                self._emit(payload)
            if not self.finished:
                self._arm()
        finally:
            self.reading = False

    def _take(self, chunk: bytes) -> None:
        rest = self.buffer[self.at :]
        self.at = 0
        if not chunk:
            self.at_end = True
            self.buffer = rest
        elif self.encoder is not None:
            self.buffer = rest + self.encoder.encode(chunk)
        else:
            self.buffer = rest + chunk

    def _cut(self) -> bytes:
        payload = self.buffer[self.at : self.at + self.blksize]
        self.at += len(payload)
        return payload

    def _payload_now(self) -> bytes | None:
        while len(self.buffer) - self.at < self.blksize and not self.at_end:
            chunk = self.reader.read_now(max(self.blksize, READ_SIZE))
            if chunk is None:
                return None
            self._take(chunk)
        return self._cut()

    async def _next_payload(self) -> bytes:
        while len(self.buffer) - self.at < self.blksize and not self.at_end:
            # Only what this block lacks: the first block goes out as soon as it is there.
            self._take(await self.reader.read(self.blksize - (len(self.buffer) - self.at)))
        return self._cut()

    def _source_failed(self, problem: FileProblem) -> None:
        self._send(codec.error(codec.NOT_DEFINED, problem.detail[:200]))
        self._finish("failed", problem.detail)

    def _read_failed(self, failure: Any) -> None:
        problem = failure.value
        if isinstance(problem, FileProblem):
            self._source_failed(problem)
            return
        log.failure("TFTP transfer to {client} failed", failure, client=self.client)
        self._send(codec.error(codec.NOT_DEFINED, "the server failed"))
        self._finish("failed", str(problem))

    # --- waiting and sending again ---

    def _expired(self) -> None:
        if self.finished:
            return
        if not self._again("an ACK"):
            self._finish("timeout", f"no ACK after {self.retries} retries")
            return
        if self.oack is not None and self.oack_waiting:
            self._send(self.oack)
        for _, packet in self.sent:
            self._send(packet)
        self._arm()


# What becomes of a finished upload: given its size, stores it and says whether the
# client gets the final ACK (None) or an error (code, text).
Store = Callable[[int], "Deferred[tuple[int, str] | None]"]

DALLY = 3.0  # seconds the final ACK is repeated for a client whose last DATA comes again


class WriteTransfer(_Transfer):
    """One upload: DATA in, each block written to the spool's incoming file before it is
    ACKed; the final ACK only once the file is stored (``store``)."""

    def __init__(
        self,
        client: tuple[str, int],
        upload: Any,
        terms: Terms,
        *,
        netascii: bool,
        timeout: float,
        retries: int,
        max_size: int,
        reactor: Any,
        store: Store,
        done: Done,
    ) -> None:
        super().__init__(
            client, terms, timeout=timeout, retries=retries, reactor=reactor, done=done
        )
        self.upload = upload
        self.decoder = NetasciiDecoder() if netascii else None
        self.max_size = max_size
        self.store = store
        self.received = 0  # absolute number of the last block written
        self.in_window = 0  # blocks since the last ACK
        self.last_answer = codec.oack(terms.reply) if terms.reply else codec.ack(0)
        self.storing = False
        self.ended = False  # stored and ACKed: only repeating the final ACK (dallying)

    def startProtocol(self) -> None:
        self._send(self.last_answer)
        self._arm()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self._from_stranger(addr):
            return
        if self.finished and not self.ended:
            return
        try:
            packet = codec.parse(datagram)
        except TftpError as exc:
            self._fail(exc.code, exc.text)
            return
        if isinstance(packet, codec.Error):
            self._close("aborted", f"the client ended it: error {packet.code} {packet.text}")
            return
        if not isinstance(packet, codec.Data):
            self._fail(codec.ILLEGAL_OPERATION, "expected DATA")
            return
        if self.ended or self.storing:
            if packet.block == self.received & 0xFFFF and self.ended:
                self._send(self.last_answer)  # our final ACK was lost
            return
        expected = (self.received + 1) & 0xFFFF
        if packet.block != expected:
            # A block again (our ACK was lost) or one after a gap: say what we have.
            if self.terms.windowsize > 1 or packet.block == self.received & 0xFFFF:
                self.last_answer = codec.ack(self.received)
                self._send(self.last_answer)
                self.in_window = 0
            return
        data = packet.data
        if len(data) > self.terms.blksize:
            self._fail(codec.ILLEGAL_OPERATION, "a block is larger than the block size")
            return
        if self.upload.size + len(data) > self.max_size:
            self._fail(codec.DISK_FULL, f"the file is larger than {self.max_size} octets")
            return
        try:
            self.upload.write(self.decoder.decode(data) if self.decoder is not None else data)
        except OSError as exc:
            self._fail(codec.DISK_FULL, f"cannot write the file: {exc.strerror or exc}")
            return
        self.received += 1
        self.in_window += 1
        self._heard()
        if len(data) < self.terms.blksize:
            self._last_block()
            return
        if self.in_window >= self.terms.windowsize:
            self.in_window = 0
            self.last_answer = codec.ack(self.received)
            self._send(self.last_answer)
        self._arm()

    def _last_block(self) -> None:
        if self.decoder is not None:
            try:
                self.upload.write(self.decoder.flush())
            except OSError as exc:
                self._fail(codec.DISK_FULL, f"cannot write the file: {exc.strerror or exc}")
                return
        self.storing = True
        self._disarm()
        self.store(self.upload.size).addCallbacks(self._stored, self._store_failed)

    def _stored(self, refusal: tuple[int, str] | None) -> None:
        self.storing = False
        if refusal is not None:
            self._fail(*refusal)
            return
        self.last_answer = codec.ack(self.received)
        self._send(self.last_answer)
        self.ended = True
        self.finished = True
        self.on_done("complete", self.upload.size, "")
        # Dally: the final ACK may be lost, and the client then sends its last DATA again.
        self.timer = self.reactor.callLater(DALLY, self._stop_listening)

    def _store_failed(self, failure: Any) -> None:
        log.failure("storing an upload from {client} failed", failure, client=self.client)
        self.storing = False
        self._fail(codec.NOT_DEFINED, "the server failed to store the file")

    def _fail(self, code: int, text: str) -> None:
        self._send(codec.error(code, text))
        self._close("failed", text)

    def _close(self, outcome: str, detail: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._disarm()
        # Not stored (a stored upload's file has moved into the spool already).
        self.upload.discard()
        self._stop_listening()
        self.on_done(outcome, self.upload.size, detail)

    def abort(self, code: int, text: str) -> None:
        if not self.finished and not self.storing:
            self._fail(code, text)

    def _expired(self) -> None:
        if self.finished or self.storing:
            return
        if not self._again("DATA"):
            self._close("timeout", f"no DATA after {self.retries} retries")
            return
        self._send(self.last_answer)
        self.in_window = 0
        self._arm()
