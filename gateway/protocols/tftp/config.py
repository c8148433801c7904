"""The settings of TFTP listeners and the keys of their routes, as routes.yaml gives them."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import (
    Duration,
    ListenerConfig,
    Network,
    Size,
    doc,
)
from gateway.message import Kind
from gateway.protocols.tftp.codec import MAX_BLKSIZE

LOOPBACK = (Network.parse("127.0.0.0/8"), Network.parse("::1"))


@dataclass(frozen=True, kw_only=True)
class TftpListenerConfig(ListenerConfig):
    """A TFTP server: reads are answered from a folder or a web server, uploads stored and
    delivered to the route's destinations."""

    kind: typing.ClassVar[Kind] = Kind.FILE
    protocol: Literal["tftp"] = "tftp"
    allow: tuple[Network, ...] = field(
        default=LOOPBACK,
        metadata=doc(
            "client networks served; others get an access violation (default: loopback"
            " only, since TFTP has no passwords: list your boot networks)"
        ),
    )
    max_transfers: int = field(
        default=200, metadata=doc("transfers at once; more get 'busy'", positive=True)
    )
    timeout: Duration = field(
        default=Duration(1),
        metadata=doc(
            "first wait for an ACK before a block is sent again (doubling each time);"
            " a client's 'timeout' option sets its own",
            positive=True,
        ),
    )
    retries: int = field(
        default=5, metadata=doc("times a block is sent again before the transfer ends")
    )
    max_blksize: int = field(
        default=MAX_BLKSIZE,
        metadata=doc("the largest 'blksize' granted (RFC 2348: 8 to 65464 octets)"),
    )
    max_size: Size = field(
        default=Size(100 * 1024 * 1024),
        metadata=doc("the largest upload taken (error 3 beyond it)", positive=True),
    )
    max_windowsize: int = field(
        default=64, metadata=doc("the largest 'windowsize' granted (RFC 7440)", positive=True)
    )

    def connection_limit(self) -> int:
        return self.max_transfers

    def __post_init__(self) -> None:
        for endpoint in self.listen:
            if not endpoint.lower().startswith("udp:"):
                raise ValueError(f"TFTP listens on UDP: write 'udp:69', not '{endpoint}'")
        if not 512 <= self.max_blksize <= MAX_BLKSIZE:
            raise ValueError(f"'max_blksize' must be 512 to {MAX_BLKSIZE} octets")
        if not 0 <= self.retries <= 20:
            raise ValueError("'retries' must be 0 to 20")
