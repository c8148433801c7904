"""One TFTP read transfer: blocks out, ACKs in, on a port of its own (RFC 1350's TID).

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
from gateway.protocols.tftp.codec import NetasciiEncoder, Terms, TftpError

log = Logger(namespace="gateway.tftp")

# (outcome: complete | timeout | aborted | failed, bytes sent, detail)
Done = Callable[[str, int, str], None]

MAX_WAIT = 16.0  # seconds: the longest wait between retries, however it doubled


class ReadTransfer(DatagramProtocol):
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
        self.client = client
        self.reader = reader
        self.terms = terms
        self.encoder = NetasciiEncoder() if netascii else None
        self.timeout = terms.timeout or timeout
        self.retries = retries
        self.reactor = reactor
        self.on_done = done
        self.blksize = terms.blksize
        self.sent: list[tuple[int, bytes]] = []  # (absolute block number, packet) not yet ACKed
        self.acked = 0  # absolute number of the last block ACKed (0: the OACK, or nothing)
        self.next_block = 1
        self.last_block: int | None = None  # the short block that ends the file, once read
        self.buffer = b""
        self.at_end = False
        self.bytes_sent = 0
        self.tries = 0
        self.wait = self.timeout
        self.timer: Any = None
        self.reading = False
        self.finished = False
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
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.reader.close()
        udp: Any = self.transport  # zope's interfaces type its methods without self
        if udp is not None:
            udp.stopListening()
        self.on_done(outcome, self.bytes_sent, detail)

    def abort(self, code: int, text: str) -> None:
        """End the transfer now, telling the client why (shutdown, say)."""
        if not self.finished:
            self._send(codec.error(code, text))
            self._finish("aborted", text)

    # --- packets in ---

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.finished:
            return
        if (addr[0], addr[1]) != self.client:
            # Another port: not this transfer's peer (RFC 1350 section 4).
            self._send(codec.error(codec.UNKNOWN_TID, "unknown transfer ID"), addr)
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
                self.tries = 0
                self.wait = self.timeout
                self._fill()
            return
        # Which of the blocks in flight (or the one acknowledged last) this 16-bit number is.
        newest = self.sent[-1][0] if self.sent else self.acked
        number = next((n for n in range(newest, self.acked, -1) if n & 0xFFFF == block), None)
        if number is None:
            return  # an old or duplicate ACK: ignored, never answered with data
        self.acked = number
        self.sent = [(n, p) for n, p in self.sent if n > number]
        self.tries = 0
        self.wait = self.timeout
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
        """Read and send blocks until the window is full or the file is over."""
        if self.reading or self.finished:
            return
        self.reading = True
        Deferred.fromCoroutine(self._read_more()).addErrback(self._read_failed)

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
                number = self.next_block
                self.next_block += 1
                packet = codec.data(number, payload)
                self.sent.append((number, packet))
                self.bytes_sent += len(payload)
                if len(payload) < self.blksize:
                    self.last_block = number
                self._send(packet)
            if not self.finished:
                self._arm()
        finally:
            self.reading = False

    async def _next_payload(self) -> bytes:
        while len(self.buffer) < self.blksize and not self.at_end:
            chunk = await self.reader.read(max(self.blksize, 8192))
            if not chunk:
                self.at_end = True
            elif self.encoder is not None:
                self.buffer += self.encoder.encode(chunk)
            else:
                self.buffer += chunk
        payload, self.buffer = self.buffer[: self.blksize], self.buffer[self.blksize :]
        return payload

    def _read_failed(self, failure: Any) -> None:
        problem = failure.value
        if isinstance(problem, FileProblem):
            self._send(codec.error(codec.NOT_DEFINED, problem.detail[:200]))
            self._finish("failed", problem.detail)
            return
        log.failure("TFTP transfer to {client} failed", failure, client=self.client)
        self._send(codec.error(codec.NOT_DEFINED, "the server failed"))
        self._finish("failed", str(problem))

    # --- waiting and sending again ---

    def _arm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.wait)  # cheaper than a new call for every block
        else:
            self.timer = self.reactor.callLater(self.wait, self._expired)

    def _expired(self) -> None:
        if self.finished:
            return
        self.tries += 1
        if self.tries > self.retries:
            self._send(codec.error(codec.NOT_DEFINED, "timed out waiting for an ACK"))
            self._finish("timeout", f"no ACK after {self.retries} retries")
            return
        self.wait = min(self.wait * 2, MAX_WAIT)
        if self.oack is not None and self.oack_waiting:
            self._send(self.oack)
        for _, packet in self.sent:
            self._send(packet)
        self._arm()

    def _send(self, packet: bytes, to: tuple[str, int] | None = None) -> None:
        udp: Any = self.transport
        if udp is not None:
            udp.write(packet, to or self.client)
