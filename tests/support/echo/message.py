"""The ``line`` kind: one line of text, and how the spool stores it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.message import Kind, KindSpec, Message

from .config import LINE


@dataclass(frozen=True, kw_only=True)
class LineMessage(Message):
    kind: ClassVar[Kind] = LINE
    text: str = ""


def _encode(message: LineMessage) -> tuple[dict[str, Any], bytes]:
    return {}, message.text.encode("utf-8")


def _decode(meta: Mapping[str, Any], body: bytes, common: dict[str, Any]) -> Message:
    return LineMessage(text=body.decode("utf-8"), **common)


LINE_KIND = KindSpec(LINE, LineMessage, _encode, _decode)
