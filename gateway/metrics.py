"""Prometheus metrics of one gateway, read from its counters at scrape time.

The listeners, the router and the delivery workers keep plain ints and
``gateway.stats.Histogram``s; nothing on the hot paths calls prometheus_client.
``GatewayMetrics.render()`` reads them (and asks the spool for its depth) when
/metrics is fetched, into a registry of its own, not the process-wide one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.spool import Stats
from gateway.stats import Histogram

if TYPE_CHECKING:
    from gateway.service import GatewayService


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    family.add_metric(labels, h.cumulative(), h.sum)


class GatewayCollector(Collector):
    """Every gateway metric, from the GatewayService's objects as they are now."""

    def __init__(self, gateway: GatewayService) -> None:
        self.gateway = gateway
        self.spool_stats: Stats | None = None  # set by render() just before collecting

    def collect(self) -> Iterable[Metric]:
        yield from self._service()
        yield from self._listeners()
        yield from self._http()
        yield from self._deliveries()
        yield from self._spool()

    def _service(self) -> Iterator[Metric]:
        gw = self.gateway
        info = GaugeMetricFamily("gateway_build_info", "The gateway's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        ready = not gw.readiness_problems()
        yield GaugeMetricFamily("gateway_ready", "1 when /readyz answers 200", value=int(ready))
        reloads = CounterMetricFamily(
            "gateway_reloads", "Configuration reloads (SIGHUP) by outcome", labels=["outcome"]
        )
        reloads.add_metric(["ok"], gw.reloads - gw.failed_reloads)
        reloads.add_metric(["failed"], gw.failed_reloads)
        yield reloads
        routes = CounterMetricFamily(
            "gateway_route_messages",
            "Messages a route took: queued (in the spool for its destinations) or failed"
            " (a transform failed)",
            labels=["route", "outcome"],
        )
        for (route, outcome), n in sorted(gw.routed.items()):
            routes.add_metric([route, outcome], n)
        yield routes

    def _listeners(self) -> Iterator[Metric]:
        from gateway.protocols.dns.listener import DnsListener, RouteCounts
        from gateway.protocols.http.listener import HttpSockets
        from gateway.protocols.nntp.listener import ListenerFactory as NntpFactory
        from gateway.protocols.smtp.listener import ListenerFactory

        messages = CounterMetricFamily(
            "gateway_listener_messages",
            "Messages a store-and-forward listener was sent, by its answer: accepted,"
            " rejected (5xx) or tempfail (4xx)",
            labels=["listener", "outcome"],
        )
        recipients = CounterMetricFamily(
            "gateway_listener_recipients_refused",
            "Recipients refused because no route takes them",
            labels=["listener"],
        )
        duration = HistogramMetricFamily(
            "gateway_listener_message_duration_seconds",
            "From the end of a message to the listener's answer (routing and the spool write)",
            labels=["listener"],
        )
        requests = CounterMetricFamily(
            "gateway_listener_requests",
            "Requests a listener received: DNS queries (DNS, DoH), HTTP requests (http)",
            labels=["listener"],
        )
        queries = CounterMetricFamily(
            "gateway_dns_queries",
            "DNS queries by route and outcome; route is empty for those no route took",
            labels=["listener", "route", "outcome"],
        )
        hits = CounterMetricFamily(
            "gateway_dns_cache_hits", "Answers from a route's cache", labels=["listener", "route"]
        )
        misses = CounterMetricFamily(
            "gateway_dns_cache_misses",
            "Queries a route's cache could not answer",
            labels=["listener", "route"],
        )
        stale = CounterMetricFamily(
            "gateway_dns_cache_stale_answers",
            "Expired answers served because every upstream failed (RFC 8767)",
            labels=["listener", "route"],
        )
        entries = GaugeMetricFamily(
            "gateway_dns_cache_entries", "Answers in a route's cache", labels=["listener", "route"]
        )
        upstream: dict[tuple[str, str], int] = {}
        upstream_duration: dict[str, Histogram] = {}
        connections = GaugeMetricFamily(
            "gateway_listener_open_connections",
            "Open TCP connections of a listener (SMTP, NNTP and HTTP clients, DNS over TCP, DoH)",
            labels=["listener"],
        )
        for name, service in sorted(self.gateway.listeners.items()):
            factory = service.factory
            if isinstance(factory, ListenerFactory):
                smtp = factory.listener
                for outcome in ("accepted", "rejected", "tempfail"):
                    messages.add_metric([name, outcome], getattr(smtp, outcome))
                recipients.add_metric([name], smtp.recipients_refused)
                _histogram(duration, [name], smtp.duration)
                connections.add_metric([name], len(factory.connections))
                continue
            if isinstance(factory, NntpFactory):
                nntp = factory.listener
                for outcome in ("accepted", "rejected", "tempfail"):
                    messages.add_metric([name, outcome], getattr(nntp, outcome))
                _histogram(duration, [name], nntp.duration)
                connections.add_metric([name], len(factory.connections))
                continue
            if isinstance(factory, HttpSockets):
                requests.add_metric([name], factory.listener.requests)
                connections.add_metric([name], len(factory.factory.connections))
                continue
            handler = getattr(factory, "handler", None)
            if not isinstance(handler, DnsListener):
                continue
            tcp = getattr(factory, "tcp", None)
            if tcp is not None:
                connections.add_metric([name], len(tcp.connections))
            counted = getattr(factory, "counted", None)
            if counted is not None:
                connections.add_metric([name], len(counted.protocols))
            requests.add_metric([name], handler.queries)
            for outcome in ("malformed", "notimp", "unrouted"):
                queries.add_metric([name, "", outcome], getattr(handler, outcome))
            for route, counts in sorted(handler.by_route.items()):
                for outcome in RouteCounts.outcomes:
                    queries.add_metric([name, route, outcome], getattr(counts, outcome))
            for route, cache in sorted(handler.caches().items()):
                hits.add_metric([name, route], cache.hits)
                misses.add_metric([name, route], cache.misses)
                stale.add_metric([name, route], cache.stale_hits)
                entries.add_metric([name, route], len(cache))
            for key, n in handler.upstream.items():
                upstream[key] = upstream.get(key, 0) + n
            for dest, h in handler.upstream_duration.items():
                merged = upstream_duration.setdefault(dest, Histogram(h.buckets))
                merged.counts = [a + b for a, b in zip(merged.counts, h.counts, strict=True)]
                merged.sum += h.sum
                merged.count += h.count
        yield from (messages, recipients, duration, requests, queries)
        yield from (hits, misses, stale, entries, connections)
        answered = CounterMetricFamily(
            "gateway_dns_upstream_queries",
            "Queries sent to a DNS or DoH destination: answered or failed",
            labels=["destination", "outcome"],
        )
        for (dest, outcome), n in sorted(upstream.items()):
            answered.add_metric([dest, outcome], n)
        yield answered
        latency = HistogramMetricFamily(
            "gateway_dns_upstream_duration_seconds",
            "Time a DNS or DoH destination took to answer or fail",
            labels=["destination"],
        )
        for dest, h in sorted(upstream_duration.items()):
            _histogram(latency, [dest], h)
        yield latency

    def _http(self) -> Iterator[Metric]:
        from gateway.protocols.http.listener import HttpSockets
        from gateway.protocols.http.proxy import HttpProxyDestination

        outcomes = CounterMetricFamily(
            "gateway_http_requests",
            "HTTP requests by route and outcome: proxied (to an http destination), queued"
            " (a web hook in the spool), rejected (a 4xx from the gateway) or error (a 5xx"
            " from the gateway, or no answer); route is empty for those no route took",
            labels=["listener", "route", "outcome"],
        )
        statuses = CounterMetricFamily(
            "gateway_http_responses",
            "HTTP responses by route and status class (2xx ... 5xx; none: the connection"
            " ended before a response began)",
            labels=["listener", "route", "code"],
        )
        malformed = CounterMetricFamily(
            "gateway_http_malformed_requests",
            "Requests refused before their head was complete (400, 408, 414, 431, 501)",
            labels=["listener"],
        )
        duration = HistogramMetricFamily(
            "gateway_http_request_duration_seconds",
            "From a request's head to the end of its response (or of the connection)",
            labels=["listener"],
        )
        for name, service in sorted(self.gateway.listeners.items()):
            sockets = service.factory
            if not isinstance(sockets, HttpSockets):
                continue
            listener = sockets.listener
            for (route, outcome), n in sorted(listener.outcomes.items()):
                outcomes.add_metric([name, route, outcome], n)
            for (route, code), n in sorted(listener.statuses.items()):
                statuses.add_metric([name, route, code], n)
            malformed.add_metric([name], sockets.factory.bad_heads)
            _histogram(duration, [name], listener.duration)
        yield from (outcomes, statuses, malformed, duration)
        upstream = CounterMetricFamily(
            "gateway_http_upstream_requests",
            "Requests an http destination sent to an upstream server, by outcome: ok (it"
            " answered, whatever the status), connect_failed (502 unless another upstream"
            " took it), timeout (504) or failed (the connection broke or the response was"
            " malformed: 502)",
            labels=["destination", "upstream", "outcome"],
        )
        down = GaugeMetricFamily(
            "gateway_http_upstream_down",
            "1 while an upstream server is marked down (skipped after a failure)",
            labels=["destination", "upstream"],
        )
        active = GaugeMetricFamily(
            "gateway_http_upstream_active_requests",
            "Requests in progress on an upstream server",
            labels=["destination", "upstream"],
        )
        runtime = self.gateway.runtime
        destinations = runtime.destinations if runtime is not None else {}
        for dest_name, destination in sorted(destinations.items()):
            if not isinstance(destination, HttpProxyDestination):
                continue
            for u in destination.upstreams:
                url = str(u.url)
                counts = (
                    ("ok", u.answered),
                    ("connect_failed", u.connect_failures),
                    ("timeout", u.timeouts),
                    ("failed", u.failures),
                )
                for outcome, n in counts:
                    upstream.add_metric([dest_name, url, outcome], n)
                down.add_metric([dest_name, url], int(not u.healthy))
                active.add_metric([dest_name, url], u.active)
        yield from (upstream, down, active)

    def _deliveries(self) -> Iterator[Metric]:
        delivery = self.gateway.delivery
        if delivery is None:
            return
        c = delivery.counters
        by_dest = CounterMetricFamily(
            "gateway_deliveries",
            "Delivery attempts from the spool by destination and outcome: delivered,"
            " temporary (retried later), permanent (dead letter) or duplicate",
            labels=["destination", "outcome"],
        )
        for (dest, outcome), n in sorted(c.by_destination.items()):
            by_dest.add_metric([dest, outcome], n)
        yield by_dest
        latency = HistogramMetricFamily(
            "gateway_delivery_duration_seconds",
            "Time a destination took to take (or refuse) a delivery",
            labels=["destination"],
        )
        for dest, h in sorted(c.durations.items()):
            _histogram(latency, [dest], h)
        yield latency
        yield CounterMetricFamily(
            "gateway_delivery_retries",
            "Deliveries that failed for now and wait for their next try",
            value=c.deferred,
        )
        yield CounterMetricFamily(
            "gateway_dead_letters", "Deliveries given up on since start", value=c.dead
        )
        yield CounterMetricFamily("gateway_bounces", "Bounces (DSNs) queued", value=c.bounces)

    def _spool(self) -> Iterator[Metric]:
        gw = self.gateway
        yield CounterMetricFamily(
            "gateway_spool_refusals",
            "Messages the spool could not store (disk full or unwritable): the sender got a 4xx",
            value=gw.spool_refusals,
        )
        stats = self.spool_stats
        if stats is None:
            return
        yield GaugeMetricFamily(
            "gateway_spool_queued", "Deliveries waiting in the spool", value=stats.queued
        )
        yield GaugeMetricFamily(
            "gateway_spool_dead", "Dead letters kept in the spool", value=stats.dead
        )
        age = 0.0 if stats.oldest is None else max(0.0, gw.reactor.seconds() - stats.oldest)
        yield GaugeMetricFamily(
            "gateway_spool_oldest_age_seconds",
            "Age of the oldest delivery waiting in the spool (0 when none waits)",
            value=age,
        )


class GatewayMetrics:
    """The /metrics page of one GatewayService."""

    def __init__(self, gateway: GatewayService) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = GatewayCollector(gateway)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)  # memory, CPU, open files of this process

    async def render(self, accept: str | None) -> tuple[bytes, str]:
        """The page in the format ``accept`` asks for (Prometheus text or OpenMetrics)."""
        spool: Any = self.gateway.spool
        try:
            self.collector.spool_stats = await spool.stats() if spool is not None else None
        except Exception:
            self.collector.spool_stats = None  # closed at shutdown, or broken: no depth
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
