"""Transforms: plain functions registered by name, built in or loaded from plugins.

A plugin is a Python module in one of the ``plugins:`` folders, or an installed
package exposing the ``gateway.plugins`` entry point group.  It marks functions
with ``@transform("name")``; nothing else is required of it::

    from gateway.plugins import transform

    @transform("strip_footer")
    def strip_footer(msg, options):
        return msg.replace_body(msg.body.split(b"\\n-- \\n")[0])

A transform gets the message and the route's options (placeholders already
filled from the match) and returns a message, ``None`` to drop it, a list to
fan out, or a Deferred or coroutine of one of those.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.message import Kind, Message
from gateway.ports import Reason

__all__ = [
    "Option",
    "PluginError",
    "Reject",
    "TransformSpec",
    "Transforms",
    "load_transforms",
    "transform",
]

log = Logger(namespace="gateway.plugins")

TransformResult = Message | None | list[Message]
TransformFunc = Callable[[Any, Mapping[str, Any]], Any]
F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__gateway_transform__"


@dataclass(frozen=True)
class Option:
    """One route option a transform takes, declared with the transform (as mitmproxy's add-ons
    declare theirs): ``gateway check`` refuses a route that misses a required one, misspells
    one or gives one of the wrong type, and ``gateway schema`` lists them.

    ``secret``: see the field.  ``type`` is ``str``, ``bool``, ``int``, ``float``,
    ``list[str]``, ``dict[str, str]``,
    or a union of these (``str | list[str]``: one address or several).  A string holding a
    ``{placeholder}`` stands for any type: it is filled in per message.
    """

    name: str
    type: Any = str
    required: bool = False
    help: str = ""
    # A password or key: routes may give it as NAME_file (a file holding it) or with
    # ${ENV_VAR} in it, so that routes.yaml can be committed.
    secret: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` (as routes.yaml gave it) is not of this option's type, or None."""
        if isinstance(value, str) and _PLACEHOLDER.search(value):
            return None
        if _is_a(value, self.type):
            return None
        return f"expected {_describe_type(self.type)}, got {_describe_value(value)}"

    def schema(self) -> dict[str, Any]:
        schema = _json_type(self.type)
        if self.help:
            schema["description"] = self.help
        if self.secret:
            schema["secret"] = True  # json_schema adds NAME_file for it (and drops this)
        return schema


_PLACEHOLDER = re.compile(r"(?<!\{)\{[A-Za-z_][A-Za-z0-9_]*\}(?!\})")
_BOOL_WORDS = ("true", "false", "yes", "no", "on", "off")


def _is_a(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_is_a(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_is_a(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, Mapping) and all(
            _is_a(k, args[0]) and _is_a(v, args[1]) for k, v in value.items()
        )
    if hint is bool:
        return isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_WORDS)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        # Numbers are written as they are (a list id of digits, say): text is what they mean.
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if hint is Any:
        return True
    raise TypeError(f"an option cannot be of type {hint!r}")


def _describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe_type(a) for a in args)
    if origin is list:
        return f"a list of {_describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping of names to text"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(
        hint, "any value"
    )


def _describe_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing"
    return repr(value)


def _json_type(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return {"anyOf": [_json_type(a) for a in args]}
    if origin is list:
        return {"type": "array", "items": _json_type(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _json_type(args[1])}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return {"type": simple[hint]} if hint in simple else {}


@dataclass(frozen=True)
class TransformSpec:
    """A registered transform.

    ``accepts`` is the set of kinds it takes (empty: any); ``produces`` is the
    kind it turns them into (None: the kind it was given).  ``one_copy``: the
    recipients of a route with this transform travel as one copy even when
    their named groups differ; option values that differ between them are
    joined with "," (see ``Router.match``).  ``options``: the route options it
    takes, or None when it does not say (then any option is let through).
    """

    name: str
    func: TransformFunc
    accepts: frozenset[Kind]
    produces: Kind | None
    origin: str
    one_copy: bool = False
    options: tuple[Option, ...] | None = None

    def output_kind(self, kind: Kind) -> Kind:
        return self.produces if self.produces is not None else kind


def transform(
    name: str,
    *,
    accepts: Iterable[Kind | str] = (),
    produces: Kind | str | None = None,
    one_copy: bool = False,
    options: Iterable[Option] | None = None,
) -> Callable[[F], F]:
    """Register the decorated function as the transform ``name``.

    ``one_copy=True`` makes every recipient of a mail that takes a route with
    this transform travel in one copy (a crosspost, for ``mail_to_news``)
    instead of one copy per distinct set of named groups.  ``options`` declares
    the route options it takes (``Option``); a transform that declares them
    has them checked before the gateway starts.
    """
    declared = None if options is None else tuple(options)
    if declared is not None:
        names = [o.name for o in declared]
        if len(set(names)) != len(names):
            raise PluginError(f"transform '{name}' declares an option twice")
        for option in declared:
            _json_type(option.type)
            _is_a(None, option.type)  # raises TypeError for a type options cannot have

    def mark(func: F) -> F:
        spec = TransformSpec(
            name=name,
            func=func,
            accepts=frozenset(Kind(k) for k in accepts),
            produces=Kind(produces) if produces is not None else None,
            origin=_origin(func),
            one_copy=one_copy,
            options=declared,
        )
        setattr(func, _MARK, spec)
        return func

    return mark


def _origin(func: Callable[..., Any]) -> str:
    """Where a transform is written, for people: its file and line, and its name."""
    code = getattr(func, "__code__", None)
    qualname = getattr(func, "__qualname__", repr(func))
    if code is None:
        return f"{getattr(func, '__module__', '?')}.{qualname}"
    return f"{code.co_filename}:{code.co_firstlineno} ({qualname})"


class PluginError(Exception):
    """A plugin could not be loaded; the message says which and why."""


class Reject(Exception):
    """Raised by a transform to refuse a message for good; ``detail`` is what the sender sees.

    Any other exception out of a transform is a temporary failure (the sender
    may try again); a Reject is permanent.  ``reason`` says why in no protocol's
    words, and each listener answers with its own code for it: a ``POLICY``
    refusal is ``550 5.7.1`` in SMTP, ``441`` in NNTP and ``403`` in HTTP, a
    ``BAD_MESSAGE`` one ``550 5.6.0``, ``441`` and ``400``.
    """

    def __init__(self, detail: str, *, reason: Reason = Reason.POLICY) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


class Transforms:
    """The transforms available to the router, by name."""

    def __init__(self, specs: Iterable[TransformSpec] = ()) -> None:
        self._specs: dict[str, TransformSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: TransformSpec) -> None:
        existing = self._specs.get(spec.name)
        if existing is not None and existing.func is not spec.func:
            raise PluginError(
                f"transform '{spec.name}' is defined twice:"
                f" in {existing.origin} and in {spec.origin}"
            )
        self._specs[spec.name] = spec

    def add_module(self, module: types.ModuleType) -> int:
        count = 0
        for value in vars(module).values():
            spec = getattr(value, _MARK, None)
            if isinstance(spec, TransformSpec):
                self.add(spec)
                count += 1
        return count

    def get(self, name: str) -> TransformSpec | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[TransformSpec]:
        return [self._specs[name] for name in sorted(self._specs)]

    def __contains__(self, name: object) -> bool:
        return name in self._specs


async def call_transform(
    spec: TransformSpec, message: Message, options: Mapping[str, Any]
) -> list[Message]:
    """Run one transform and normalise what it returns to a list of messages.

    Exceptions propagate: the caller fails the one message and logs the route.
    """
    result: Any = spec.func(message, options)
    if isinstance(result, Deferred) or inspect.isawaitable(result):
        result = await _await(result)
    if result is None:
        return []
    if isinstance(result, Message):
        return [result]
    if isinstance(result, (list, tuple)) and all(isinstance(m, Message) for m in result):
        return list(result)
    raise TypeError(
        f"transform '{spec.name}' returned {type(result).__name__}; expected a message, None,"
        " a list of messages, or a Deferred/coroutine of one of those"
    )


async def _await(value: Awaitable[Any]) -> Any:
    return await value


def _load_file(path: Path, index: int) -> types.ModuleType:
    name = f"gateway_plugin_{index}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot load plugin {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise PluginError(f"plugin {path} failed to load: {type(exc).__name__}: {exc}") from exc
    return module


def load_transforms(folders: Iterable[str | Path] = (), *, entry_points: bool = True) -> Transforms:
    """The built-in transforms plus those of every plugin module and entry point.

    Plugin folders are read afresh on every call, so a reload picks up edits.
    """
    from gateway import transforms as builtin

    registry = Transforms()
    for module in builtin.modules():
        registry.add_module(module)
    index = 0
    for folder in folders:
        path = Path(folder)
        if not path.is_dir():
            raise PluginError(f"plugin folder {path} does not exist")
        for file in sorted(path.glob("*.py")):
            if file.name.startswith("_"):
                continue
            index += 1
            registry.add_module(_load_file(file, index))
    if entry_points:
        for ep in importlib.metadata.entry_points(group="gateway.plugins"):
            try:
                loaded = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin entry point '{ep.name}' ({ep.value}) failed to load: {exc}"
                ) from exc
            if isinstance(loaded, types.ModuleType):
                registry.add_module(loaded)
            elif isinstance(getattr(loaded, _MARK, None), TransformSpec):
                registry.add(getattr(loaded, _MARK))
            else:
                raise PluginError(
                    f"plugin entry point '{ep.name}' ({ep.value}) is neither a module nor a"
                    " function marked with @transform"
                )
    return registry
