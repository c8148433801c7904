"""The settings of the echo listener and the echo-file destination."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import ConfigPath, DestinationConfig, ListenerConfig, Pattern, doc
from gateway.message import Kind

LINE = Kind("line")


@dataclass(frozen=True, kw_only=True)
class EchoListenerConfig(ListenerConfig):
    """Each line a client sends becomes a message; it reads +OK once that is stored."""

    kind: typing.ClassVar[Kind] = LINE
    protocol: Literal["echo"] = "echo"
    greeting: str = field(default="echo ready", metadata=doc("what a client reads first"))
    max_connections: int = field(default=100, metadata=doc("clients connected at once"))

    def connection_limit(self) -> int:
        return self.max_connections


@dataclass(frozen=True, kw_only=True)
class EchoFileConfig(DestinationConfig):
    """Appends each line to a file."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({LINE})
    protocol: Literal["echo-file"] = "echo-file"
    path: ConfigPath = field(metadata=doc("the file"))


@dataclass(frozen=True, kw_only=True)
class EchoMatch:
    """The match keys of routes from echo listeners."""

    text: Pattern | None = field(default=None, metadata=doc("the line (regex)"))
