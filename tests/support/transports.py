"""A transport for the server shells' flow tests: one whose client stops reading."""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.internet.testing import StringTransport


class SmallBufferTransport(StringTransport):
    """Calls the registered producer's pauseProducing once 1,000 octets are unsent,
    as a TCP transport does when the peer stops reading."""

    def __init__(self, peer: IAddress) -> None:
        super().__init__(peerAddress=peer)
        self.full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > 1000 and not self.full and self.producer is not None:
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """What the client reads now; the producer is resumed if the buffer was full."""
        data = self.value()
        self.clear()
        if self.full and self.producer is not None:
            self.full = False
            self.producer.resumeProducing()
        return data
