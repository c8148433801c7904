"""DNS destinations: forward queries to DNS servers or to a DNS-over-HTTPS server.

These are request/response destinations (``Resolver``): ``ask`` calls back
with the answer, or with the reason there is none.  They take no stored
messages.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.message import Kind
from gateway.ports import OnAnswer, OnError, Resolver
from gateway.protocols.dns.client import DnsUpstream, UpstreamError
from gateway.protocols.dns.config import DnsDestinationConfig, DohDestinationConfig
from gateway.protocols.dns.wire import Question


class DnsDestination(Resolver[Question]):
    kinds = frozenset({Kind.DNS})

    def __init__(self, config: DnsDestinationConfig, reactor: Any) -> None:
        self.config = config
        self.name = config.name
        self.upstream = DnsUpstream(
            reactor, [(s.host, s.port) for s in config.servers], float(config.timeout)
        )

    def resolve(self, data: bytes, question: Question) -> Deferred[bytes]:
        """The upstream's answer; fails with UpstreamError when no server answers."""
        return self.upstream.resolve(data, question)

    def ask(self, data: bytes, question: Question, on_answer: OnAnswer, on_error: OnError) -> None:
        """resolve() with plain callbacks (DnsUpstream.ask): the listener's fast path."""
        self.upstream.ask(data, question, on_answer, on_error)

    async def close(self) -> None:
        self.upstream.close()


class DohDestination(Resolver[Question]):
    kinds = frozenset({Kind.DNS})

    def __init__(self, config: DohDestinationConfig, reactor: Any) -> None:
        from gateway.protocols.dns.doh_client import DohUpstream

        self.config = config
        self.name = config.name
        self.upstream = DohUpstream(
            reactor,
            config.url,
            method=config.method,
            ca_file=config.ca,
            verify=config.verify,
            connections=config.connections,
            timeout=float(config.timeout),
        )

    def resolve(self, data: bytes, question: Question) -> Deferred[bytes]:
        """The DoH server's answer; fails with UpstreamError on any failure."""
        return Deferred.fromCoroutine(self.upstream.resolve(data, question))

    def ask(self, data: bytes, question: Question, on_answer: OnAnswer, on_error: OnError) -> None:
        def failed(failure: Failure) -> None:
            # An UpstreamError is the reason there is no answer; anything else is a bug.
            value = failure.value
            on_error(value if isinstance(value, UpstreamError) else failure)

        self.resolve(data, question).addCallbacks(on_answer, failed)

    async def close(self) -> None:
        closing: Any = self.upstream.close()
        if closing is not None:
            await closing
