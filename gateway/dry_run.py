"""How the gateway would route a message, query or request, without sending anything.

``simulate`` runs the routes, the plugins' transforms and the listeners' own
route choices (DNS, HTTP) as they would run on traffic and says what each
destination would get, or how the sample would be refused in its protocol's
words.  ``gateway route --dry-run`` prints a simulation; ``gateway test``
compares simulations with what route tests expect.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config
from gateway.message import Article, FileMessage, Kind, MailMessage, Message
from gateway.plugins import Transforms
from gateway.ports import Explained, Reason, Sample, Status, Verdict
from gateway.protocols import registry
from gateway.routing import NoRoute, Router, Trace, TransformFailed

# What each kind of sample is, in the words of the help and the errors.
KIND_WORDS = {
    Kind.MAIL: "mail",
    Kind.ARTICLE: "articles",
    Kind.DNS: "DNS queries",
    Kind.HTTP: "HTTP requests",
    Kind.FILE: "files",
}


class SampleError(ValueError):
    """The sample cannot be tried on that listener (or at all); the message says why."""


@dataclass(frozen=True)
class Copy:
    """A message one route would send to its destinations."""

    route: str
    destinations: tuple[str, ...]
    message: Message


@dataclass
class Simulation:
    """What would happen to a sample."""

    listener: str
    trace: list[str] = field(default_factory=list)  # the listener's and the router's steps
    refused: str = ""  # the protocol's answer when the whole sample is refused
    failed: str = ""  # a transform failed (a temporary refusal)
    refused_recipients: dict[str, str] = field(default_factory=dict)  # mail: at RCPT
    route: str | None = None  # the route a listener chose itself (DNS, HTTP)
    answer: str = ""  # what that route answers itself
    destinations: tuple[str, ...] = ()  # where that route forwards or proxies
    copies: list[Copy] = field(default_factory=list)  # what the router's routes would send
    dropped: bool = False  # the transforms dropped every copy

    @property
    def routes(self) -> list[str]:
        chosen = [self.route] if self.route else []
        return chosen + [c.route for c in self.copies if c.route not in chosen]

    @property
    def all_destinations(self) -> list[str]:
        names = list(self.destinations)
        for copy in self.copies:
            names += [d for d in copy.destinations if d not in names]
        return names

    @property
    def accepted(self) -> bool:
        return not (self.refused or self.failed)


def listener_for(config: Config, listener: str | None, kind: Kind) -> str:
    """The listener a sample of ``kind`` arrives on: the one named, or the first of its kind."""
    if listener:
        lc = config.listeners.get(listener)
        if lc is None:
            names = ", ".join(config.listeners) or "none"
            raise SampleError(f"no listener '{listener}' (listeners: {names})")
        if lc.kind != kind:
            takes = KIND_WORDS.get(lc.kind, f"{lc.kind} messages")
            fitting = [n for n, c in config.listeners.items() if c.kind == kind] or ["none"]
            raise SampleError(
                f"listener '{listener}' ({lc.protocol}) takes {takes}, not"
                f" {KIND_WORDS.get(kind, kind)}; the listeners that do: {', '.join(fitting)}"
            )
        return listener
    for name, lc in config.listeners.items():
        if lc.kind == kind:
            return name
    raise SampleError(f"no listener takes {KIND_WORDS.get(kind, kind)}")


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
    raise SampleError(f"listener '{sample.listener}' ({lc.protocol}) cannot be tried yet")


async def simulate(config: Config, transforms: Transforms, sample: Sample) -> Simulation:
    """Route ``sample`` as its listener would; raises SampleError if it cannot be tried."""
    lc = config.listeners[sample.listener]
    entry = registry().listener(lc.protocol)
    router = Router(config, transforms)
    result = Simulation(sample.listener)

    def refusal(reason: Reason, detail: str, status: Status = Status.PERMANENT) -> str:
        verdict = Verdict(status, reason, detail)
        if entry.refusal is not None:
            return entry.refusal(verdict)
        return f"{reason.value}: {detail}"

    try:
        if entry.dry_run is not None:
            shapes = {
                name: registry().destination(dc.protocol).shape
                for name, dc in config.destinations.items()
            }
            explained = entry.dry_run(lc, router.routes_for(sample.listener), shapes, sample)
        else:
            explained = Explained(message=_message(config, sample))
    except SampleError:
        raise
    except ValueError as exc:
        raise SampleError(str(exc)) from None
    result.trace += explained.lines
    result.route = explained.route
    result.refused = explained.refused
    result.answer = explained.answer
    result.destinations = explained.destinations
    message = explained.message
    if message is None:
        return result
    if isinstance(message, MailMessage):
        # As at RCPT: a recipient no route takes is refused alone; the others go on.
        kept = []
        for rcpt in message.recipients:
            if router.accepts_recipient(
                sample.listener, message.sender, rcpt, message.client, message.user
            ):
                kept.append(rcpt)
            else:
                answer = refusal(
                    Reason.NO_ROUTE, f"<{rcpt}>: Recipient address rejected: no route for it here"
                )
                result.refused_recipients[rcpt] = answer
                result.trace.append(f"<{rcpt}>: refused at RCPT: {answer}")
        if not kept:
            result.refused = next(iter(result.refused_recipients.values()), "no recipient")
            return result
        message = message.with_recipients(tuple(kept))
    trace = Trace()
    try:
        routed = await router.route(message, trace)
    except NoRoute as exc:
        result.refused = refusal(Reason.NO_ROUTE, str(exc))
        result.trace += [*trace.steps, f"refused: {result.refused}"]
        return result
    except TransformFailed as exc:
        result.trace += trace.steps
        if exc.rejected is not None:
            result.refused = refusal(exc.rejected.reason, exc.rejected.detail)
            result.trace.append(f"refused by a transform: {result.refused}")
        else:
            result.failed = refusal(Reason.FAILED, str(exc), Status.TEMPORARY)
            result.trace.append(f"failed: {exc}")
        return result
    result.trace += trace.steps
    if isinstance(message, FileMessage):
        # An upload is taken only when every destination of its route takes uploads (unless
        # a transform made something else of it: file_to_mail).
        for r in routed:
            if not isinstance(r.message, FileMessage):
                continue
            closed = [d for d in r.destinations if not config.destinations[d].takes_uploads()]
            if closed:
                result.refused = f"access violation: {', '.join(closed)} take(s) no uploads"
                result.trace.append(f"refused: route '{r.route.name}' is for reads only")
                return result
    result.dropped = not routed
    result.copies = [Copy(r.route.name, r.destinations, r.message) for r in routed]
    return result


# --- gateway route --dry-run ---------------------------------------------------------------


def _wanted_kind(args: argparse.Namespace) -> Kind | None:
    if args.query:
        return Kind.DNS
    if args.file:
        return Kind.FILE
    if args.method or args.path:
        return Kind.HTTP
    if args.article:
        return Kind.ARTICLE
    if args.recipients:
        return Kind.MAIL
    return None


def _sample(args: argparse.Namespace, listener: str, kind: Kind) -> Sample:
    headers: list[tuple[str, str]] = []
    for text in args.headers or ():
        name, sep, value = text.partition(":")
        if not sep or not name.strip():
            raise SampleError(f"--header '{text}': expected 'Name: value'")
        headers.append((name.strip(), value.strip()))
    data = b""
    if kind in (Kind.MAIL, Kind.ARTICLE):
        data = sys.stdin.buffer.read().replace(b"\r\n", b"\n")
    elif args.body is not None:
        with open(args.body, "rb") as body:
            data = body.read()
    query = args.query or []
    if len(query) > 2:
        raise SampleError(f"--query takes a name and a type, got {' '.join(query)}")
    return Sample(
        listener=listener,
        client=args.client,
        user=args.user or "",
        sender=args.sender,
        recipients=tuple(args.recipients or ()),
        data=data,
        name=query[0] if query else (args.file or ""),
        type=query[1] if len(query) > 1 else "A",
        method=(args.method or ("GET" if args.path else "")).upper(),
        target=args.path or "/",
        host=args.host or "",
        headers=tuple(headers),
        upload=bool(args.upload),
        size=args.size,
    )


async def dry_run(config: Config, transforms: Transforms, args: argparse.Namespace) -> int:
    """Print how the sample the arguments describe would be routed; 0 if it would go
    somewhere (or be answered), 1 if anything of it would be refused, 2 if it cannot be
    tried."""
    kind = _wanted_kind(args)
    if kind is None:
        print(
            "error: say what to route: --to ADDRESS (mail), --article (an article on stdin),"
            " --query NAME [TYPE] (DNS), --method M --path P (HTTP) or --file NAME (a file"
            " asked for, as by TFTP)",
            file=sys.stderr,
        )
        return 2
    try:
        listener = listener_for(config, args.listener, kind)
        sample = _sample(args, listener, kind)
        result = await simulate(config, transforms, sample)
    except SampleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if args.listener else 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in result.trace:
        print(line)
    if result.dropped:
        print("the transforms dropped the message: nothing would be sent")
    for copy in result.copies:
        print()
        print(f"=== route '{copy.route}' -> {', '.join(copy.destinations)}")
        out = copy.message
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
    if not result.accepted or result.refused_recipients:
        return 1
    return 0 if result.route is not None or result.copies or result.dropped else 1
