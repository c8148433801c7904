"""The router: which routes a message takes, and the transforms applied on the way.

Routes are tried in file order and the first that matches wins, unless it says
``continue: true``, in which case later routes may match as well (fan-out).
Mail is routed per recipient, like an MTA does: recipients that take the same
route with the same named groups travel together as one copy.  A route with a
transform registered ``one_copy=True`` (``mail_to_news``) takes all its
recipients in one copy, their option values joined (a crosspost).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from twisted.logger import Logger

from gateway.config import (
    BaseDestinationConfig,
    Config,
    Match,
    Pattern,
    Problem,
    Route,
    client_allowed,
    doc,
    interpolate,
    read_secret_file,
    readable_by_others,
    secret_value,
    suggest,
)
from gateway.message import Article, Kind, MailMessage, Message
from gateway.plugins import Option, Reject, Transforms, TransformSpec, call_transform
from gateway.ports import Matcher
from gateway.protocols import registry

log = Logger(namespace="gateway.routing")


class NoRoute(Exception):
    """No route takes this message (or these recipients)."""

    def __init__(self, message: str, recipients: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.recipients = recipients


class TransformFailed(Exception):
    """A transform raised or returned nonsense; only this message fails."""

    def __init__(self, route: str, transform: str, error: BaseException) -> None:
        super().__init__(
            f"transform '{transform}' of route '{route}' failed: {type(error).__name__}: {error}"
        )
        self.route = route
        self.transform = transform
        self.error = error

    @property
    def rejected(self) -> Reject | None:
        """The Reject the transform raised: the message is refused for good, not retried."""
        return self.error if isinstance(self.error, Reject) else None


@dataclass(frozen=True)
class Routed:
    """One message ready for its destinations, as a route left it."""

    route: Route
    message: Message
    destinations: tuple[str, ...]


@dataclass
class Trace:
    """What happened while routing, for ``gateway route --dry-run``."""

    steps: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.steps.append(text)


def search_groups(pattern: Pattern, value: str, groups: dict[str, str]) -> bool:
    """Whether ``pattern`` is found in ``value``; its named groups are added to ``groups``."""
    found = pattern.compiled.search(value)
    if found is None:
        return False
    groups.update({k: v for k, v in found.groupdict().items() if v is not None})
    return True


# --- the match keys of mail and news ---------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MailMatch:
    """The match keys of routes from listeners of mail (SMTP, and any that produce mail)."""

    rcpt: Pattern | None = field(default=None, metadata=doc("envelope recipient (regex)"))
    sender: Pattern | None = field(default=None, metadata=doc("envelope sender (regex)"))
    header: Mapping[str, Pattern] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=doc("header name to regex; every one must match a field of that name"),
    )


@dataclass(frozen=True, kw_only=True)
class ArticleMatch:
    """The match keys of routes from listeners of news articles (NNTP, the NNTP poller)."""

    header: Mapping[str, Pattern] = field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata=doc("header name to regex; every one must match a field of that name"),
    )


def match_header(patterns: Mapping[str, Pattern], message: Message, groups: dict[str, str]) -> bool:
    """Every pattern matches some field of its name in the message's header."""
    if not patterns:
        return True
    if not isinstance(message, (MailMessage, Article)):
        return False
    fields = message.headers
    for name, pattern in patterns.items():
        if not any(search_groups(pattern, v, groups) for v in fields.get_all(name)):
            return False
    return True


def match_mail(
    match: Match, message: Message, rcpt: str | None, groups: dict[str, str], headers: bool
) -> bool:
    """The Matcher of mail: sender, recipient, then (once it is known) the header."""
    keys = match.view(MailMatch)
    if isinstance(message, MailMessage):
        if keys.sender is not None and not search_groups(keys.sender, message.sender, groups):
            return False
        if keys.rcpt is not None and not search_groups(keys.rcpt, rcpt or "", groups):
            return False
    return not headers or match_header(keys.header, message, groups)


def match_article(
    match: Match, message: Message, rcpt: str | None, groups: dict[str, str], headers: bool
) -> bool:
    """The Matcher of news articles: the header."""
    return not headers or match_header(match.view(ArticleMatch).header, message, groups)


def join_option_values(values: Sequence[Any]) -> Any:
    """One option value for recipients that travel as one copy, from each one's value.

    Equal values stay as they are; differing strings become their distinct
    values joined with "," in recipient order ("g1,g2"); lists become their
    distinct items in order; mappings are joined key by key.
    """
    first = values[0]
    if all(v == first for v in values[1:]):
        return first
    if all(isinstance(v, Mapping) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return MappingProxyType(
            {k: join_option_values([v[k] for v in values if k in v]) for k in keys}
        )
    if all(isinstance(v, (tuple, list)) for v in values):
        items: list[Any] = []
        for value in values:
            items.extend(item for item in value if item not in items)
        return tuple(items)
    if all(isinstance(v, str) for v in values):
        return ",".join(dict.fromkeys(values))
    # Placeholders only ever change strings, so the shapes agree; keep the first if not.
    return first


@dataclass(frozen=True)
class _Copy:
    """Recipients of one route that travel as one copy, and their distinct named groups."""

    route: Route
    groups: tuple[dict[str, str], ...]
    recipients: tuple[str, ...]
    one_copy: str | None  # the transform that asked for one copy, if one did


# A route and its named groups, or the route alone when all its recipients go as one copy.
_CopyKey = tuple[int, tuple[tuple[str, str], ...] | None]


class Router:
    """Routes of one configuration, indexed by listener; immutable once built."""

    def __init__(self, config: Config, transforms: Transforms) -> None:
        self.config = config
        self.transforms = transforms
        by_listener: dict[str, list[Route]] = {name: [] for name in config.listeners}
        for route in config.routes:
            for name in route.from_:
                by_listener.setdefault(name, []).append(route)
        self._routes = {name: tuple(routes) for name, routes in by_listener.items()}
        protocols = registry()
        self._matchers: dict[str, Matcher | None] = {
            name: protocols.listener(listener.protocol).matcher
            for name, listener in config.listeners.items()
        }

    def routes_for(self, listener: str) -> tuple[Route, ...]:
        return self._routes.get(listener, ())

    # --- matching -------------------------------------------------------------

    def _match(
        self, route: Route, msg: Message, rcpt: str | None, *, headers: bool = True
    ) -> dict[str, str] | None:
        m = route.match
        if m.client and not client_allowed(m.client, msg.client):
            return None
        if m.authenticated is not None and m.authenticated != bool(msg.user):
            return None
        if m.user and msg.user not in m.user:
            return None
        groups: dict[str, str] = {}
        matcher = self._matchers.get(msg.listener)
        if matcher is not None and not matcher(m, msg, rcpt, groups, headers):
            return None
        return groups

    def _walk(
        self, msg: Message, rcpt: str | None, *, headers: bool = True
    ) -> list[tuple[Route, dict[str, str]]]:
        found = []
        for route in self.routes_for(msg.listener):
            groups = self._match(route, msg, rcpt, headers=headers)
            if groups is None:
                continue
            found.append((route, groups))
            if not route.continue_:
                break
        return found

    def accepts_recipient(
        self, listener: str, sender: str, rcpt: str, client: str, user: str = ""
    ) -> bool:
        """Whether some route could take this recipient (before the header is known).

        Used at RCPT time so the gateway never accepts mail it has nowhere to send:
        it is not an open relay.
        """
        probe = MailMessage(
            listener=listener, client=client, user=user, sender=sender, recipients=(rcpt,)
        )
        return bool(self._walk(probe, rcpt, headers=False))

    def _one_copy(self, route: Route) -> str | None:
        """The first transform of ``route`` registered with ``one_copy=True``, or None."""
        for name in route.transforms:
            spec = self.transforms.get(name)
            if spec is not None and spec.one_copy:
                return name
        return None

    def match(self, msg: Message) -> list[tuple[Route, dict[str, str], tuple[str, ...]]]:
        """The routes ``msg`` takes: (route, named groups, recipients) in route order.

        Mail recipients of a route travel as one copy when their named groups
        are equal, or always when a transform of the route is registered with
        ``one_copy=True``; the groups of such a copy are the distinct values of
        each joined with ",".  Raises NoRoute naming the recipients no route takes.
        """
        return [
            (c.route, dict(join_option_values(c.groups)), c.recipients) for c in self._copies(msg)
        ]

    def _copies(self, msg: Message) -> list[_Copy]:
        if isinstance(msg, MailMessage):
            grouped: dict[_CopyKey, list[str]] = {}
            group_sets: dict[_CopyKey, list[dict[str, str]]] = {}
            routes: dict[int, Route] = {}
            unrouted = []
            for rcpt in msg.recipients:
                walked = self._walk(msg, rcpt)
                if not walked:
                    unrouted.append(rcpt)
                for route, groups in walked:
                    one = self._one_copy(route) is not None
                    key: _CopyKey = (id(route), None if one else tuple(sorted(groups.items())))
                    routes[id(route)] = route
                    grouped.setdefault(key, []).append(rcpt)
                    sets = group_sets.setdefault(key, [])
                    if groups not in sets:
                        sets.append(groups)
            if unrouted:
                raise NoRoute(f"no route takes recipient(s) {', '.join(unrouted)}", tuple(unrouted))
            order = {id(r): i for i, r in enumerate(self.routes_for(msg.listener))}
            return [
                _Copy(
                    routes[key[0]],
                    tuple(dict(g) for g in group_sets[key]),
                    tuple(rcpts),
                    self._one_copy(routes[key[0]]),
                )
                for key, rcpts in sorted(grouped.items(), key=lambda kv: order[kv[0][0]])
            ]
        walked = self._walk(msg, None)
        if not walked:
            raise NoRoute(f"no route takes this {msg.kind} message from '{msg.listener}'")
        return [_Copy(route, (groups,), (), None) for route, groups in walked]

    # --- transforming -----------------------------------------------------------

    async def route(self, msg: Message, trace: Trace | None = None) -> list[Routed]:
        """Match, then run each matching route's transforms; raise NoRoute or TransformFailed."""
        out: list[Routed] = []
        for copy in self._copies(msg):
            route, rcpts = copy.route, copy.recipients
            current: Message = msg
            if isinstance(msg, MailMessage) and rcpts != msg.recipients:
                current = msg.with_recipients(rcpts)
            each = [interpolate(route.options, groups) for groups in copy.groups]
            options = join_option_values(each)
            if trace is not None:
                detail = f" for {', '.join(rcpts)}" if rcpts else ""
                if copy.one_copy is not None and len(rcpts) > 1:
                    detail += f" as one copy (transform '{copy.one_copy}')"
                named = ", ".join(str(g) for g in copy.groups if g) or "{}"
                trace.add(f"route '{route.name}' matches{detail}; named groups {named}")
                joined = [
                    f"{name} {value!r}"
                    for name, value in options.items()
                    if len(each) > 1 and any(o.get(name) != value for o in each)
                ]
                if joined:
                    trace.add(f"  options joined for the one copy: {', '.join(joined)}")
            messages = [current]
            for name in route.transforms:
                messages = await self._apply(route, name, messages, options)
                if trace is not None:
                    trace.add(f"  transform '{name}' -> {len(messages)} message(s)")
            for result in messages:
                out.append(Routed(route, result, route.to))
        return out

    async def _apply(
        self, route: Route, name: str, messages: list[Message], options: Mapping[str, Any]
    ) -> list[Message]:
        spec = self.transforms.get(name)
        if spec is None:
            # The configuration was checked against the loaded transforms; this is a
            # plugin that vanished on reload.
            raise TransformFailed(route.name, name, LookupError("no such transform"))
        results: list[Message] = []
        for message in messages:
            if spec.accepts and message.kind not in spec.accepts:
                raise TransformFailed(
                    route.name, name, TypeError(f"it does not take {message.kind} messages")
                )
            try:
                results.extend(await call_transform(spec, message, options))
            except Reject as exc:
                log.info(
                    "transform {transform} of route {route} rejected message {msgid}: {reason}",
                    transform=name,
                    route=route.name,
                    msgid=message.id,
                    reason=exc.detail,
                )
                raise TransformFailed(route.name, name, exc) from exc
            except Exception as exc:
                log.failure(
                    "transform {transform} of route {route} failed on message {msgid}",
                    transform=name,
                    route=route.name,
                    msgid=message.id,
                )
                raise TransformFailed(route.name, name, exc) from exc
        return results


# --- static checks ------------------------------------------------------------------


def _check_options(route: Route, label: str, specs: list[TransformSpec]) -> list[Problem]:
    """The route's options against what its transforms declare: names, required, types."""
    problems: list[Problem] = []
    here = route.where.get("options", route.where.get(""))
    declared: dict[str, tuple[str, Option]] = {}
    for spec in specs:
        for option in spec.options or ():
            declared.setdefault(option.name, (spec.name, option))
    for name, value in route.options.items():
        known = declared.get(name)
        if known is not None:
            problem = known[1].problem(value)
            if problem is not None:
                problems.append(
                    Problem(
                        route.where.get(f"options.{name}=", here),
                        f"{label}: option '{name}' of transform '{known[0]}': {problem}",
                    )
                )
        elif specs and all(spec.options is not None for spec in specs):
            takes = ", ".join(sorted(declared)) or "no options"
            which = ", ".join(f"'{spec.name}'" for spec in specs)
            verb = "takes" if len(specs) == 1 else "take"
            problems.append(
                Problem(
                    route.where.get(f"options.{name}", here),
                    f"{label}: unknown option '{name}'{suggest(name, declared)}"
                    f" ({which} {verb} {takes})",
                )
            )
    if route.options and not specs:
        problems.append(
            Problem(here, f"{label}: 'options' are for the route's transforms, and it has none")
        )
    for spec in specs:
        for option in spec.options or ():
            if option.required and route.options.get(option.name) in (None, "", (), []):
                help_text = f" ({option.help})" if option.help else ""
                problems.append(
                    Problem(
                        here,
                        f"{label}: transform '{spec.name}' needs the option"
                        f" '{option.name}'{help_text}",
                    )
                )
    return problems


def _transform_hint(name: str, transforms: Transforms) -> str:
    if name.lower().replace("-", "_") in ("mail_to_http", "mail_to_webhook", "news_to_http"):
        return "; mail becomes a web hook in a destination with 'protocol: webhook'"
    return suggest(name, transforms.names())


def _literal(text: str) -> str:
    """A value taken as it is by the per-message '{group}' filling of options."""
    return text.replace("{", "{{").replace("}", "}}")


def resolve_secret_options(
    config: Config, transforms: Transforms, base: Path
) -> tuple[Config, list[Problem]]:
    """Route options that hold secrets, taken from NAME_file (a file, relative to ``base``)
    or with ${ENV_VAR} filled in; the routes get the values themselves."""
    problems: list[Problem] = []
    inline: list[Problem] = []
    routes = []
    for route in config.routes:
        secret = {
            option.name
            for name in route.transforms
            if (spec := transforms.get(name)) is not None
            for option in spec.options or ()
            if option.secret
        }
        options = dict(route.options)
        changed = False
        label = f"route '{route.name}'"
        for name in secret:
            key = f"{name}_file"
            here = route.where.get(f"options.{key}=", route.where.get(""))
            if key in options:
                changed = True
                path = options.pop(key)
                if name in options:
                    problems.append(Problem(here, f"{label}: give '{name}' or '{key}', not both"))
                    continue
                try:
                    options[name] = _literal(read_secret_file(base / str(path)))
                except ValueError as exc:
                    problems.append(Problem(here, f"{label}: option '{key}': {exc}"))
            elif isinstance(options.get(name), str) and "${" in options[name]:
                changed = True
                try:
                    options[name] = _literal(secret_value(options[name]))
                except ValueError as exc:
                    where = route.where.get(f"options.{name}=", here)
                    problems.append(Problem(where, f"{label}: option '{name}': {exc}"))
            elif options.get(name) and readable_by_others(config.source):
                where = route.where.get(f"options.{name}=", here)
                inline.append(
                    Problem(
                        where,
                        f"{label}: option '{name}': a secret written in a file others may"
                        f" read; give it as '{key}' (a file of its own) or as ${{NAME}} (from"
                        " the environment), or make this file readable by its owner only",
                    )
                )
        routes.append(
            dataclasses.replace(route, options=types.MappingProxyType(options))
            if changed
            else route
        )
    resolved = dataclasses.replace(
        config, routes=tuple(routes), warnings=(*config.warnings, *inline)
    )
    return resolved, problems


def check_routes(config: Config, transforms: Transforms) -> list[Problem]:
    """Transform names exist, and each route's message kinds can reach its destinations."""
    problems: list[Problem] = []
    for route in config.routes:
        label = f"route '{route.name}'"
        where = route.where.get("transforms", route.where.get("", None))
        kinds = {config.listeners[n].kind for n in route.from_ if n in config.listeners}
        specs = []
        for name in route.transforms:
            spec = transforms.get(name)
            if spec is None:
                problems.append(
                    Problem(
                        where,
                        f"{label}: unknown transform '{name}'{_transform_hint(name, transforms)}"
                        " (built in or from a plugin)",
                    )
                )
            else:
                specs.append(spec)
        if len(specs) != len(route.transforms):
            continue
        problems.extend(_check_options(route, label, specs))
        for start in sorted(kinds, key=str):
            kind: Kind = start
            broken = False
            for spec in specs:
                if spec.accepts and kind not in spec.accepts:
                    takes = ", ".join(sorted(str(k) for k in spec.accepts))
                    problems.append(
                        Problem(
                            where,
                            f"{label}: transform '{spec.name}' takes {takes} messages"
                            f" but gets {kind}",
                        )
                    )
                    broken = True
                    break
                kind = spec.output_kind(kind)
            if broken:
                continue
            for dest_name in route.to:
                dest: BaseDestinationConfig | None = config.destinations.get(dest_name)
                if dest is not None and kind not in dest.kinds:
                    takes = " or ".join(sorted(str(k) for k in dest.kinds))
                    problems.append(
                        Problem(
                            route.where.get("to", where),
                            f"{label}: destination '{dest_name}' ({dest.protocol}) takes {takes}"
                            f" messages but this route delivers {kind}; add a transform that"
                            f" converts {kind} to {takes}",
                        )
                    )
    return problems
