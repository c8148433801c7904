"""The echo listener: lines in, messages out, +OK once stored."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from gateway.config import Match
from gateway.listening import Admission, StreamListener, message_metric
from gateway.message import Message
from gateway.ports import GatewayPort, Metric, Status, Verdict
from gateway.routing import search_groups

from .config import EchoListenerConfig, EchoMatch
from .message import LineMessage


class EchoLine(LineOnlyReceiver):
    delimiter = b"\n"

    def __init__(self, listener: EchoListener) -> None:
        self.listener = listener
        self.host = ""

    def connectionMade(self) -> None:
        self.host = getattr(self.transport.getPeer(), "host", "")
        admission = self.listener.guard.connect(self, self.host)
        if admission is not Admission.OK:
            self.transport.write(f"-ERR {admission}\n".encode())
            self.transport.loseConnection()
            return
        self.sendLine(self.listener.config.greeting.encode())

    def connectionLost(self, reason: Any = None) -> None:
        self.listener.guard.disconnect(self)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        message = LineMessage(text=text, listener=self.listener.name, client=self.host)
        d = Deferred.fromCoroutine(self.listener.gateway.submit(message))
        d.addCallback(self._answer)

    def _answer(self, verdict: Verdict) -> None:
        self.listener.count(verdict)
        if verdict.status is Status.DELIVERED:
            self.sendLine(f"+OK {verdict.queue_id}".encode())
        else:
            self.sendLine(f"-ERR {verdict.reason}: {verdict.detail}".encode())


class _Factory(Factory):
    def __init__(self, listener: EchoListener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: Any) -> EchoLine:
        return EchoLine(self.listener)


class EchoListener(StreamListener[EchoListenerConfig]):
    def __init__(self, config: EchoListenerConfig, gateway: GatewayPort, reactor: Any) -> None:
        super().__init__(config, gateway, reactor)
        self.rejected = 0
        self.tempfail = 0
        self._factory = _Factory(self)

    def factory(self) -> _Factory:
        return self._factory

    def count(self, verdict: Verdict) -> None:
        if verdict.status is Status.DELIVERED:
            self.accepted += 1
        elif verdict.status is Status.TEMPORARY:
            self.tempfail += 1
        else:
            self.rejected += 1

    def metrics(self) -> Iterable[Metric]:
        yield from super().metrics()
        yield message_metric(self.name, self.accepted, self.rejected, self.tempfail)


def match_line(
    match: Match, message: Message, rcpt: str | None, groups: dict[str, str], headers: bool
) -> bool:
    pattern = match.view(EchoMatch).text
    if pattern is None:
        return True
    return isinstance(message, LineMessage) and search_groups(pattern, message.text, groups)
