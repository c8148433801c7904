"""The DNS listener: the gateway's side of the DNS and DoH servers.

For each query: parse the header and question (a small fast parser, not
dnspython), pick the route by name, then answer from the route's cache, from
its local records, with REFUSED/NXDOMAIN, or by asking the route's upstreams
in order.  Answers that do not fit a UDP client's buffer are truncated with
TC=1 so the client retries over TCP.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from gateway.config import Route, client_allowed, systemd_endpoint_args, udp_endpoint_args
from gateway.listening import Admission, Guard, ListeningPort, StreamListener
from gateway.ports import GatewayPort, Metric, Resolver, RouteTable
from gateway.protocols.dns.cache import DnsCache
from gateway.protocols.dns.client import UpstreamError
from gateway.protocols.dns.config import (
    DnsListenerConfig,
    DnsRoute,
    DohListenerConfig,
    parse_record,
)
from gateway.protocols.dns.routes import DnsRoutes
from gateway.protocols.dns.rrl import ResponseRateLimiter
from gateway.protocols.dns.server import DnsTcpFactory, DnsUdpProtocol, Reply
from gateway.protocols.dns.wire import (
    ANY,
    BADVERS,
    CLASS_IN,
    EDNS_UDP_SIZE,
    FORMERR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    BadVersion,
    Question,
    WireError,
    error_response,
    like_query,
    parse_query,
    truncate,
    with_id,
)
from gateway.stats import Histogram
from gateway.systemd import inherited_datagram_socket

log = Logger(namespace="gateway.dns.listener")


class LocalZone:
    """The records of a route's ``answer:``, answered with AA like a small authoritative zone."""

    def __init__(self, records: tuple[str, ...]) -> None:
        import dns.rrset

        self.rrsets: dict[tuple[str, int], list[dns.rrset.RRset]] = {}
        self.names: set[str] = set()
        for text in records:
            rrset = parse_record(text)
            name = rrset.name.to_text().lower()
            if not name.endswith("."):
                name += "."
            self.names.add(name)
            self.rrsets.setdefault((name, int(rrset.rdtype)), []).append(rrset)

    def answer(self, data: bytes, question: Question) -> bytes:
        import dns.exception
        import dns.flags
        import dns.message
        import dns.rcode
        import dns.rdatatype

        if question.qclass not in (CLASS_IN, ANY):
            # The records are class IN: for another class we have no data (RFC 1034 §4.3.2).
            return error_response(data, REFUSED, question)
        try:
            # Bytes after the last record are ignored, as for forwarded queries.
            query = dns.message.from_wire(data, ignore_trailing=True)
        except dns.exception.DNSException:
            return error_response(data, FORMERR, question)
        response = dns.message.make_response(query, our_payload=EDNS_UDP_SIZE)
        response.flags |= dns.flags.AA
        if question.do:
            response.ednsflags |= dns.flags.DO  # copied from the query (RFC 3225 §3)
        found = self.rrsets.get((question.qname, question.qtype))
        if found is None and question.qtype != dns.rdatatype.CNAME:
            found = self.rrsets.get((question.qname, int(dns.rdatatype.CNAME)))
        if found:
            response.answer.extend(found)
        elif question.qname not in self.names:
            response.set_rcode(dns.rcode.NXDOMAIN)
        wire: bytes = response.to_wire(max_size=65535)
        return wire


class RouteCounts:
    """What one route did with its queries; plain ints, so counting costs an increment."""

    __slots__ = ("cache", "forwarded", "local", "nxdomain", "refused", "servfail", "stale")
    outcomes = __slots__

    def __init__(self) -> None:
        self.cache = self.forwarded = self.local = self.nxdomain = 0
        self.refused = self.servfail = self.stale = 0


def _action(route: Route, keys: DnsRoute) -> str:
    if keys.action is not None:
        return "answered REFUSED" if keys.action == "refuse" else "answered NXDOMAIN"
    if keys.answer:
        return "answered from the route's records"
    return "forwarded to " + ", ".join(route.to) + (" (or from the cache)" if keys.cache else "")


class DnsListener:
    """Answers queries for one configured DNS or DoH listener (the DnsHandler).

    Clients outside the listener's ``allow`` get REFUSED for every query, so a
    listener on a public address is not an open resolver.
    """

    def __init__(self, config: DnsListenerConfig | DohListenerConfig, gateway: GatewayPort) -> None:
        self.configure(config)
        self.gateway = gateway
        self._table: RouteTable | None = None
        self._routes: DnsRoutes | None = None
        # Caches and local zones outlive reloads as long as their route is unchanged.
        self._caches: dict[str, tuple[Route, DnsCache]] = {}
        self._zones: dict[str, tuple[Route, LocalZone]] = {}
        # id(route) -> its DNS keys and the resolvers of its 'to', for the table in force
        self._plans: dict[int, tuple[DnsRoute, tuple[Resolver[Question] | None, ...]]] = {}
        self.clock = gateway.seconds
        self.tracer = gateway.tracer
        # For /metrics. Queries that reach no route count here, the rest per route.
        self.queries = 0
        self.malformed = 0
        self.notimp = 0
        self.unrouted = 0
        self.not_allowed = 0
        self.by_route: dict[str, RouteCounts] = {}
        self.upstream: dict[tuple[str, str], int] = {}  # (destination, answered|failed)
        self.upstream_duration: dict[str, Histogram] = {}

    def configure(self, config: DnsListenerConfig | DohListenerConfig) -> None:
        """Take the listener's settings (at start and on a reload)."""
        self.config = config
        # The largest answer a UDP client gets whole (DNS flag day 2020: 1232); DoH has none.
        self.max_udp = config.max_udp_size if isinstance(config, DnsListenerConfig) else 65535

    def _index(self, table: RouteTable) -> DnsRoutes:
        if table is not self._table or self._routes is None:
            routes = table.routes_for(self.config.name)
            self._routes = DnsRoutes(routes)
            self._plans = {id(r): (r.view(DnsRoute), _resolvers(table, r)) for r in routes}
            self._table = table
            names = {r.name for r in routes}
            self._caches = {k: v for k, v in self._caches.items() if k in names}
            self._zones = {k: v for k, v in self._zones.items() if k in names}
            self.by_route = {k: v for k, v in self.by_route.items() if k in names}
        return self._routes

    def _counts(self, name: str) -> RouteCounts:
        counts = self.by_route[name] = RouteCounts()
        return counts

    def caches(self) -> dict[str, DnsCache]:
        """The response cache of each route that has one, by route name."""
        return {name: cache for name, (_, cache) in self._caches.items()}

    def _cache(self, route: Route, keys: DnsRoute) -> DnsCache | None:
        if not keys.cache:
            return None
        held = self._caches.get(route.name)
        # The same Route object until a reload: compare all its fields only then.
        if held is None or (held[0] is not route and held[0] != route):
            cache = DnsCache(
                keys.cache_entries,
                clock=self.clock,
                serve_stale=float(keys.serve_stale),
            )
            held = (route, cache)
            self._caches[route.name] = held
        return held[1]

    def _zone(self, route: Route, keys: DnsRoute) -> LocalZone:
        held = self._zones.get(route.name)
        if held is None or held[0] != route:
            held = (route, LocalZone(keys.answer))
            self._zones[route.name] = held
        return held[1]

    # --- DnsHandler ---

    def answer(
        self, data: bytes, client: tuple[str, int], transport: str, reply: Reply | None = None
    ) -> Any:
        """The response to ``data``: bytes, None (no response), or a Deferred of either.

        With ``reply``, a response that is not ready at once goes there instead of through a
        Deferred, and None is returned.
        """
        self.queries += 1
        try:
            question = parse_query(data)
        except WireError as exc:
            if exc.header_ok and data[2] & 0x78:
                # Not a QUERY: NOTIMP whatever else is odd about it, as unbound does; a DSO
                # message has no question (RFC 8490 §5.1.1), an UPDATE's counts mean zones.
                self.notimp += 1
                return error_response(data, NOTIMP, getattr(exc, "question", None))
            self.malformed += 1
            if isinstance(exc, BadVersion):
                # RFC 6891 §6.1.3: we speak EDNS version 0 only, and say so, whatever the route.
                return error_response(data, BADVERS, exc.question)
            if not exc.header_ok:
                return None
            # With the question and an OPT record when the trouble is in the OPT (RFC 6891 §7).
            return error_response(data, FORMERR, getattr(exc, "question", None))
        if question.opcode != 0:
            self.notimp += 1
            return error_response(data, NOTIMP, question)
        allow = self.config.allow
        if allow and not client_allowed(allow, client[0]):
            self.not_allowed += 1
            return error_response(data, REFUSED, question)
        table = self.gateway.current()
        route = self._index(table).select(
            question.qname, question.qtype, question.qclass, client[0]
        )
        if route is None:
            self.unrouted += 1
            if self.tracer.active:
                self._trace(question, client, None, "refused: no route takes it")
            return error_response(data, REFUSED, question)
        counts = self.by_route.get(route.name) or self._counts(route.name)
        keys, resolvers = self._plans[id(route)]
        if self.tracer.active:
            self._trace(question, client, route, _action(route, keys))
        if keys.action is not None:
            if keys.action == "refuse":
                counts.refused += 1
                return error_response(data, REFUSED, question)
            counts.nxdomain += 1
            return error_response(data, NXDOMAIN, question)
        if keys.answer:
            counts.local += 1
            try:
                zone = self._zone(route, keys)
                return self._fit(zone.answer(data, question), question, transport)
            except Exception:
                log.failure("local answer of route {route} failed", route=route.name)
                return error_response(data, SERVFAIL, question)
        cache = self._cache(route, keys)
        if cache is not None:
            hit = cache.get(question.key, question.id)
            if hit is not None:
                counts.cache += 1
                # Cached for a query that may have spelled the name in another case or
                # without RD: give this client back its own question and RD bit.
                end = question.question_end
                if hit[12:end] != data[12:end] or (hit[2] ^ data[2]) & 1:
                    hit = like_query(hit, data, end)
                return self._fit(hit, question, transport)
        forward = _Forward(self, resolvers, route, data, question, client, transport, cache, counts)
        return forward.start(reply)

    def _trace(self, question: Any, client: Any, route: Route | None, action: str) -> None:
        self.tracer.emit(
            "dns",
            listener=self.config.name,
            client=client[0],
            qname=question.qname,
            qtype=question.qtype,
            route=route.name if route is not None else "",
            action=action,
        )

    def metrics(self) -> Iterable[Metric]:
        """What this listener's queries did: per route, per outcome, per cache, per upstream."""
        name = self.config.name
        yield Metric(
            "gateway_listener_requests",
            "Requests a listener received: DNS queries (DNS, DoH), HTTP requests (http)",
            "counter",
            ("listener",),
        ).add([name], self.queries)
        queries = Metric(
            "gateway_dns_queries",
            "DNS queries by route and outcome; route is empty for those no route took",
            "counter",
            ("listener", "route", "outcome"),
        )
        for outcome in ("malformed", "notimp", "unrouted", "not_allowed"):
            queries.add([name, "", outcome], getattr(self, outcome))
        for route, counts in sorted(self.by_route.items()):
            for outcome in RouteCounts.outcomes:
                queries.add([name, route, outcome], getattr(counts, outcome))
        yield queries
        labels = ("listener", "route")
        hits = Metric("gateway_dns_cache_hits", "Answers from a route's cache", "counter", labels)
        misses = Metric(
            "gateway_dns_cache_misses",
            "Queries a route's cache could not answer",
            "counter",
            labels,
        )
        stale = Metric(
            "gateway_dns_cache_stale_answers",
            "Expired answers served because every upstream failed (RFC 8767)",
            "counter",
            labels,
        )
        entries = Metric("gateway_dns_cache_entries", "Answers in a route's cache", "gauge", labels)
        for route, cache in sorted(self.caches().items()):
            hits.add([name, route], cache.hits)
            misses.add([name, route], cache.misses)
            stale.add([name, route], cache.stale_hits)
            entries.add([name, route], len(cache))
        yield from (hits, misses, stale, entries)
        answered = Metric(
            "gateway_dns_upstream_queries",
            "Queries sent to a DNS or DoH destination: answered or failed",
            "counter",
            ("destination", "outcome"),
        )
        for (destination, outcome), n in sorted(self.upstream.items()):
            answered.add([destination, outcome], n)
        yield answered
        latency = Metric(
            "gateway_dns_upstream_duration_seconds",
            "Time a DNS or DoH destination took to answer or fail",
            "histogram",
            ("destination",),
        )
        for destination, histogram in sorted(self.upstream_duration.items()):
            latency.add([destination], histogram)
        yield latency

    def _upstream(self, destination: str, outcome: str, seconds: float) -> None:
        key = (destination, outcome)
        self.upstream[key] = self.upstream.get(key, 0) + 1
        histogram = self.upstream_duration.get(destination)
        if histogram is None:
            histogram = self.upstream_duration[destination] = Histogram()
        histogram.observe(seconds)

    def _fit(self, response: bytes, question: Question, transport: str) -> bytes:
        """The response as a UDP client may get it: cut to its buffer and the cap, with TC."""
        if transport == "udp":
            limit = min(question.udp_size, self.max_udp)
            if len(response) > limit:
                return truncate(response, limit)
        return response


def _resolvers(table: RouteTable, route: Route) -> tuple[Resolver[Question] | None, ...]:
    """The destinations of a route's 'to' that answer DNS queries (None for any other)."""
    found = (table.destination(name) for name in route.to)
    return tuple(d if isinstance(d, Resolver) else None for d in found)


class _Forward:
    """One query on its way through a route's destinations (``to:``), in order.

    Plain callbacks, no coroutine: a ``dns`` destination is asked with ``ask()`` and calls
    back; others (``doh``) with ``resolve()`` and a Deferred. The response goes to the
    server's ``reply`` when it gave one (UDP: no Deferred at all), else through a Deferred
    returned to it. Exactly one response per query, SERVFAIL when something breaks.
    """

    __slots__ = (
        "cache",
        "client",
        "counts",
        "data",
        "deferred",
        "index",
        "listener",
        "name",
        "problems",
        "question",
        "reply",
        "resolvers",
        "route",
        "started",
        "transport",
    )

    def __init__(
        self,
        listener: DnsListener,
        resolvers: tuple[Resolver[Question] | None, ...],
        route: Route,
        data: bytes,
        question: Question,
        client: tuple[str, int],
        transport: str,
        cache: DnsCache | None,
        counts: RouteCounts,
    ) -> None:
        self.listener = listener
        self.resolvers = resolvers
        self.route = route
        self.data = data
        self.question = question
        self.client = client
        self.transport = transport
        self.cache = cache
        self.counts = counts
        self.index = 0  # into route.to: the destination to ask next
        self.name = ""  # the destination asked now
        self.started = 0.0
        self.problems: list[str] | None = None
        self.reply: Reply | None = None
        self.deferred: Deferred[bytes | None] | None = None

    def start(self, reply: Reply | None) -> Deferred[bytes | None] | None:
        """Ask the first destination; None when ``reply`` will be called with the response."""
        if reply is None:
            self.deferred = Deferred()
        else:
            self.reply = reply
        deferred = self.deferred  # it may have fired and been dropped by the time next() returns
        self.next()
        return deferred

    def next(self) -> None:
        """Ask the next destination, or answer stale or SERVFAIL when there is none left."""
        to = self.route.to
        resolvers = self.resolvers
        while self.index < len(to):
            name = self.name = to[self.index]
            destination = resolvers[self.index]
            self.index += 1
            if destination is None:
                self._problem(f"{name}: not a DNS destination")
                continue
            self.started = self.listener.clock()
            try:
                destination.ask(self.data, self.question, self._answered, self._failed)
            except Exception as exc:
                self._failed(exc)
            return
        self._finish(self._exhausted())

    def _answered(self, answer: bytes) -> None:
        listener = self.listener
        question = self.question
        try:
            listener._upstream(self.name, "answered", listener.clock() - self.started)
            if self.cache is not None:
                self.cache.put(question.key, answer)
            self.counts.forwarded += 1
            response = with_id(answer, question.id)
            response = listener._fit(response, question, self.transport)
        except Exception:
            log.failure(
                "route {route}: SERVFAIL for {qname}: the answer of {destination} could not be"
                " passed on",
                route=self.route.name,
                qname=question.qname,
                destination=self.name,
            )
            self.counts.servfail += 1
            response = error_response(self.data, SERVFAIL, question)
        self._finish(response)

    def _failed(self, error: BaseException | Failure) -> None:
        listener = self.listener
        name = self.name
        listener._upstream(name, "failed", listener.clock() - self.started)
        value = error.value if isinstance(error, Failure) else error
        if isinstance(value, UpstreamError):
            self._problem(f"{name}: {value}")
        else:
            failure = error if isinstance(error, Failure) else Failure(error)  # type: ignore[no-untyped-call]
            log.failure("destination {destination} failed", failure, destination=name)
            self._problem(f"{name}: internal error {value}")
        self.next()

    def _problem(self, problem: str) -> None:
        if self.problems is None:
            self.problems = []
        self.problems.append(problem)

    def _exhausted(self) -> bytes:
        """Every destination failed: a stale answer if the cache has one, else SERVFAIL."""
        route, question = self.route, self.question
        problems = "; ".join(self.problems or ())
        if self.cache is not None:
            stale = self.cache.get_stale(question.key, question.id)
            if stale is not None:
                stale = like_query(stale, self.data, question.question_end)
                self.counts.stale += 1
                log.info(
                    "route {route}: every upstream failed, serving a stale answer for"
                    " {qname} ({problems})",
                    route=route.name,
                    qname=question.qname,
                    problems=problems,
                )
                return self.listener._fit(stale, question, self.transport)
        log.warn(
            "route {route}: SERVFAIL for {qname}: {problems}",
            route=route.name,
            qname=question.qname,
            problems=problems,
        )
        self.counts.servfail += 1
        return error_response(self.data, SERVFAIL, question)

    def _finish(self, response: bytes) -> None:
        if self.reply is not None:
            try:
                self.reply(response, self.client)
            except Exception:
                log.failure("answering {client} failed", client=self.client)
        elif self.deferred is not None:
            deferred, self.deferred = self.deferred, None
            deferred.callback(response)


class DnsSockets(StreamListener[DnsListenerConfig]):
    """A DNS listener: its UDP and TCP endpoints share one DnsListener."""

    def __init__(self, config: DnsListenerConfig, gateway: GatewayPort, reactor: Any) -> None:
        super().__init__(config, gateway, reactor)
        self.handler = DnsListener(config, gateway)
        self.tcp = DnsTcpFactory(
            self.handler,
            reactor,
            idle_timeout=float(config.tcp_idle_timeout),
            guard=self.guard,
        )
        self.udp: list[DnsUdpProtocol] = []
        self.rrl: ResponseRateLimiter | None = None
        self._configure_rrl(config)

    def factory(self) -> DnsTcpFactory:
        return self.tcp

    def _configure_rrl(self, config: DnsListenerConfig) -> None:
        if config.rate_limit is None:
            self.rrl = None
        elif self.rrl is None:
            self.rrl = ResponseRateLimiter(config.rate_limit, self.gateway.seconds)
        else:
            self.rrl.configure(config.rate_limit)
        for protocol in self.udp:
            protocol.limiter = self.rrl

    def _udp_protocol(self) -> DnsUdpProtocol:
        self.udp = [p for p in self.udp if p.transport is not None]  # closed ones go
        protocol = DnsUdpProtocol(self.handler)
        protocol.limiter = self.rrl
        self.udp.append(protocol)
        return protocol

    async def listen_on(self, description: str) -> ListeningPort:
        if description.lower().startswith("udp:systemd:"):
            # Socket activation: the UDP socket systemd bound (ListenDatagram=).
            domain, index, name = systemd_endpoint_args(description)
            fd, family = inherited_datagram_socket(description, index, name, domain)
            # Twisted reads an adopted UDP socket until it would block, but does not make
            # it non-blocking (systemd-socket-activate passes blocking ones): we must.
            os.set_blocking(fd, False)
            protocol = self._udp_protocol()
            port: ListeningPort = self.reactor.adoptDatagramPort(fd, family, protocol)
            return port
        if description.lower().startswith("udp:"):
            number, interface = udp_endpoint_args(description)
            udp: ListeningPort = self.reactor.listenUDP(
                number, self._udp_protocol(), interface=interface
            )
            return udp
        return await super().listen_on(description)

    def reconfigure(self, config: DnsListenerConfig) -> None:
        super().reconfigure(config)
        self.handler.configure(config)
        self.tcp.idle_timeout = float(config.tcp_idle_timeout)
        self._configure_rrl(config)

    async def drain(self, timeout: float) -> None:
        for protocol in list(self.guard.connections):
            protocol._transport.loseConnection()

    def metrics(self) -> Iterable[Metric]:
        yield from super().metrics()
        yield from self.handler.metrics()
        if self.rrl is not None:
            yield (
                Metric(
                    "gateway_dns_rate_limited",
                    "UDP answers over the listener's rate_limit: dropped, or slipped (sent"
                    " truncated so that the client asks again over TCP)",
                    "counter",
                    ("listener", "action"),
                )
                .add([self.name, "dropped"], self.rrl.dropped)
                .add([self.name, "slipped"], self.rrl.slipped)
            )

    def activity(self) -> tuple[int, int]:
        return 0, self.handler.queries


class _GuardedConnection(ProtocolWrapper):
    """One DoH connection: a client that resets the stream being answered is cut off."""

    factory: _GuardedSite

    def dataReceived(self, data: bytes) -> None:
        try:
            super().dataReceived(data)  # type: ignore[no-untyped-call]
        except Exception as exc:
            from gateway.protocols.dns.doh_server import stream_gone  # loaded with the site

            if not stream_gone(exc):
                raise
            guard = self.factory.guard
            guard.abort(self, "stream_reset")
            transport: Any = self.transport
            log.info(
                "listener {listener}: {client} reset an HTTP/2 stream it had just opened"
                " (rapid reset); connection closed",
                listener=guard.listener,
                client=str(getattr(transport.getPeer(), "host", "")),
            )
            transport.abortConnection()


@implementer(IProtocolNegotiationFactory)
class _GuardedSite(WrappingFactory):
    """The DoH site behind the listener's guard: connections counted and limited (ALPN kept).

    A client outside ``allow`` is served, and each of its queries answered REFUSED.
    """

    noisy = False
    protocol = _GuardedConnection

    def __init__(self, site: Any, guard: Guard[Any]) -> None:
        super().__init__(site)  # type: ignore[no-untyped-call]
        self.guard = guard

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        host = str(getattr(addr, "host", ""))
        if self.guard.connect(protocol, host, check_allow=False) is not Admission.OK:
            self.guard.disconnect(protocol)
            return None
        return protocol

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        self.guard.disconnect(p)

    def acceptableProtocols(self) -> list[bytes]:
        protocols: list[bytes] = self.wrappedFactory.acceptableProtocols()
        return protocols


class DohSockets(StreamListener[DohListenerConfig]):
    """A DNS-over-HTTPS listener."""

    def __init__(self, config: DohListenerConfig, gateway: GatewayPort, reactor: Any) -> None:
        from gateway.protocols.dns.doh_server import doh_site

        super().__init__(config, gateway, reactor)
        self.handler = DnsListener(config, gateway)
        self.site = doh_site(
            self.handler,
            path=config.path,
            max_size=config.max_size,
            hsts=float(config.hsts),
            throttle=functools.partial(self.guard.throttle, "query_rate"),
        )
        self.guarded = _GuardedSite(self.site, self.guard)

    def factory(self) -> _GuardedSite:
        return self.guarded

    def keeps_sockets(self, config: DohListenerConfig) -> bool:
        return config == self.config  # the web site is built with its path and limits

    def reconfigure(self, config: DohListenerConfig) -> None:
        super().reconfigure(config)
        self.handler.configure(config)

    def metrics(self) -> Iterable[Metric]:
        yield from super().metrics()
        yield from self.handler.metrics()

    def activity(self) -> tuple[int, int]:
        return 0, self.handler.queries
