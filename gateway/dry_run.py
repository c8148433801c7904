"""``gateway route --dry-run``: how the gateway would route a message, query or request.

Nothing is sent and nothing is stored: the routes, the plugins' transforms and
the listeners' own route choices (DNS, HTTP) run as they would on traffic, and
what each destination would get is printed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.config import Config
from gateway.message import Article, Kind, MailMessage, Message
from gateway.plugins import Transforms
from gateway.ports import Explained, Sample
from gateway.protocols import registry
from gateway.routing import NoRoute, Router, Trace, TransformFailed

# What each kind of sample is, in the words of the help and the errors.
_KIND_WORDS = {
    Kind.MAIL: "mail",
    Kind.ARTICLE: "articles",
    Kind.DNS: "DNS queries",
    Kind.HTTP: "HTTP requests",
}


def _wanted_kind(args: argparse.Namespace) -> Kind | None:
    if args.query:
        return Kind.DNS
    if args.method or args.path:
        return Kind.HTTP
    if args.article:
        return Kind.ARTICLE
    if args.recipients:
        return Kind.MAIL
    return None


def _choose_listener(config: Config, args: argparse.Namespace) -> tuple[str, str | None]:
    """The listener's name, or an error saying why none fits."""
    wanted = _wanted_kind(args)
    if args.listener:
        lc = config.listeners.get(args.listener)
        if lc is None:
            names = ", ".join(config.listeners) or "none"
            return "", f"no listener '{args.listener}' in {args.config} (listeners: {names})"
        if wanted is not None and lc.kind != wanted:
            takes = _KIND_WORDS.get(lc.kind, f"{lc.kind} messages")
            fitting = [n for n, c in config.listeners.items() if c.kind == wanted] or ["none"]
            return "", (
                f"listener '{args.listener}' ({lc.protocol}) takes {takes}, not"
                f" {_KIND_WORDS.get(wanted, wanted)}; the listeners that do: {', '.join(fitting)}"
            )
        return args.listener, None
    if wanted is None:
        return "", (
            "say what to route: --to ADDRESS (mail), --article (an article on stdin),"
            " --query NAME [TYPE] (DNS) or --method M --path P (HTTP)"
        )
    for name, lc in config.listeners.items():
        if lc.kind == wanted:
            return name, None
    return "", f"no listener in {args.config} takes {_KIND_WORDS.get(wanted, wanted)}"


def _sample(args: argparse.Namespace, listener: str, kind: Kind) -> Sample:
    headers: list[tuple[str, str]] = []
    for text in args.headers or ():
        name, sep, value = text.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header '{text}': expected 'Name: value'")
        headers.append((name.strip(), value.strip()))
    data = b""
    if kind in (Kind.MAIL, Kind.ARTICLE):
        data = sys.stdin.buffer.read().replace(b"\r\n", b"\n")
    elif args.body is not None:
        with open(args.body, "rb") as body:
            data = body.read()
    query = args.query or []
    if len(query) > 2:
        raise ValueError(f"--query takes a name and a type, got {' '.join(query)}")
    return Sample(
        listener=listener,
        client=args.client,
        user=args.user or "",
        sender=args.sender,
        recipients=tuple(args.recipients or ()),
        data=data,
        name=query[0] if query else "",
        type=query[1] if len(query) > 1 else "A",
        method=(args.method or ("GET" if args.path else "")).upper(),
        target=args.path or "/",
        host=args.host or "",
        headers=tuple(headers),
    )


def _message(config: Config, sample: Sample) -> Message:
    """The message a store-and-forward listener would make of the sample."""
    lc = config.listeners[sample.listener]
    meta: dict[str, Any] = {"listener": sample.listener, "client": sample.client}
    if sample.user:
        meta["user"] = sample.user
    if lc.kind == Kind.MAIL:
        return MailMessage.from_bytes(
            sample.data, sender=sample.sender, recipients=sample.recipients, **meta
        )
    if lc.kind == Kind.ARTICLE:
        return Article.from_bytes(sample.data, **meta)
    raise ValueError(
        f"listener '{sample.listener}' ({lc.protocol}) cannot be tried with a dry run yet"
    )


async def dry_run(config: Config, transforms: Transforms, args: argparse.Namespace) -> int:
    """Print how the sample the arguments describe would be routed; 0 if it would go
    somewhere (or be answered), 1 if it would be refused."""
    listener, problem = _choose_listener(config, args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2 if listener == "" and _wanted_kind(args) is None else 1
    lc = config.listeners[listener]
    try:
        sample = _sample(args, listener, lc.kind)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    router = Router(config, transforms)
    entry = registry().listener(lc.protocol)
    try:
        if entry.dry_run is not None:
            shapes = {
                name: registry().destination(dc.protocol).shape
                for name, dc in config.destinations.items()
            }
            explained = entry.dry_run(lc, router.routes_for(listener), shapes, sample)
        else:
            explained = Explained(message=_message(config, sample))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in explained.lines:
        print(line)
    message = explained.message
    if message is None:
        return 0 if explained.route is not None else 1
    refused = 0
    if isinstance(message, MailMessage):
        # As at RCPT: a recipient no route takes is refused alone; the others go on.
        kept = []
        for rcpt in message.recipients:
            if router.accepts_recipient(
                listener, message.sender, rcpt, message.client, message.user
            ):
                kept.append(rcpt)
            else:
                refused += 1
                print(f"<{rcpt}>: refused at RCPT: 550 5.1.1 no route for it here")
        if not kept:
            return 1
        message = message.with_recipients(tuple(kept))
    return await _route(router, message, refused)


async def _route(router: Router, message: Message, refused: int) -> int:
    trace = Trace()
    try:
        routed = await router.route(message, trace)
    except NoRoute as exc:
        for step in trace.steps:
            print(step)
        print(f"refused: {exc}")
        return 1
    except TransformFailed as exc:
        for step in trace.steps:
            print(step)
        print(f"failed: {exc}")
        return 1
    for step in trace.steps:
        print(step)
    if not routed:
        print("the transforms dropped the message: nothing would be sent")
    for item in routed:
        print()
        print(f"=== route '{item.route.name}' -> {', '.join(item.destinations)}")
        out = item.message
        if isinstance(out, MailMessage):
            rcpts = ", ".join(f"<{r}>" for r in out.recipients)
            print(f"envelope: from <{out.sender}> to {rcpts}")
        to_bytes = getattr(out, "to_bytes", None)
        if to_bytes is not None:
            sys.stdout.flush()
            sys.stdout.buffer.write(to_bytes())
            sys.stdout.buffer.flush()
        else:
            print(repr(out))
    return 1 if refused else 0

