"""The core's ports: what a protocol package is handed and what it must provide.

A protocol (``gateway/protocols/<name>/``) imports from the core only this
module, ``gateway.listening`` (the shared connection rules), the value types
and bases of ``gateway.config``, the messages of ``gateway.message``, the
routing helpers of ``gateway.routing``, ``gateway.plugins``, ``gateway.stats``
and ``gateway.systemd``.  It never sees the service, the spool or the metrics
module: a listener gets a ``GatewayPort`` (submit, recipient check, clock,
stopping, durable state) and publishes its counters as ``Metric`` values.

Outcomes here are protocol-neutral: a ``Status`` (delivered, temporary,
permanent) and a ``Reason`` category with a detail for people.  Each listener
maps them to its own codes (SMTP 550 5.1.1, NNTP 441, HTTP 404, DNS REFUSED).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

from gateway.message import Kind, Message
from gateway.stats import Histogram

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from gateway.config import (
        BaseDestinationConfig,
        ListenerConfig,
        Match,
        Route,
        RouteCheck,
    )
    from gateway.listening import Listener
    from gateway.message import KindSpec
    from gateway.tracing import Tracer

__all__ = [
    "Deliverer",
    "Destination",
    "DestinationEntry",
    "GatewayPort",
    "ListenerEntry",
    "Metric",
    "Outcome",
    "ProtocolEntry",
    "Proxy",
    "Reason",
    "RecipientFailure",
    "Resolver",
    "RouteTable",
    "Status",
    "Verdict",
]


# --- outcomes -------------------------------------------------------------------------


class Status(enum.Enum):
    """How handling a message ended: taken for good, failed for now, or failed for good."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"

    def __str__(self) -> str:
        return self.value


class Reason(enum.Enum):
    """Why a message was not taken, in no protocol's words; listeners map it to their codes.

    Permanent reasons first, then the temporary ones.
    """

    NONE = "none"  # taken (or no more specific reason)
    NO_ROUTE = "no-route"  # no route takes it (or this recipient)
    TOO_BIG = "too-big"  # larger than a limit allows
    POLICY = "policy"  # refused by a rule: a transform's Reject, a listener's policy
    BAD_MESSAGE = "bad-message"  # malformed or incomplete content
    BAD_ADDRESS = "bad-address"  # an address or name that cannot be used
    UNSUPPORTED_FORMAT = "unsupported-format"  # content of a type that is not taken
    UNSUPPORTED_METHOD = "unsupported-method"  # an operation the route does not offer
    UNAUTHENTICATED = "unauthenticated"  # credentials or a signature missing or wrong
    MISCONFIGURED = "misconfigured"  # the route's own settings cannot work
    DUPLICATE = "duplicate"  # seen already
    REFUSED = "refused"  # the far end refused it for good
    FAILED = "failed"  # something failed inside the gateway (temporary)
    UNAVAILABLE = "unavailable"  # cannot be stored or reached now (temporary)
    SHUTTING_DOWN = "shutting-down"  # the gateway is stopping (temporary)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Verdict:
    """What a listener should answer once the gateway handled a submitted message.

    ``queue_id`` is the id ``gateway queue`` knows the message by when it was
    stored; ``refused`` names the mail recipients no route takes.
    """

    status: Status
    reason: Reason = Reason.NONE
    detail: str = ""
    refused: tuple[str, ...] = ()
    queue_id: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.DELIVERED


@dataclass(frozen=True)
class RecipientFailure:
    """One mail recipient a destination could not deliver to, for the bounce (RFC 3464).

    ``status`` is the RFC 3463 delivery status the DSN reports ("5.1.1");
    ``diagnostic`` the far end's own words with their type ("smtp; 550 5.1.1
    no such user"), or "" when the gateway decided.
    """

    recipient: str
    reason: Reason
    detail: str
    status: str = ""
    diagnostic: str = ""


@dataclass(frozen=True)
class Outcome:
    """How one delivery from the spool went."""

    status: Status
    detail: str = ""
    reason: Reason = Reason.NONE
    # For mail, on a temporary outcome: the recipients to try again (empty: all of them).
    failed: tuple[str, ...] = ()
    # For mail: recipients refused for good.
    rejected: tuple[RecipientFailure, ...] = ()
    # The far end's answer that decided, in its protocol's words with their type
    # ("smtp; 554 5.7.1 relay denied"); "" when the gateway decided.
    diagnostic: str = ""
    # The RFC 3463 status of a mail delivery that failed for good, when the far end said one.
    dsn_status: str = ""
    # On a temporary outcome: seconds the destination asked to wait before the next try
    # (HTTP Retry-After); None leaves the wait to the back-off schedule.
    retry_after: float | None = None

    @classmethod
    def delivered(cls, detail: str = "") -> Outcome:
        return cls(Status.DELIVERED, detail)

    @classmethod
    def temporary(
        cls,
        detail: str,
        *,
        reason: Reason = Reason.UNAVAILABLE,
        failed: tuple[str, ...] = (),
        rejected: tuple[RecipientFailure, ...] = (),
        diagnostic: str = "",
        retry_after: float | None = None,
    ) -> Outcome:
        return cls(
            Status.TEMPORARY,
            detail,
            reason,
            failed=failed,
            rejected=rejected,
            diagnostic=diagnostic,
            retry_after=retry_after,
        )

    @classmethod
    def permanent(
        cls,
        detail: str,
        *,
        reason: Reason = Reason.REFUSED,
        rejected: tuple[RecipientFailure, ...] = (),
        diagnostic: str = "",
        dsn_status: str = "",
    ) -> Outcome:
        return cls(
            Status.PERMANENT,
            detail,
            reason,
            rejected=rejected,
            diagnostic=diagnostic,
            dsn_status=dsn_status,
        )

    @property
    def ok(self) -> bool:
        return self.status is Status.DELIVERED


# --- metrics ----------------------------------------------------------------------------


@dataclass
class Metric:
    """One metric family a listener or destination publishes for /metrics.

    Samples are (label values, value) with label values in the order of
    ``labels``; a histogram's value is a ``gateway.stats.Histogram``.  Families
    of the same name from several publishers are merged (equal label values
    add up), so every DNS listener can publish ``gateway_dns_upstream_queries``.
    """

    name: str
    help: str
    type: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...] = ()
    samples: list[tuple[tuple[str, ...], float | Histogram]] = field(default_factory=list)

    def add(self, labels: Iterable[str], value: float | Histogram) -> Metric:
        self.samples.append((tuple(labels), value))
        return self


class Published(Protocol):
    """Anything that publishes metrics: listeners and destinations."""

    def metrics(self) -> Iterable[Metric]: ...


# --- destinations ------------------------------------------------------------------------


class Destination(ABC):
    """A configured destination at run time; one of the three shapes below."""

    name: str
    kinds: frozenset[Kind]

    @abstractmethod
    async def close(self) -> None:
        """Close connections and stop timers; called once the destination is retired."""

    def metrics(self) -> Iterable[Metric]:
        """What it counts for /metrics (nothing, unless a destination says more)."""
        return ()


class Deliverer(Destination):
    """Store-and-forward: the delivery workers hand it messages from the spool.

    ``deliver`` never raises for a delivery problem: it answers an Outcome.  An
    exception out of it is a bug, and is counted as a temporary failure.
    """

    @abstractmethod
    async def deliver(self, message: Message) -> Outcome: ...


class FileSink(Deliverer):
    """A store-and-forward destination of uploaded files (FileMessage): a folder, an FTP or
    SFTP server, a web service.  ``takes_uploads`` is False where the operator made it
    read-only."""

    takes_uploads: bool = True
    # Whether it can put an upload at the end of a file (FTP APPE) all at once, so that a
    # retry never appends a piece twice: a folder can; a server over the network cannot.
    appends: bool = False


Q_contra = TypeVar("Q_contra", contravariant=True)
E_contra = TypeVar("E_contra", contravariant=True)

OnAnswer = Callable[[bytes], None]
OnError = Callable[["BaseException | Failure"], None]


class Resolver(Destination, Generic[Q_contra]):
    """Request/response: asked a query in its wire form (DNS, DoH), it calls back with the answer.

    ``question`` is the query as the asking listener parsed it (a DNS
    ``Question`` for DNS); ``on_error`` gets the reason no answer came.
    """

    @abstractmethod
    def ask(
        self, data: bytes, question: Q_contra, on_answer: OnAnswer, on_error: OnError
    ) -> None: ...


class Proxy(Destination, Generic[E_contra]):
    """Streaming proxy (HTTP): takes over one exchange and streams it to an upstream and back."""

    @abstractmethod
    def proxy(self, exchange: E_contra, route: str) -> None: ...


class FileProblem(Exception):
    """Why a file source cannot give a file: ``not-found``, ``denied`` (outside what it
    serves, or unreadable), or ``unavailable`` (its server is down: try again later)."""

    def __init__(self, reason: Literal["not-found", "denied", "unavailable"], detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def tidy_name(name: str) -> str:
    """A file name as a relative path, the same on every file source and destination:
    whatever it starts with, ``\\`` counted as ``/``, empty parts and ``.`` dropped, ``..``
    resolved; FileProblem("denied") if ``..`` climbs above the top, "not-found" if nothing
    is left."""
    parts: list[str] = []
    for part in name.replace("\\", "/").split("/"):
        if part == "..":
            if not parts:
                raise FileProblem("denied", f"'{name}' leads out of the folder")
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    if not parts:
        raise FileProblem("not-found", f"'{name}' names no file")
    return "/".join(parts)


class FileReader(ABC):
    """An open file being read from a source, a block at a time."""

    # The size in bytes when the source knows it before the end (a folder's file,
    # an HTTP answer with Content-Length), else None.
    size: int | None = None

    @abstractmethod
    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, fewer only at the end; b"" once it is over. FileProblem if
        the source fails midway."""

    def read_now(self, n: int) -> bytes | None:
        """Without waiting: up to ``n`` bytes that are there already (fewer too; b"" at the
        end), or None when none are yet (then ``read`` waits for them). Lets a transfer
        send a block without a coroutine per block."""
        return None

    @abstractmethod
    def close(self) -> None: ...


@dataclass(frozen=True)
class FileInfo:
    """A file or folder of a source, as listings show it: ``name`` is its last part."""

    name: str
    size: int | None = None
    modified: float | None = None  # seconds since the epoch
    folder: bool = False


class FileSource(Destination):
    """Request/response for files: asked for a name (a TFTP or FTP read), it opens the file."""

    @abstractmethod
    async def fetch(self, name: str) -> FileReader:
        """The file ``name`` (as the client gave it) opened for reading, or FileProblem."""

    async def info(self, name: str) -> FileInfo:
        """What ``name`` is (FTP SIZE, MDTM, MLST, CWD); "" is the top. FileProblem if it is
        not there. By default: opened, and its size taken (a source without folders)."""
        if not name:
            return FileInfo("", folder=True)
        reader = await self.fetch(name)
        reader.close()
        return FileInfo(name.rpartition("/")[2], reader.size)

    async def listing(self, name: str) -> list[FileInfo]:
        """The entries of the folder ``name`` ("" is the top), or of the file alone.
        FileProblem("denied") by default: a source that cannot list (a web server)."""
        raise FileProblem("denied", "this source does not list its files")


# --- the gateway, as a listener sees it ---------------------------------------------------


class RouteTable(Protocol):
    """The routes and destinations of the configuration in force.

    A reload swaps in a new table; a listener that indexes routes keeps its
    index while ``current()`` returns the same table (compare with ``is``).
    """

    def routes_for(self, listener: str) -> tuple[Route, ...]: ...

    def destination(self, name: str) -> Destination | None: ...


class Upload(Protocol):
    """A file being received into the spool (see GatewayPort.upload)."""

    path: str
    size: int

    def write(self, data: bytes) -> None:
        """Hand ``data`` to the disk (OSError at once on a full disk)."""
        ...

    def finish(self) -> None:
        """Flush it to disk; then a FileMessage with this ``path`` may be submitted."""
        ...

    def discard(self) -> None:
        """Remove it (the upload broke off, or was refused)."""
        ...


class GatewayPort(Protocol):
    """The few calls a listener makes into the gateway."""

    # Routing decisions for ``gateway trace``: emit only while ``tracer.active``.
    tracer: Tracer

    @property
    def stopping(self) -> bool:
        """True once the gateway is shutting down: refuse new work politely."""
        ...

    def seconds(self) -> float:
        """The reactor's clock (tests pass a fake one)."""
        ...

    def current(self) -> RouteTable:
        """The routes and destinations in force now."""
        ...

    def accepts_recipient(
        self, listener: str, sender: str, recipient: str, client: str, user: str = ""
    ) -> bool:
        """Whether some route of ``listener`` takes this mail recipient (asked at RCPT)."""
        ...

    async def submit(self, message: Message, *, state: Mapping[str, str] | None = None) -> Verdict:
        """Route ``message`` and store it; the verdict is final only once it is on disk.

        ``state`` (a poller's high-water mark) is stored in the same transaction.
        """
        ...

    async def get_state(self, key: str) -> str | None:
        """A value stored durably with ``submit(state=...)`` or ``set_state``."""
        ...

    async def set_state(self, key: str, value: str) -> None: ...

    def upload(self) -> Upload:
        """A new file in the spool for an upload's content to be written into as it
        arrives (OSError if the spool cannot take one)."""
        ...


# --- the registry entry of a protocol ------------------------------------------------------

LC = TypeVar("LC", bound="ListenerConfig")
DC = TypeVar("DC", bound="BaseDestinationConfig")

# How the router matches a stored-and-forwarded message from a listener against a
# route's match keys: (match, message, recipient or None, named groups found so far,
# whether the header is known yet) -> matches.  Groups found are added to the dict.
Matcher = Callable[["Match", Message, "str | None", dict[str, str], bool], bool]


@dataclass(frozen=True)
class Sample:
    """What ``gateway route --dry-run`` is asked to route, in no protocol's words.

    A protocol's dry run reads the fields it knows: mail and articles ``data``
    (and the envelope), DNS ``name`` and ``type``, HTTP ``method``, ``target``,
    ``host``, ``headers`` and ``data`` as the body, files ``name`` (a read, or
    an ``upload`` of ``size`` octets).
    """

    listener: str
    client: str = "127.0.0.1"
    user: str = ""
    sender: str = ""
    recipients: tuple[str, ...] = ()
    data: bytes = b""
    name: str = ""
    type: str = "A"
    method: str = ""
    target: str = "/"
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    upload: bool = False
    size: int | None = None


@dataclass(frozen=True)
class Explained:
    """A listener's own routing of a sample: the route it chose (None: none) and what it
    would do, in lines for people; or a message the router routes from there on."""

    route: str | None = None
    lines: tuple[str, ...] = ()
    message: Message | None = None
    refused: str = ""  # the protocol's answer when it is a refusal: "REFUSED", "404" ...
    answer: str = ""  # what a route answers itself: "NXDOMAIN", records, "proxied to app"
    destinations: tuple[str, ...] = ()  # where it would go (forwarded, proxied)


# A listener's refusal of a message the router refused, in its protocol's words
# ("550 5.1.1 ...", "441 ...", "403").
Refusal = Callable[[Verdict], str]


# A listener's dry run: (its config, its routes, each destination's shape, the sample)
# -> Explained. Raises ValueError when the sample is not something the listener takes.
DryRun = Callable[[Any, "tuple[Route, ...]", Mapping[str, str], Sample], Explained]


@dataclass(frozen=True)
class ListenerEntry:
    """The listener side of a protocol: its settings, how to build it, what its routes may say.

    ``match`` is a frozen dataclass of the match keys that routes from this
    listener may use (besides ``client``); ``route`` one of route keys of its own
    (DNS: ``answer``, ``action``, ``cache``...).  ``matcher`` matches a message
    against them for the router (store-and-forward listeners);
    ``check_route`` checks and completes a route from this listener at load
    time (reading files it names, say).  ``dry_run`` shows how the listener
    would route a sample (``gateway route --dry-run``); without one, the
    listener's messages go to the router as its kind says (mail, articles).
    """

    config: type[ListenerConfig]
    build: Callable[[Any, GatewayPort, Any], Listener[Any]]
    match: type | None = None
    route: type | None = None
    matcher: Matcher | None = None
    check_route: RouteCheck | None = None
    dry_run: DryRun | None = None
    refusal: Refusal | None = None


@dataclass(frozen=True)
class DestinationEntry:
    """The destination side of a protocol: its settings and how to build it."""

    config: type[BaseDestinationConfig]
    build: Callable[[Any, Any], Destination]
    # deliver: store-and-forward; resolve: request/response; proxy: takes the whole exchange
    # (a route to it has no transforms, no other destination, no 'continue'); files:
    # serves files by name (a FileSource).
    shape: Literal["deliver", "resolve", "proxy", "files"] = "deliver"
    # What the destination would send for a message, as JSON data (a web hook's body),
    # for `gateway test`'s `json:` expectations; None when it sends no JSON.
    preview: Callable[[Any, Message], Any] | None = None
    # Whether it also serves files by name (a FileSource: TFTP reads), whatever its shape.
    serves_files: bool = False


@dataclass(frozen=True)
class ProtocolEntry:
    """One protocol as ``protocol:`` names it in routes.yaml: a listener, a destination or both.

    ``kinds`` are message kinds the protocol brings with it (built-in kinds
    are known already).
    """

    name: str
    listener: ListenerEntry | None = None
    destination: DestinationEntry | None = None
    kinds: tuple[KindSpec, ...] = ()


def listener_entry(
    config: type[LC],
    build: Callable[[LC, GatewayPort, Any], Listener[LC]],
    *,
    match: type | None = None,
    route: type | None = None,
    matcher: Matcher | None = None,
    check_route: RouteCheck | None = None,
    dry_run: DryRun | None = None,
    refusal: Refusal | None = None,
) -> ListenerEntry:
    """A ListenerEntry whose builder is checked against its config class."""
    return ListenerEntry(config, build, match, route, matcher, check_route, dry_run, refusal)


def destination_entry(
    config: type[DC],
    build: Callable[[DC, Any], Destination],
    *,
    shape: Literal["deliver", "resolve", "proxy", "files"] = "deliver",
    preview: Callable[[DC, Message], Any] | None = None,
    serves_files: bool = False,
) -> DestinationEntry:
    """A DestinationEntry whose builder is checked against its config class."""
    return DestinationEntry(config, build, shape, preview, serves_files or shape == "files")
