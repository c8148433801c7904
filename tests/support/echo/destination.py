"""The echo-file destination: appends each line to a file."""

from __future__ import annotations

from typing import Any

from gateway.message import Message
from gateway.ports import Deliverer, Outcome

from .config import LINE, EchoFileConfig
from .message import LineMessage


class EchoFile(Deliverer):
    kinds = frozenset({LINE})

    def __init__(self, config: EchoFileConfig, reactor: Any) -> None:
        self.name = config.name
        self.path = config.path

    async def deliver(self, message: Message) -> Outcome:
        if not isinstance(message, LineMessage):
            return Outcome.permanent(f"echo-file takes lines, not {message.kind}")
        try:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(message.text + "\n")
        except OSError as exc:
            return Outcome.temporary(f"cannot append to {self.path}: {exc}")
        return Outcome.delivered(f"appended to {self.path}")

    async def close(self) -> None:
        return None
