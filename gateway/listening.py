"""What every listener owes, written once: the listener's life cycle and its connection rules.

``Listener`` is the interface the service drives (open, reconfigure, drain,
close, metrics).  ``StreamListener`` adds what a listener on stream sockets
gets without writing it: the endpoints opened (``ssl:`` and ``systemd:``
included), and a ``Guard`` that holds the ``allow`` networks, counts the open
connections, enforces ``max_connections`` and publishes both for /metrics.
The guard also keeps the listener's ``limits:`` per client: connections open
and new connections per second at connect time, and the rates of what the
protocol counts (``throttle("message_rate", host)``) as it goes.  A
protocol's factory takes the guard and asks it at each connection; what a
refused or throttled client is told stays in the protocol's own words.
"""

from __future__ import annotations

import enum
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from twisted.logger import Logger

from gateway.config import ClientLimits, ListenerConfig, Network, client_allowed
from gateway.limits import ConnectionCounter, RateLimiter, client_key
from gateway.ports import GatewayPort, Metric
from gateway.stats import Histogram
from gateway.systemd import server_endpoint
from gateway.tls import ServerTls, apply_tls_policy, tls_endpoint

if TYPE_CHECKING:
    from twisted.internet.protocol import Factory

__all__ = [
    "Admission",
    "Guard",
    "Listener",
    "ListeningPort",
    "StreamListener",
    "duration_metric",
    "message_metric",
    "retry_after",
]

log = Logger(namespace="gateway.listening")

C = TypeVar("C", bound=ListenerConfig)
P = TypeVar("P")


class ListeningPort(Protocol):
    """An open socket (or a poller's handle): stopping it stops accepting."""

    def stopListening(self) -> Any: ...


class Admission(enum.Enum):
    """Whether a new connection is served."""

    OK = "ok"
    NOT_ALLOWED = "not-allowed"  # its address is not in the listener's allow list
    TOO_MANY = "too-many"  # max_connections are open already
    CLIENT_CONNECTIONS = "client-connections"  # the client has limits.connections open
    CLIENT_RATE = "client-rate"  # the client connects faster than limits.connection_rate

    def __str__(self) -> str:
        return self.value


class Guard(Generic[P]):
    """The connection rules of one listener: allow list, connection count and limits.

    ``connect`` counts a connection (refused ones too: they hold a socket until
    the protocol has said so and closed) and ``disconnect`` forgets it; the
    open ones are in ``connections`` for draining at shutdown.
    """

    def __init__(
        self,
        listener: str,
        allow: tuple[Network, ...],
        max_connections: int,
        limits: ClientLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.listener = listener
        self.clock = clock
        self.connections: set[P] = set()
        self.refused: dict[Admission, int] = {a: 0 for a in Admission if a is not Admission.OK}
        # Connections the listener cut off for misbehaving, by why (stream_reset, ...).
        self.aborted: dict[str, int] = {}
        # Set by a protocol whose idle connections may be closed to make room for a new
        # one (an HTTP keep-alive connection between requests, as nginx reuses them): it
        # closes one other than the given connection and says whether it did.
        self.reclaim: Callable[[P], bool] | None = None
        # After CLIENT_RATE: seconds until the client may connect again (Retry-After).
        self.retry_after = 0.0
        self._per_client: ConnectionCounter | None = None
        self._client_of: dict[P, str] = {}  # the client of each connection served
        self._rates: dict[str, RateLimiter] = {}
        # Events over a rate, by the limit's key, for /metrics (kept across reloads).
        self.throttled: dict[str, int] = {}
        self.auth_failures = 0  # failed logins (SMTP AUTH, NNTP AUTHINFO)
        self.configure(allow, max_connections, limits or ClientLimits())

    def configure(
        self, allow: tuple[Network, ...], max_connections: int, limits: ClientLimits | None = None
    ) -> None:
        """New rules, for connections and events from now on.

        A rate that did not change keeps what it counted; a changed one starts afresh.
        """
        self.allow = allow
        self.max_connections = max_connections
        self.limits = limits = limits or ClientLimits()
        if not limits.connections:
            self._per_client = None
        elif self._per_client is None:
            self._per_client = ConnectionCounter(limits.connections)
            for key in self._client_of.values():  # the connections open already count
                self._per_client.open(key)
        else:
            self._per_client.limit = limits.connections
        rates = {}
        for name, rate in limits.rates().items():
            kept = self._rates.get(name)
            rates[name] = (
                kept if kept is not None and kept.rate == rate else (RateLimiter(rate, self.clock))
            )
            self.throttled.setdefault(name, 0)
        self._rates = rates

    def allows(self, host: str) -> bool:
        """Whether ``host`` is in the allow list (an empty list allows everybody)."""
        return client_allowed(self.allow, host)

    def connect(self, connection: P, host: str, *, check_allow: bool = True) -> Admission:
        """Count a new connection from ``host`` and say whether it is served.

        ``check_allow=False`` for protocols that answer each request of a client
        outside ``allow`` (DNS says REFUSED) rather than refusing the connection.
        """
        self.connections.add(connection)
        if check_allow and not client_allowed(self.allow, host):
            return self._refuse(Admission.NOT_ALLOWED, host, "not in allow")
        per_client = self._per_client
        if per_client is not None and not per_client.has_room(client_key(host)):
            return self._refuse(
                Admission.CLIENT_CONNECTIONS,
                host,
                f"it has {per_client.limit} connections open (limits.connections)",
            )
        connection_rate = self._rates.get("connection_rate")
        if connection_rate is not None:
            wait = connection_rate.take(client_key(host))
            if wait:
                self.retry_after = wait
                self.throttled["connection_rate"] += 1
                return self._refuse(
                    Admission.CLIENT_RATE,
                    host,
                    f"it connects faster than {connection_rate.rate} (limits.connection_rate)",
                )
        if len(self.connections) > self.max_connections:
            if self.reclaim is not None and self.reclaim(connection):
                self.abort(connection, "idle_closed_for_room")
            else:
                return self._refuse(
                    Admission.TOO_MANY,
                    host,
                    f"{len(self.connections) - 1} connections are open"
                    f" (max_connections {self.max_connections})",
                )
        key = self._client_of[connection] = client_key(host)
        if per_client is not None:
            per_client.open(key)
        return Admission.OK

    def _refuse(self, admission: Admission, host: str, why: str) -> Admission:
        self.refused[admission] += 1
        log.info(
            "listener {listener} refused client {client}: {why}",
            listener=self.listener,
            client=host,
            why=why,
        )
        return admission

    def throttle(self, limit: str, host: str, user: str = "") -> float:
        """Count one event of the rate ``limit`` (a key of ``limits:``) for ``host``, or for
        ``user`` when the client has logged in (a user's rate is its own, wherever it
        connects from).

        0.0 when it may go on (or the rate is not set), else the seconds until it may.
        """
        limiter = self._rates.get(limit)
        if limiter is None:
            return 0.0
        wait = limiter.take(_rate_key(host, user))
        if wait:
            self.throttled[limit] += 1
        return wait

    def over(self, limit: str, host: str, user: str = "") -> float:
        """Seconds until ``host`` (or ``user``) may have an event of ``limit`` (0.0: now),
        counting none: for an offer that the event itself will be counted after (an
        NNTP CHECK), or a login that counts only when it fails."""
        limiter = self._rates.get(limit)
        if limiter is None:
            return 0.0
        wait = limiter.peek(_rate_key(host, user))
        if wait:
            self.throttled[limit] += 1
        return wait

    def disconnect(self, connection: P) -> None:
        self.connections.discard(connection)
        key = self._client_of.pop(connection, None)
        if key is not None and self._per_client is not None:
            self._per_client.close(key)

    def abort(self, connection: P, why: str) -> None:
        """Count a connection the protocol is cutting off because the client misbehaved."""
        self.aborted[why] = self.aborted.get(why, 0) + 1

    def metrics(self) -> Iterable[Metric]:
        yield Metric(
            "gateway_listener_open_connections",
            "Open connections of a listener (SMTP, NNTP and HTTP clients, DNS over TCP, DoH)",
            "gauge",
            ("listener",),
        ).add([self.listener], len(self.connections))
        refused = Metric(
            "gateway_listener_connections_refused",
            "Connections a listener refused: not_allowed (outside allow), too_many"
            " (max_connections reached), client_connections (the client's limits.connections"
            " reached) or client_rate (the client over limits.connection_rate)",
            "counter",
            ("listener", "reason"),
        )
        for admission, count in self.refused.items():
            refused.add([self.listener, admission.value.replace("-", "_")], count)
        yield refused
        aborted = Metric(
            "gateway_listener_connections_aborted",
            "Connections a listener cut off, by why (stream_reset: HTTP/2 streams reset as"
            " soon as opened; idle_closed_for_room: an idle connection closed for a new one"
            " when max_connections were open)",
            "counter",
            ("listener", "reason"),
        )
        for why, count in sorted(self.aborted.items()):
            aborted.add([self.listener, why], count)
        yield aborted
        throttled = Metric(
            "gateway_listener_rate_limited",
            "Events of a client over one of the listener's limits: rates (connections,"
            " messages, recipients, articles, requests refused or slowed)",
            "counter",
            ("listener", "limit"),
        )
        for limit, count in sorted(self.throttled.items()):
            throttled.add([self.listener, limit], count)
        yield throttled
        yield Metric(
            "gateway_listener_auth_failures",
            "Failed logins on a listener (SMTP AUTH, NNTP AUTHINFO)",
            "counter",
            ("listener",),
        ).add([self.listener], self.auth_failures)
        if self._per_client is None and not self._rates:
            return
        limits = Metric(
            "gateway_listener_limit",
            "A listener's limits per client: connections open at once, or a rate in events"
            " per second",
            "gauge",
            ("listener", "limit"),
        )
        clients = Metric(
            "gateway_listener_limit_clients",
            "Clients a listener's limit is counting now (with a connection open, or seen"
            " recently for a rate)",
            "gauge",
            ("listener", "limit"),
        )
        if self._per_client is not None:
            limits.add([self.listener, "connections"], self._per_client.limit)
            clients.add([self.listener, "connections"], len(self._per_client))
        for name, limiter in sorted(self._rates.items()):
            limits.add([self.listener, name], limiter.rate.per_second)
            clients.add([self.listener, name], len(limiter))
        yield limits
        yield clients


class Listener(ABC, Generic[C]):
    """One configured listener at run time, as the service drives it.

    Subclasses count what they took in ``accepted`` (messages) and
    ``requests`` (queries and requests answered) for the status line, and say
    the rest in ``metrics()``.
    """

    def __init__(self, config: C, gateway: GatewayPort, reactor: Any) -> None:
        self.config = config
        self.gateway = gateway
        self.reactor = reactor
        self.ports: list[ListeningPort] = []
        self.accepted = 0
        self.requests = 0

    @property
    def name(self) -> str:
        return self.config.name

    def activity(self) -> tuple[int, int]:
        """(messages taken, requests answered) since start, for the status line."""
        return self.accepted, self.requests

    async def open(self) -> None:
        """Start accepting on every endpoint of ``listen``; on failure close what opened."""
        try:
            for description in self.config.listen:
                self.ports.append(await self.listen_on(str(description)))
                log.info(
                    "listener {listener} ({protocol}) accepting on {endpoint}",
                    listener=self.name,
                    protocol=self.config.protocol,
                    endpoint=description,
                )
        except Exception:
            await self.close()
            raise

    @abstractmethod
    async def listen_on(self, description: str) -> ListeningPort:
        """Open one endpoint of ``listen``."""

    def keeps_sockets(self, config: C) -> bool:
        """Whether a reload to ``config`` keeps this listener's sockets (and ``reconfigure``s)."""
        return config.protocol == self.config.protocol and config.listen == self.config.listen

    @abstractmethod
    def reconfigure(self, config: C) -> None:
        """New settings on the same sockets: later connections and requests use them."""

    async def drain(self, timeout: float) -> None:
        """At shutdown, after close(): end idle sessions, give busy ones ``timeout`` seconds."""
        return None

    async def close(self) -> None:
        """Stop accepting (connections already open go on until drained)."""
        ports, self.ports = self.ports, []
        for port in ports:
            stopped: Any = port.stopListening()
            if stopped is not None:
                await stopped

    @abstractmethod
    def metrics(self) -> Iterable[Metric]:
        """The counters this listener publishes for /metrics."""


class StreamListener(Listener[C]):
    """A listener on stream sockets (TCP, TLS, UNIX, systemd's), guarded by one ``Guard``.

    With a ``tls:`` block, its ``tls:`` endpoints speak TLS from the first byte and
    ``self.tls`` is what a protocol with STARTTLS starts TLS with on the others.
    """

    def __init__(self, config: C, gateway: GatewayPort, reactor: Any) -> None:
        super().__init__(config, gateway, reactor)
        tls = config.tls_config()
        self.tls: ServerTls | None = ServerTls(tls) if tls is not None else None
        self.guard: Guard[Any] = Guard(
            config.name,
            config.allow,
            config.connection_limit(),
            config.client_limits(),
            reactor.seconds,
        )

    @abstractmethod
    def factory(self) -> Factory[Any]:
        """The protocol's factory, built with ``self.guard`` (the same one for every endpoint)."""

    async def listen_on(self, description: str) -> ListeningPort:
        factory: Any = self.factory()
        if description.lower().startswith("tls:"):
            assert self.tls is not None  # the configuration says so
            endpoint = server_endpoint(self.reactor, tls_endpoint(description))
            factory = self.tls.wrap(factory)
        else:
            endpoint = server_endpoint(self.reactor, description)
            apply_tls_policy(endpoint)
        port: ListeningPort = await endpoint.listen(factory)
        return port

    def reconfigure(self, config: C) -> None:
        self.config = config
        tls = config.tls_config()
        if tls is None:
            self.tls = None
        elif self.tls is None:
            self.tls = ServerTls(tls)
        else:
            self.tls.update(tls)
        self.guard.configure(config.allow, config.connection_limit(), config.client_limits())

    def metrics(self) -> Iterable[Metric]:
        return self.guard.metrics()


def _rate_key(host: str, user: str) -> str:
    # "@" cannot start a client key (an address or a network), so users and clients
    # never share a bucket.
    return f"@{user}" if user else client_key(host)


def retry_after(wait: float) -> int:
    """Whole seconds to tell a throttled client to wait (Retry-After, "try in N seconds")."""
    return max(1, math.ceil(wait))


def message_metric(listener: str, accepted: int, rejected: int, tempfail: int) -> Metric:
    """Messages a store-and-forward listener was sent, by its answer (SMTP, NNTP, pollers)."""
    return (
        Metric(
            "gateway_listener_messages",
            "Messages a store-and-forward listener was sent, by its answer: accepted,"
            " rejected (5xx) or tempfail (4xx)",
            "counter",
            ("listener", "outcome"),
        )
        .add([listener, "accepted"], accepted)
        .add([listener, "rejected"], rejected)
        .add([listener, "tempfail"], tempfail)
    )


def duration_metric(listener: str, duration: Histogram) -> Metric:
    """From the end of a message to the listener's answer."""
    return Metric(
        "gateway_listener_message_duration_seconds",
        "From the end of a message to the listener's answer (routing and the spool write)",
        "histogram",
        ("listener",),
    ).add([listener], duration)
