"""The protocol registry: which ``protocol:`` names exist and what each one brings.

Each built-in protocol package has a module ``entry.py`` whose ``PROTOCOLS``
holds its ``ProtocolEntry`` values (see ``gateway.ports``); they are listed in
``BUILTIN`` below.  Installed packages add theirs through the entry point group
``gateway.protocols``: an entry point names a ``ProtocolEntry``, a sequence of
them, or a module with ``PROTOCOLS``.  The core builds its tables (the config
classes per ``protocol:``, the match and route keys, the JSON schema, the
builders) from ``registry()`` and imports no protocol module itself.

Importing this package loads no protocol: ``registry()`` does, the first time
it is called, so that a codec (``gateway.protocols.smtp.codec``) imports
without Twisted.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.message import register_kind
from gateway.ports import DestinationEntry, ListenerEntry, ProtocolEntry

__all__ = ["BUILTIN", "AddedKey", "Registry", "RegistryError", "registry"]

# The modules holding the built-in protocols' entries (``PROTOCOLS``), in the order
# `gateway schema` lists them.
BUILTIN = (
    "gateway.protocols.smtp.entry",
    "gateway.protocols.maildir.entry",
    "gateway.protocols.nntp.entry",
    "gateway.protocols.dns.entry",
    "gateway.protocols.http.entry",
    "gateway.protocols.tftp.entry",
    "gateway.protocols.ftp.entry",
    "gateway.protocols.folder.entry",
    "gateway.protocols.sftp.entry",
)

ENTRY_POINT_GROUP = "gateway.protocols"


class RegistryError(Exception):
    """A protocol package could not be loaded or contradicts another; the text says which."""


@dataclass(frozen=True)
class AddedKey:
    """A key protocols add to ``match:`` or to routes: its type, help and who declares it."""

    name: str
    hint: Any
    field: dataclasses.Field[Any]
    owners: tuple[str, ...]  # protocol names whose routes may use it


class Registry:
    """Every known protocol, with the tables the core reads."""

    def __init__(self, entries: Iterable[ProtocolEntry]) -> None:
        self.protocols: dict[str, ProtocolEntry] = {}
        self.listeners: dict[str, ListenerEntry] = {}
        self.destinations: dict[str, DestinationEntry] = {}
        self._match_keys: dict[str, dict[str, AddedKey]] = {}  # by protocol
        match_keys: dict[str, AddedKey] = {}
        route_keys: dict[str, AddedKey] = {}
        for entry in entries:
            if entry.name in self.protocols:
                raise RegistryError(
                    f"protocol '{entry.name}' is registered twice (the second time by"
                    f" {_origin(entry)})"
                )
            self.protocols[entry.name] = entry
            for spec in entry.kinds:
                try:
                    register_kind(spec)
                except ValueError as exc:
                    raise RegistryError(str(exc)) from None
            if entry.listener is not None:
                self.listeners[entry.name] = entry.listener
                self._match_keys[entry.name] = {}
                for key in _keys(entry.name, entry.listener.match):
                    _merge(match_keys, key, "match key")
                    self._match_keys[entry.name][key.name] = key
                for key in _keys(entry.name, entry.listener.route):
                    _merge(route_keys, key, "route key")
            if entry.destination is not None:
                self.destinations[entry.name] = entry.destination
        self.match_keys: Mapping[str, AddedKey] = types.MappingProxyType(match_keys)
        self.route_keys: Mapping[str, AddedKey] = types.MappingProxyType(route_keys)

    def match_keys_of(self, protocol: str) -> frozenset[str]:
        """The match keys routes from ``protocol`` listeners may use (``client`` included)."""
        return frozenset({"client", *self._match_keys.get(protocol, {})})

    def listener(self, protocol: str) -> ListenerEntry:
        try:
            return self.listeners[protocol]
        except KeyError:
            raise RegistryError(f"no listener protocol '{protocol}'") from None

    def destination(self, protocol: str) -> DestinationEntry:
        try:
            return self.destinations[protocol]
        except KeyError:
            raise RegistryError(f"no destination protocol '{protocol}'") from None


def _origin(entry: ProtocolEntry) -> str:
    side = entry.listener or entry.destination
    return side.config.__module__ if side is not None else "an empty entry"


def _keys(protocol: str, cls: type | None) -> list[AddedKey]:
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        name = f.metadata.get("yaml", f.name)
        if name is not None:
            out.append(AddedKey(name, hints[f.name], f, (protocol,)))
    return out


def _merge(table: dict[str, AddedKey], key: AddedKey, what: str) -> None:
    known = table.get(key.name)
    if known is None:
        table[key.name] = key
        return
    if known.hint != key.hint:
        raise RegistryError(
            f"{what} '{key.name}' of protocol '{key.owners[0]}' has another type than the"
            f" one of protocol '{known.owners[0]}' ({key.hint!r} and {known.hint!r})"
        )
    table[key.name] = dataclasses.replace(known, owners=(*known.owners, *key.owners))


def _entries_of(value: object, where: str) -> list[ProtocolEntry]:
    if isinstance(value, types.ModuleType):
        value = getattr(value, "PROTOCOLS", None)
    if isinstance(value, ProtocolEntry):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, ProtocolEntry) for v in value):
        return list(value)
    raise RegistryError(
        f"{where} is not a ProtocolEntry, a sequence of them, or a module with PROTOCOLS"
    )


def load(*, entry_points: bool = True) -> Registry:
    """The built-in protocols and, with ``entry_points``, the installed ones."""
    entries: list[ProtocolEntry] = []
    for name in BUILTIN:
        entries.extend(_entries_of(importlib.import_module(name), name))
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            where = f"protocol entry point '{ep.name}' ({ep.value})"
            try:
                loaded = ep.load()
            except Exception as exc:
                raise RegistryError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
            entries.extend(_entries_of(loaded, where))
    return Registry(entries)


@functools.cache
def registry() -> Registry:
    """The registry of this process, loaded once on first use."""
    return load()
