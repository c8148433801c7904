"""What the file listeners (TFTP, FTP) share: their match keys and how a route is picked.

Uploads go to the router, which tests each route with ``match_file`` (the
``name`` pattern, whose named groups a route may use, and the ``size``);
reads, listings and the early check of an upload's name are answered by the
listener itself with ``select_route``, which tests what is known before any
byte arrives (the name, the client, the user).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import (
    Match,
    Pattern,
    Route,
    RouteContext,
    SizeRange,
    client_allowed,
    doc,
)
from gateway.message import FileMessage, Kind, Message
from gateway.ports import DryRun, Explained, FileSink, FileSource, RouteTable, Sample


@dataclass(frozen=True, kw_only=True)
class FileMatch:
    """The match keys of routes from file listeners (besides client, user, authenticated)."""

    name: Pattern | None = field(
        default=None,
        metadata=doc(
            "the file name as the client gave it (regex, searched; '^' anchors it);"
            " its named groups can be used in the route"
        ),
    )
    size: SizeRange | None = field(
        default=None,
        metadata=doc(
            "the size of an upload: '<10MiB', '>=1k', '1k-10MiB' (a read's size is not"
            " known when its route is chosen: a route with 'size' serves no reads)"
        ),
    )


def select_route(
    routes: Iterable[Route], name: str, host: str, user: str = "", *, reading: bool
) -> Route | None:
    """The first route whose conditions a request for ``name`` meets, as far as they are
    known before the transfer: for an upload a ``size`` condition is left to the router."""
    for route in routes:
        match = route.match
        if match.client and not client_allowed(match.client, host):
            continue
        if match.user and user not in match.user:
            continue
        if match.authenticated is not None and match.authenticated != bool(user):
            continue
        keys = match.view(FileMatch)
        if keys.size is not None and reading:
            continue
        if keys.name is not None and keys.name.compiled.search(name) is None:
            continue
        return route
    return None


def file_source(table: RouteTable, route: Route) -> FileSource | None:
    """The first destination of ``route`` that serves files: reads come from it."""
    for destination in map(table.destination, route.to):
        if isinstance(destination, FileSource):
            return destination
    return None


def takes_uploads(table: RouteTable, route: Route, *, appending: bool = False) -> bool:
    """Whether an upload by ``route`` can be stored: its transforms make something else of
    it (file_to_mail), or every destination takes uploads; ``appending`` (FTP APPE): no
    transforms, and every destination adds to a file at once."""
    takers = [table.destination(name) for name in route.to]
    if appending:
        return not route.transforms and all(
            isinstance(d, FileSink) and d.takes_uploads and d.appends for d in takers
        )
    return bool(route.transforms) or all(
        isinstance(d, FileSink) and d.takes_uploads for d in takers
    )


def match_file(
    match: Match, message: Message, rcpt: str | None, groups: dict[str, str], headers: bool
) -> bool:
    """The router's test of an upload against a route's ``name`` (its groups are kept) and
    ``size``."""
    keys = match.view(FileMatch)
    size = message.size if isinstance(message, FileMessage) else None
    if keys.size is not None and (size is None or size not in keys.size):
        return False
    if keys.name is None:
        return True
    found = keys.name.compiled.search(getattr(message, "name", ""))
    if found is None:
        return False
    groups.update({k: v for k, v in found.groupdict().items() if v is not None})
    return True


def check_file_route(route: Route, context: RouteContext) -> Route:
    """A route from file listeners names destinations that serve files (reads come from
    the first of them) or take them (uploads go to all of them), or transforms that turn
    uploads into what its destinations take."""
    if len(context.kinds) > 1:
        context.problem("from_", "a route takes either file listeners or others, not both")
    if not route.to:
        context.problem("to", "a file route names the destination(s) files come from or go to")
    # With transforms (file_to_mail), the router checks that their output reaches 'to'.
    for name in () if route.transforms else route.to:
        entry = context.destination_entry(name)
        if entry is not None and not entry.serves_files and Kind.FILE not in entry.config.kinds:
            context.problem(
                "to",
                f"destination '{name}' neither serves nor takes files; a file route needs"
                " one that does (protocol: folder, sftp, ftp, webhook, or http for a web"
                " server), or a transform such as file_to_mail",
            )
    if route.continue_:
        context.problem("continue", "a file request is answered by one route: no 'continue'")
    return route


_STAND_INS: list[str] = []


def stand_in(size: int) -> str:
    """A file of ``size`` zero bytes (sparse: it takes no room) that stands in for an
    upload's content in a dry run, where transforms (file_to_mail) read it; removed when
    the process ends."""
    if not _STAND_INS:
        folder = tempfile.mkdtemp(prefix="gateway-dry-run-")
        _STAND_INS.append(folder)
        atexit.register(shutil.rmtree, folder, True)
    handle, path = tempfile.mkstemp(dir=_STAND_INS[0])
    try:
        os.ftruncate(handle, size)
    finally:
        os.close(handle)
    return path


def file_dry_run(protocol: str, *, not_allowed: str, not_found: str, too_big: str) -> DryRun:
    """A file listener's dry run (``gateway route --dry-run --file``): how a read of
    ``sample.name`` would be answered, or the message an upload would become (the router
    routes it from there); the refusals in the protocol's words."""

    def dry_run(config: Any, routes: tuple[Route, ...], shapes: Any, sample: Sample) -> Explained:
        name = sample.name
        if not name:
            raise ValueError(f"a {protocol} request needs a file name ('name')")
        if config.allow and not client_allowed(config.allow, sample.client):
            return Explained(
                None,
                (f"{name}: the client is not in the listener's 'allow' list; {not_allowed}",),
                refused=not_allowed,
            )
        if sample.upload:
            if sample.size is not None and sample.size > config.max_size:
                return Explained(
                    None,
                    (f"{name}: {sample.size} octets, more than max_size; {too_big}",),
                    refused=too_big,
                )
            upload = FileMessage(
                name=name,
                size=sample.size,
                path=stand_in(sample.size or 0),
                listener=config.name,
                client=sample.client,
                user=sample.user,
            )
            return Explained(None, (f"{name}: an upload, stored and routed",), message=upload)
        route = select_route(routes, name, sample.client, sample.user, reading=True)
        if route is None:
            return Explained(
                None, (f"{name}: no route serves this name; {not_found}",), refused=not_found
            )
        return Explained(
            route.name,
            (f"{name}: route '{route.name}' serves it from {', '.join(route.to)}",),
            answer=f"read from {', '.join(route.to)}",
            destinations=tuple(route.to),
        )

    return dry_run
