"""Transforms that ship with the gateway; each module registers its own with @transform."""

from __future__ import annotations

import importlib
import types

_MODULES = (
    "gateway.transforms.file_mail",
    "gateway.transforms.headers",
    "gateway.transforms.http_mail",
    "gateway.transforms.mail_to_news",
    "gateway.transforms.news_to_mail",
)


def modules() -> list[types.ModuleType]:
    return [importlib.import_module(name) for name in _MODULES]
