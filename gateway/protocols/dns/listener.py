"""The DNS listener: the gateway's side of the DNS and DoH servers.

For each query: parse the header and question (a small fast parser, not
dnspython), pick the route by name, then answer from the route's cache, from
its local records, with REFUSED/NXDOMAIN, or by asking the route's upstreams
in order.  Answers that do not fit a UDP client's buffer are truncated with
TC=1 so the client retries over TCP.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from gateway.config import (
    DnsListenerConfig,
    DohListenerConfig,
    Route,
    _parse_record,
    systemd_endpoint_args,
    udp_endpoint_args,
)
from gateway.protocols.dns.cache import DnsCache
from gateway.protocols.dns.client import UpstreamError
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
from gateway.routing import DnsRoutes
from gateway.stats import Histogram
from gateway.systemd import inherited_datagram_socket, server_endpoint

if TYPE_CHECKING:
    from gateway.service import GatewayService, Runtime

log = Logger(namespace="gateway.dns.listener")


class LocalZone:
    """The records of a route's ``answer:``, answered with AA like a small authoritative zone."""

    def __init__(self, records: tuple[str, ...]) -> None:
        import dns.rrset

        self.rrsets: dict[tuple[str, int], list[dns.rrset.RRset]] = {}
        self.names: set[str] = set()
        for text in records:
            rrset = _parse_record(text)
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


class DnsListener:
    """Answers queries for one configured DNS or DoH listener (the DnsHandler)."""

    def __init__(
        self, config: DnsListenerConfig | DohListenerConfig, gateway: GatewayService
    ) -> None:
        self.config = config
        self.gateway = gateway
        self._runtime: Runtime | None = None
        self._routes: DnsRoutes | None = None
        # Caches and local zones outlive reloads as long as their route is unchanged.
        self._caches: dict[str, tuple[Route, DnsCache]] = {}
        self._zones: dict[str, tuple[Route, LocalZone]] = {}
        # For /metrics. Queries that reach no route count here, the rest per route.
        self.queries = 0
        self.malformed = 0
        self.notimp = 0
        self.unrouted = 0
        self.by_route: dict[str, RouteCounts] = {}
        self.upstream: dict[tuple[str, str], int] = {}  # (destination, answered|failed)
        self.upstream_duration: dict[str, Histogram] = {}

    def _index(self, runtime: Runtime) -> DnsRoutes:
        if runtime is not self._runtime or self._routes is None:
            routes = runtime.router.routes_for(self.config.name)
            self._routes = DnsRoutes(routes)
            self._runtime = runtime
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

    def _cache(self, route: Route) -> DnsCache | None:
        if not route.cache:
            return None
        held = self._caches.get(route.name)
        # The same Route object until a reload: compare all its fields only then.
        if held is None or (held[0] is not route and held[0] != route):
            cache = DnsCache(
                route.cache_entries,
                clock=self.gateway.reactor.seconds,
                serve_stale=float(route.serve_stale),
            )
            held = (route, cache)
            self._caches[route.name] = held
        return held[1]

    def _zone(self, route: Route) -> LocalZone:
        held = self._zones.get(route.name)
        if held is None or held[0] != route:
            held = (route, LocalZone(route.answer))
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
        runtime = self.gateway.current()
        route = self._index(runtime).select(
            question.qname, question.qtype, question.qclass, client[0]
        )
        if route is None:
            self.unrouted += 1
            return error_response(data, REFUSED, question)
        counts = self.by_route.get(route.name) or self._counts(route.name)
        if route.action is not None:
            if route.action == "refuse":
                counts.refused += 1
                return error_response(data, REFUSED, question)
            counts.nxdomain += 1
            return error_response(data, NXDOMAIN, question)
        if route.answer:
            counts.local += 1
            try:
                return self._fit(self._zone(route).answer(data, question), question, transport)
            except Exception:
                log.failure("local answer of route {route} failed", route=route.name)
                return error_response(data, SERVFAIL, question)
        cache = self._cache(route)
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
        forward = _Forward(self, runtime, route, data, question, client, transport, cache, counts)
        return forward.start(reply)

    def _upstream(self, destination: str, outcome: str, seconds: float) -> None:
        key = (destination, outcome)
        self.upstream[key] = self.upstream.get(key, 0) + 1
        histogram = self.upstream_duration.get(destination)
        if histogram is None:
            histogram = self.upstream_duration[destination] = Histogram()
        histogram.observe(seconds)

    @staticmethod
    def _fit(response: bytes, question: Question, transport: str) -> bytes:
        if transport == "udp" and len(response) > question.udp_size:
            return truncate(response, question.udp_size)
        return response


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
        "route",
        "runtime",
        "started",
        "transport",
    )

    def __init__(
        self,
        listener: DnsListener,
        runtime: Runtime,
        route: Route,
        data: bytes,
        question: Question,
        client: tuple[str, int],
        transport: str,
        cache: DnsCache | None,
        counts: RouteCounts,
    ) -> None:
        self.listener = listener
        self.runtime = runtime
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
        destinations = self.runtime.destinations
        while self.index < len(to):
            name = self.name = to[self.index]
            self.index += 1
            destination: Any = destinations.get(name)
            self.started = self.listener.gateway.reactor.seconds()
            try:
                ask = getattr(destination, "ask", None)
                if ask is not None:
                    ask(self.data, self.question, self._answered, self._failed)
                    return
                resolve = getattr(destination, "resolve", None)
                if resolve is None:
                    self._problem(f"{name}: not a DNS destination")
                    continue
                asking: Any = resolve(self.data, self.question)
                if asking.__class__ is not Deferred:
                    asking = ensureDeferred(asking)
            except Exception:
                self._failed(Failure())  # type: ignore[no-untyped-call]
                return
            asking.addCallbacks(self._answered, self._failed)
            return
        self._finish(self._exhausted())

    def _answered(self, answer: bytes) -> None:
        listener = self.listener
        question = self.question
        try:
            listener._upstream(
                self.name, "answered", listener.gateway.reactor.seconds() - self.started
            )
            if self.cache is not None:
                self.cache.put(question.key, answer)
            self.counts.forwarded += 1
            response = with_id(answer, question.id)
            if self.transport == "udp" and len(response) > question.udp_size:
                response = truncate(response, question.udp_size)
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
        listener._upstream(name, "failed", listener.gateway.reactor.seconds() - self.started)
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
                return DnsListener._fit(stale, question, self.transport)
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


class DnsSockets:
    """The sockets of a DNS listener: UDP and TCP endpoints share one DnsListener."""

    def __init__(self, config: DnsListenerConfig, gateway: GatewayService, reactor: Any) -> None:
        self.handler = DnsListener(config, gateway)
        self.reactor = reactor
        self.tcp = DnsTcpFactory(
            self.handler,
            reactor,
            idle_timeout=float(config.tcp_idle_timeout),
            max_connections=config.max_tcp_connections,
        )

    async def listen_on(self, description: str) -> Any:
        if description.lower().startswith("udp:systemd:"):
            # Socket activation: the UDP socket systemd bound (ListenDatagram=).
            domain, index, name = systemd_endpoint_args(description)
            fd, family = inherited_datagram_socket(description, index, name, domain)
            # Twisted reads an adopted UDP socket until it would block, but does not make
            # it non-blocking (systemd-socket-activate passes blocking ones): we must.
            os.set_blocking(fd, False)
            protocol = DnsUdpProtocol(self.handler)
            return self.reactor.adoptDatagramPort(fd, family, protocol)
        if description.lower().startswith("udp:"):
            port, interface = udp_endpoint_args(description)
            return self.reactor.listenUDP(port, DnsUdpProtocol(self.handler), interface=interface)
        return await server_endpoint(self.reactor, description).listen(self.tcp)

    def reconfigure(self, config: DnsListenerConfig) -> None:
        self.handler.config = config
        self.tcp.idle_timeout = float(config.tcp_idle_timeout)
        self.tcp.max_connections = config.max_tcp_connections

    async def drain(self, timeout: float) -> None:
        for protocol in list(self.tcp.connections):
            protocol._transport.loseConnection()


@implementer(IProtocolNegotiationFactory)
class _CountingFactory(WrappingFactory):
    """The site, with its open connections kept in ``protocols`` (ALPN passed through)."""

    noisy = False

    def acceptableProtocols(self) -> list[bytes]:
        protocols: list[bytes] = self.wrappedFactory.acceptableProtocols()
        return protocols


class DohSockets:
    """The sockets of a DoH listener."""

    def __init__(self, config: DohListenerConfig, gateway: GatewayService, reactor: Any) -> None:
        from gateway.protocols.dns.doh_server import doh_site

        self.handler = DnsListener(config, gateway)
        self.reactor = reactor
        self.site = doh_site(self.handler, path=config.path, max_size=config.max_size)
        # Keeps the open connections (``protocols``) for /metrics.
        self.counted = _CountingFactory(self.site)  # type: ignore[no-untyped-call]

    async def listen_on(self, description: str) -> Any:
        return await server_endpoint(self.reactor, description).listen(self.counted)

    def reconfigure(self, config: DohListenerConfig) -> None:
        self.handler.config = config
