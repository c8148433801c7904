"""The running gateway: listeners, router and destinations built from one configuration.

``GatewayService`` owns the current ``Runtime`` (router plus destinations).  A
reload builds a new runtime and swaps it in one assignment; messages already
being handled keep the runtime they started with, and a retired runtime closes
its destinations once its last message is done.  Listeners whose sockets did
not change keep them; the others are opened before anything is put in force,
so a reload that cannot open one changes nothing (see _SocketSwap).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.config import (
    Config,
    ConfigError,
    ListenerConfig,
    Problem,
    Route,
    clash,
    load,
    socket_address,
)
from gateway.control import remove_status, status_path, write_status
from gateway.delivery import DeliveryManager
from gateway.destination import build_destination
from gateway.history import History
from gateway.history import Key as HistoryKey
from gateway.listening import Listener
from gateway.message import Message, addressed_to, local_hostname
from gateway.plugins import PluginError, Transforms, load_transforms
from gateway.ports import Destination, Reason, RouteTable, Status, Upload, Verdict
from gateway.protocols import registry
from gateway.queue_cli import iso_utc
from gateway.routing import (
    NoRoute,
    Router,
    Trace,
    TransformFailed,
    check_routes,
    resolve_secret_options,
)
from gateway.spool import QUEUED, SpoolError, SqliteSpool, Stored
from gateway.systemd import server_endpoint
from gateway.tracing import Tracer

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

log = Logger(namespace="gateway.service")


def load_checked(path: str | Path) -> tuple[Config, Transforms]:
    """Parse the file, load its plugins and check the routes against them.

    Raises ConfigError with every problem found; plugin load failures are
    reported the same way.
    """
    config = load(path)
    try:
        transforms = load_transforms(config.plugins)
    except PluginError as exc:
        raise ConfigError([Problem(None, str(exc))]) from None
    config, problems = resolve_secret_options(config, transforms, Path(path).resolve().parent)
    problems += check_routes(config, transforms)
    if problems:
        raise ConfigError(problems)
    return config, transforms


class Runtime(RouteTable):
    """One configuration in force: its router and its destinations."""

    def __init__(
        self, config: Config, transforms: Transforms, destinations: dict[str, Destination]
    ) -> None:
        self.config = config
        self.router = Router(config, transforms)
        self.destinations = destinations
        self.inflight = 0
        self.retired = False
        self._idle: list[Deferred[None]] = []

    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        if self.inflight == 0:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    # RouteTable, for the listeners
    def routes_for(self, listener: str) -> tuple[Route, ...]:
        return self.router.routes_for(listener)

    def destination(self, name: str) -> Destination | None:
        return self.destinations.get(name)


class ListenerService(Service):
    """One listener as a child service; its protocol's registry entry builds it."""

    def __init__(self, config: ListenerConfig, port: ServicePort, reactor: Any) -> None:
        self.listener: Listener[Any] = (
            registry().listener(config.protocol).build(config, port, reactor)
        )
        self.setName(config.name)  # type: ignore[no-untyped-call]

    @property
    def config(self) -> ListenerConfig:
        config: ListenerConfig = self.listener.config
        return config


class GatewayService(MultiService):
    """Listeners, destinations and the router of one configuration file."""

    def __init__(self, path: str | Path, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.path = Path(path)
        self.reactor = reactor
        self.runtime: Runtime | None = None
        self.listeners: dict[str, ListenerService] = {}
        self.ready = False
        self.stopping = False
        self._reloading: Deferred[bool] | None = None
        self.on_ready: list[Callable[[], None]] = []
        # Told "ready", "reloading" and "stopping" (systemd's notifications hang here).
        self.on_state: list[Callable[[str], None]] = []
        self.tracer = Tracer()  # routing decisions for whoever reads /trace
        self.port = ServicePort(self)
        self.admin_port: Any = None
        self.admin_endpoint: str | None = None
        self.spool: SqliteSpool | None = None
        self.delivery: DeliveryManager | None = None
        self.metrics: GatewayMetrics | None = None  # made at the first /metrics request
        self.history: History | None = None  # the last hour per minute, for the dashboard
        # Counters for /metrics and the status line.
        self.reloads = 0
        self.failed_reloads = 0
        self.last_reload: ReloadResult | None = None  # None: no reload since start
        self._reload_started = 0.0  # wall-clock time the reload in progress began
        self.loaded_at = 0.0  # wall-clock time the configuration in force was read
        self.status_path: Path | None = None  # see _write_status
        self.routed: dict[tuple[str, str], int] = {}  # (route, queued|failed) -> messages
        self.spool_refusals = 0
        self.spool_refused_at: float | None = None  # reactor time of the last refusal
        self.spool_error = ""

    # Seconds /readyz stays false after the spool refused a message (disk full or
    # unwritable); a message it takes in the meantime makes it ready at once.
    spool_refusal_window = 10.0

    # --- start and stop -----------------------------------------------------------

    def readiness_problems(self) -> list[str]:
        """Why the gateway is not ready to take traffic; empty when it is."""
        problems = []
        if self.stopping:
            problems.append("shutting down")
        elif not self.ready:
            problems.append("starting")
        elif self._reloading is not None:
            problems.append("reloading the configuration")
        for name, service in self.listeners.items():
            if not service.listener.ports:
                problems.append(f"listener {name} has no open socket")
        refused = self.spool_refused_at
        if refused is not None:
            ago = self.reactor.seconds() - refused
            if 0 <= ago < self.spool_refusal_window:
                problems.append(f"the spool refused a message {ago:.0f}s ago: {self.spool_error}")
        return problems

    def _announce(self, state: str) -> None:
        for callback in self.on_state:
            try:
                callback(state)
            except Exception:
                log.failure(
                    "telling {callback} the state {state} failed", callback=callback, state=state
                )

    def status_line(self) -> str:
        """One line on what the gateway is doing, for systemd's STATUS=."""
        if self.stopping:
            return "stopping: finishing the work in flight"
        if self.runtime is None:
            return "starting"
        if self._reloading is not None:
            return "reloading the configuration"
        config = self.runtime.config
        parts = [
            f"{len(self.listeners)} listener(s), {len(config.destinations)} destination(s),"
            f" {len(config.routes)} route(s)"
        ]
        accepted = requests = 0
        for service in self.listeners.values():
            taken, answered = service.listener.activity()
            accepted += taken
            requests += answered
        if accepted:
            parts.append(f"{accepted} message(s) accepted")
        if requests:
            parts.append(f"{requests} request(s) answered")
        if self.delivery is not None:
            c = self.delivery.counters
            parts.append(f"{c.delivered} delivered, {c.deferred} deferred, {c.dead} dead")
        if self.last_reload is not None and not self.last_reload.ok:
            parts.append("the last reload failed (see the log); the routes before it stay")
        return "; ".join(parts)

    def totals(self) -> dict[HistoryKey, int]:
        """The running totals the dashboard charts: messages per route and outcome,
        deliveries per destination and outcome."""
        out = {("route", route, outcome): n for (route, outcome), n in self.routed.items()}
        if self.delivery is not None:
            for (name, outcome), n in self.delivery.counters.by_destination.items():
                out["destination", name, outcome] = n
        return out

    async def _open_admin(self, endpoint: str | None) -> None:
        """At start: the admin site on ``endpoint`` (none when None)."""
        self.admin_endpoint = endpoint
        if endpoint is not None:
            self.admin_port = await self.listen_admin(endpoint)

    async def listen_admin(self, endpoint: str) -> Any:
        from gateway.admin import admin_site

        ep = server_endpoint(self.reactor, str(endpoint))
        port = await ep.listen(admin_site(self))
        log.info("admin site (/metrics, /healthz, /readyz) on {endpoint}", endpoint=endpoint)
        return port

    async def start(self, loaded: tuple[Config, Transforms] | None = None) -> None:
        """Load the file (unless given) and open every listener; raise on any failure."""
        config, transforms = loaded if loaded is not None else load_checked(self.path)
        self.loaded_at = time.time()
        _log_warnings(config)
        self.runtime = Runtime(config, transforms, self._destinations(config, {}))
        spool = SqliteSpool(str(config.spool), self.reactor)
        await spool.open()
        self.spool = spool
        stats = await spool.stats()
        log.info(
            "spool {path}: {queued} deliveries queued, {dead} dead letters",
            path=str(spool.path),
            queued=stats.queued,
            dead=stats.dead,
        )
        if stats.queued:
            # A restart often follows a fix (an upstream back, a corrected route):
            # what waited for its next try is tried again now, not after its back-off.
            queued = await spool.entries(QUEUED)
            await spool.retry([d.id for d in queued])
        self.delivery = DeliveryManager(spool, self, self.reactor)
        self.delivery.start()
        self.history = History(self.totals, self.reactor)
        self.history.start()
        await self._open_admin(config.admin)
        for name, lconf in config.listeners.items():
            service = ListenerService(lconf, self.port, self.reactor)
            await service.listener.open()
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.listeners[name] = service
        self.ready = True
        log.info(
            "gateway ready: {listeners} listener(s), {destinations} destination(s),"
            " {routes} route(s)",
            listeners=len(config.listeners),
            destinations=len(config.destinations),
            routes=len(config.routes),
        )
        self.status_path = status_path(str(config.spool))
        self._write_status()
        for callback in self.on_ready:
            callback()
        self._announce("ready")

    def _destinations(self, config: Config, old: dict[str, Destination]) -> dict[str, Destination]:
        built: dict[str, Destination] = {}
        previous = self.runtime.config.destinations if self.runtime else {}
        for name, dconf in config.destinations.items():
            if name in old and previous.get(name) == dconf:
                built[name] = old[name]  # unchanged: keep its connections
            else:
                built[name] = build_destination(dconf, self.reactor)
        return built

    async def shutdown(self) -> None:
        """Stop accepting, let work in flight finish (bounded), close everything."""
        if self.stopping:
            return
        self.stopping = True
        self.ready = False
        self._announce("stopping")
        runtime = self.runtime
        timeout = runtime.config.shutdown_timeout if runtime else 0.0
        log.info(
            "shutting down: no new connections; waiting up to {timeout}s for work in flight",
            timeout=timeout,
        )
        for service in self.listeners.values():
            await service.listener.close()
        # The admin site stays open to the end: /readyz says "shutting down" meanwhile.
        deadline = self.reactor.seconds() + timeout
        if runtime is not None:
            await self._bounded(runtime.when_idle(), timeout, "messages in flight")
        # Sessions between messages get a moment to say QUIT, then a 421.
        for service in self.listeners.values():
            await service.listener.drain(min(1.0, max(0.0, deadline - self.reactor.seconds())))
        if self.delivery is not None:
            await self.delivery.stop(max(0.0, deadline - self.reactor.seconds()))
        if runtime is not None:
            for dest in runtime.destinations.values():
                remaining = max(0.0, deadline - self.reactor.seconds())
                await self._bounded(
                    Deferred.fromCoroutine(dest.close()),
                    remaining,
                    f"destination {dest.name} to close",
                )
        if self.spool is not None:
            await self.spool.close()
        if self.history is not None:
            self.history.stop()
        if self.admin_port is not None:
            await self.admin_port.stopListening()
            self.admin_port = None
        remove_status(self.status_path)
        log.info("gateway stopped")

    async def _bounded(self, d: Deferred[None], timeout: float, what: str) -> None:
        timer = self.reactor.callLater(timeout, d.cancel)
        try:
            await d
        except defer.CancelledError:
            log.warn("gave up waiting for {what} after {timeout}s", what=what, timeout=timeout)
        finally:
            if timer.active():
                timer.cancel()

    # --- reload ---------------------------------------------------------------------

    def reload(self) -> Deferred[bool]:
        """Re-read the file; keep the running routes if it is invalid. Fires True on success."""
        if self._reloading is not None:
            # A reload while one is running: let it finish, then read the file again.
            return self._reloading.addCallback(lambda _: self.reload())
        if self.stopping or self.runtime is None:
            return defer.succeed(False)
        self._announce("reloading")
        # Before the file is read: `gateway reload` waits for a reload that began after
        # its signal.
        self._reload_started = time.time()
        d = Deferred.fromCoroutine(self._reload())
        self._reloading = d

        def failed(failure: Failure) -> bool:
            log.failure("reload failed", failure)
            self._reload_result(False, [f"internal error: {failure.getErrorMessage()}"])
            return False

        def done(result: bool) -> bool:
            self._reloading = None
            self.reloads += 1
            self.failed_reloads += not result
            self._write_status()
            if not self.stopping:
                self._announce("ready")
            return result

        return d.addErrback(failed).addCallback(done)

    async def _reload(self) -> bool:
        if self.stopping or self.runtime is None:
            self._reload_result(False, ["the gateway is stopping"])
            return False
        try:
            config, transforms = load_checked(self.path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error(
                    "reload refused, the running routes stay in force: {problem}",
                    problem=str(problem),
                )
            self._reload_result(False, [str(p) for p in exc.problems])
            return False
        _log_warnings(config)
        old = self.runtime
        if config.spool != old.config.spool:
            log.warn(
                "reload: the spool folder changed to {new}; that takes a restart, the"
                " gateway keeps using {old}",
                new=config.spool,
                old=old.config.spool,
            )
            config = dataclasses.replace(config, spool=old.config.spool)
        try:
            destinations = self._destinations(config, old.destinations)
        except Exception as exc:
            log.failure("reload refused: building the destinations failed")
            self._reload_result(False, [f"building the destinations failed: {exc}"])
            return False
        fresh = [
            d for d in destinations.values() if all(d is not o for o in old.destinations.values())
        ]
        swap = _SocketSwap(self, config)
        try:
            await swap.prepare()
        except _Refused as exc:
            log.error(
                "reload refused, the running listeners and routes stay in force: {why}",
                why=exc.why,
            )
            for dest in fresh:
                Deferred.fromCoroutine(dest.close())
            self._reload_result(False, [exc.why])
            return False
        swap.commit()
        await swap.close_old()
        self.runtime = Runtime(config, transforms, destinations)
        old.retired = True
        self._retire(old, destinations)
        log.info("configuration reloaded: {routes} route(s)", routes=len(config.routes))
        self._reload_result(True, [])
        return True

    def _reload_result(self, ok: bool, problems: list[str]) -> None:
        self.last_reload = ReloadResult(time.time(), ok, tuple(problems), self._reload_started)
        if ok:
            self.loaded_at = self.last_reload.at

    def _write_status(self) -> None:
        """The status file ``gateway reload`` reads: this process, its last reload."""
        if self.status_path is None or self.stopping:
            return
        last = self.last_reload
        try:
            write_status(
                self.status_path,
                {
                    "pid": os.getpid(),
                    "loaded_at": self.loaded_at,
                    "reloads": self.reloads,
                    "last_reload": None if last is None else dataclasses.asdict(last),
                },
            )
        except OSError as exc:
            log.warn(
                "cannot write the status file {path} ('gateway reload' reads it): {error}",
                path=str(self.status_path),
                error=str(exc),
            )

    def configuration_line(self) -> str:
        """Which configuration is in force and how the last reload went, for /readyz."""
        loaded = iso_utc(self.loaded_at) if self.loaded_at else "-"
        last = self.last_reload
        if last is None:
            return f"configuration: loaded {loaded} at start"
        if last.ok:
            return f"configuration: reloaded {iso_utc(last.at)}"
        why = last.problems[0] if last.problems else "see the log"
        more = f" (and {len(last.problems) - 1} more)" if len(last.problems) > 1 else ""
        return (
            f"configuration: reload refused {iso_utc(last.at)}, the one loaded {loaded} stays:"
            f" {why}{more}"
        )

    def _retire(self, old: Runtime, kept: dict[str, Destination]) -> None:
        stale = [d for d in old.destinations.values() if all(d is not k for k in kept.values())]

        def close(_: object) -> None:
            for dest in stale:
                Deferred.fromCoroutine(dest.close())

        old.when_idle().addCallback(close)

    # --- handling messages --------------------------------------------------------------

    def current(self) -> Runtime:
        if self.runtime is None:
            raise RuntimeError("the gateway has not started")
        return self.runtime

    def hostname_for(self, listener: str) -> str:
        """The name the gateway gives itself on ``listener`` (for Received and bounces)."""
        config = self.current().config.listeners.get(listener)
        return str(getattr(config, "hostname", "") or local_hostname())

    async def submit(self, message: Message, *, state: Mapping[str, str] | None = None) -> Verdict:
        """Route ``message`` and store every copy in the spool.

        The verdict decides the listener's reply: success only once every copy
        is on disk; the delivery workers take it from there.  ``state`` (a
        poller's high-water mark) is stored in the same spool transaction as
        the message; when no copy is stored, the caller keeps it itself.
        """
        runtime = self.current()
        runtime.enter()
        try:
            return await self._submit(runtime, message, state)
        finally:
            runtime.leave()

    accept = submit

    async def _submit(
        self, runtime: Runtime, message: Message, state: Mapping[str, str] | None = None
    ) -> Verdict:
        if not self.tracer.active:
            return await self._route_and_store(runtime, message, state, None, None)
        trace, taken = Trace(), Taken()
        verdict = await self._route_and_store(runtime, message, state, trace, taken)
        self._trace(message, verdict, trace, taken)
        return verdict

    def _trace(self, message: Message, verdict: Verdict, trace: Trace, taken: Taken) -> None:
        if verdict.status is Status.DELIVERED:
            outcome = "queued" if taken.routes else "dropped"
        else:
            outcome = "refused" if verdict.status is Status.PERMANENT else "tempfail"
        self.tracer.emit(
            "routed",
            id=message.id,
            listener=message.listener,
            client=message.client,
            user=message.user,
            kind=str(message.kind),
            msgid=getattr(message, "message_id", None) or "",
            to=list(addressed_to(message)),
            routes=taken.routes,
            destinations=taken.destinations,
            outcome=outcome,
            detail=verdict.detail,
            steps=trace.steps,
        )

    async def _route_and_store(
        self,
        runtime: Runtime,
        message: Message,
        state: Mapping[str, str] | None,
        trace: Trace | None,
        taken: Taken | None,
    ) -> Verdict:
        try:
            routed = await runtime.router.route(message, trace)
        except NoRoute as exc:
            log.info("message {id} refused: {reason}", id=message.id, reason=str(exc))
            return Verdict(Status.PERMANENT, Reason.NO_ROUTE, str(exc), exc.recipients)
        except TransformFailed as exc:
            reject = exc.rejected
            if reject is not None:
                self._count_route(exc.route, "rejected")
                return Verdict(Status.PERMANENT, reject.reason, reject.detail)
            self._count_route(exc.route, "failed")
            return Verdict(Status.TEMPORARY, Reason.FAILED, str(exc))
        if not routed:
            log.info("message {id} dropped by the transforms of its route(s)", id=message.id)
            return Verdict(Status.DELIVERED, Reason.NONE, "dropped by a transform")
        if self.spool is None or self.delivery is None:
            return Verdict(Status.TEMPORARY, Reason.UNAVAILABLE, "the spool is not open")
        items = [Stored(r.message, r.route.name, r.destinations, message.id) for r in routed]
        if taken is not None:
            taken.routes = [r.route.name for r in routed]
            taken.destinations = list(dict.fromkeys(d for r in routed for d in r.destinations))
        try:
            deliveries = await self.spool.put(items, state)
        except SpoolError as exc:
            self.spool_refusals += 1
            self.spool_refused_at = self.reactor.seconds()
            self.spool_error = str(exc)
            log.error("message {id} not accepted: {error}", id=message.id, error=str(exc))
            return Verdict(Status.TEMPORARY, Reason.UNAVAILABLE, str(exc))
        self.spool_refused_at = None
        msgid = getattr(message, "message_id", None) or ""
        for item in routed:
            self._count_route(item.route.name, "queued")
            recipients = addressed_to(item.message)
            log.info(
                "id={id} msgid={msgid} route={route} to={to} outcome=queued destinations={dests}",
                id=message.id,
                msgid=msgid,
                route=item.route.name,
                to=",".join(recipients),
                dests=",".join(item.destinations),
            )
        payload_ids = list(dict.fromkeys(d.message_id for d in deliveries))
        messages = {
            pid: self.spool.stored_form(item.message, pid)
            for pid, item in zip(payload_ids, items, strict=True)
        }
        self.delivery.offer(deliveries, messages)
        return Verdict(
            Status.DELIVERED, Reason.NONE, f"queued as {message.id}", queue_id=message.id
        )

    def _count_route(self, route: str, outcome: str) -> None:
        key = (route, outcome)
        self.routed[key] = self.routed.get(key, 0) + 1


@dataclass
class Taken:
    """The routes and destinations a traced message went to."""

    routes: list[str] = dataclasses.field(default_factory=list)
    destinations: list[str] = dataclasses.field(default_factory=list)


def _log_warnings(config: Config) -> None:
    for warning in config.warnings:
        log.warn("configuration: {warning}", warning=str(warning))


@dataclass(frozen=True)
class ReloadResult:
    """The outcome of the last reload, for /metrics, /readyz and ``gateway reload``."""

    at: float  # wall-clock time it ended
    ok: bool
    problems: tuple[str, ...]
    started: float  # wall-clock time it began (the file was read after it)


class _Refused(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _SocketSwap:
    """The listeners (and admin site) of a new configuration, opened all or none.

    prepare() opens every new socket while the old ones still serve; a socket
    that can only be bound once an old one lets go of the same address waits
    for it, and if anything fails, every socket opened is closed and every one
    given up is opened again: the running listeners stay as they were.  commit()
    then puts the new set in force, and close_old() closes what it replaced.
    """

    def __init__(self, gateway: GatewayService, config: Config) -> None:
        self.gateway = gateway
        self.config = config
        current = gateway.listeners
        self.going = {
            name: service
            for name, service in current.items()
            if name not in config.listeners
            or not service.listener.keeps_sockets(config.listeners[name])
        }
        self.kept = {name: s for name, s in current.items() if name not in self.going}
        self.opened: dict[str, ListenerService] = {}
        self.released: list[ListenerService] = []  # old ones closed early, to free an address
        self.admin_port: Any = None
        self.admin_released = False
        self.admin_changes = config.admin != gateway.admin_endpoint
        self.stale_admin: Any = None  # the admin socket commit() replaced

    def _held(self, names: list[str]) -> list[tuple[str, tuple[str, str, str]]]:
        held = []
        for name in names:
            for endpoint in self.going[name].config.listen:
                address = socket_address(str(endpoint))
                if address is not None:
                    held.append((name, address))
        return held

    def _blockers(self, endpoints: list[str]) -> set[str]:
        """The old listeners holding an address one of ``endpoints`` needs."""
        wanted = [a for a in map(socket_address, endpoints) if a is not None]
        return {
            name
            for name, held in self._held(list(self.going))
            if any(clash(held, w) for w in wanted)
        }

    def _admin_blocked(self, endpoint: str) -> bool:
        old = self.gateway.admin_endpoint
        if old is None or self.gateway.admin_port is None:
            return False
        a, b = socket_address(endpoint), socket_address(old)
        return a is not None and b is not None and clash(a, b)

    async def prepare(self) -> None:
        gateway = self.gateway
        new = [
            (name, lconf) for name, lconf in self.config.listeners.items() if name not in self.kept
        ]
        first = [(n, c) for n, c in new if not self._blockers([str(e) for e in c.listen])]
        later = [(n, c) for n, c in new if (n, c) not in first]
        try:
            for name, lconf in first:
                await self._open(name, lconf)
            admin = self.config.admin
            if self.admin_changes and admin is not None and not self._admin_blocked(str(admin)):
                self.admin_port = await self._listen_admin(str(admin))
            # What needs an address an old listener holds: that one lets go first.
            for name, lconf in later:
                for blocker in sorted(self._blockers([str(e) for e in lconf.listen])):
                    service = self.going[blocker]
                    if service not in self.released:
                        await service.listener.close()
                        self.released.append(service)
                await self._open(name, lconf)
            if self.admin_changes and admin is not None and self.admin_port is None:
                if gateway.admin_port is not None:
                    await gateway.admin_port.stopListening()
                    self.admin_released = True
                self.admin_port = await self._listen_admin(str(admin))
        except _Refused:
            await self._undo()
            raise
        except Exception as exc:
            await self._undo()
            raise _Refused(f"giving up the old sockets failed: {exc}") from exc

    async def _open(self, name: str, lconf: ListenerConfig) -> None:
        try:
            service = ListenerService(lconf, self.gateway.port, self.gateway.reactor)
            await service.listener.open()
        except Exception as exc:
            raise _Refused(f"listener '{name}' cannot open: {exc}") from exc
        self.opened[name] = service

    async def _listen_admin(self, endpoint: str) -> Any:
        try:
            return await self.gateway.listen_admin(endpoint)
        except Exception as exc:
            raise _Refused(f"the admin site cannot open on {endpoint}: {exc}") from exc

    async def _undo(self) -> None:
        for service in self.opened.values():
            await service.listener.close()
        if self.admin_port is not None:
            await self.admin_port.stopListening()
        for service in self.released:
            try:
                await service.listener.open()
            except Exception as exc:
                log.critical(
                    "listener {listener} could not take its sockets back after a refused"
                    " reload: {error}",
                    listener=service.name,
                    error=str(exc),
                )
        if self.admin_released and self.gateway.admin_endpoint is not None:
            try:
                self.gateway.admin_port = await self.gateway.listen_admin(
                    self.gateway.admin_endpoint
                )
            except Exception as exc:
                self.gateway.admin_port = None
                log.critical(
                    "the admin site could not take its socket back: {error}", error=str(exc)
                )

    def commit(self) -> None:
        gateway = self.gateway
        for service in self.going.values():
            service.disownServiceParent()  # type: ignore[no-untyped-call]
        services: dict[str, ListenerService] = {}
        for name, lconf in self.config.listeners.items():
            existing = self.kept.get(name)
            if existing is None:
                services[name] = self.opened[name]
                self.opened[name].setServiceParent(gateway)  # type: ignore[no-untyped-call]
                continue
            if existing.config != lconf:
                try:
                    existing.listener.reconfigure(lconf)
                except Exception:
                    log.failure("listener {listener}: the new settings failed", listener=name)
            services[name] = existing
        gateway.listeners = services
        if self.admin_changes:
            self.stale_admin = None if self.admin_released else gateway.admin_port
            gateway.admin_port = self.admin_port
            gateway.admin_endpoint = self.config.admin

    async def close_old(self) -> None:
        for name, service in self.going.items():
            if service not in self.released:
                await service.listener.close()
            log.info("listener {listener} closed", listener=name)
        if self.stale_admin is not None:
            await self.stale_admin.stopListening()


class ServicePort:
    """The GatewayPort of a GatewayService: the few calls listeners make, nothing more."""

    def __init__(self, service: GatewayService) -> None:
        self._service = service
        # The reactor's own method: the clock is read on hot paths (each DNS query).
        self.seconds: Callable[[], float] = service.reactor.seconds
        self.tracer = service.tracer

    @property
    def stopping(self) -> bool:
        return self._service.stopping

    def current(self) -> RouteTable:
        return self._service.current()

    def accepts_recipient(
        self, listener: str, sender: str, recipient: str, client: str, user: str = ""
    ) -> bool:
        router = self._service.current().router
        return router.accepts_recipient(listener, sender, recipient, client, user)

    async def submit(self, message: Message, *, state: Mapping[str, str] | None = None) -> Verdict:
        return await self._service.submit(message, state=state)

    async def get_state(self, key: str) -> str | None:
        spool = self._service.spool
        if spool is None:
            raise SpoolError("the spool is not open")
        return await spool.get_state(key)

    async def set_state(self, key: str, value: str) -> None:
        spool = self._service.spool
        if spool is None:
            raise SpoolError("the spool is not open")
        await spool.set_state(key, value)

    def upload(self) -> Upload:
        spool = self._service.spool
        if spool is None:
            raise OSError("the spool is not open")
        return spool.upload()
