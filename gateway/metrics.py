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
from gateway.ports import Metric as Published
from gateway.spool import Stats
from gateway.stats import Histogram

if TYPE_CHECKING:
    from gateway.service import GatewayService


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    family.add_metric(labels, h.cumulative(), h.sum)


def _merge(families: dict[str, Published], family: Published) -> None:
    """Add ``family`` to the family of its name; samples with equal labels add up."""
    known = families.get(family.name)
    if known is None:
        families[family.name] = Published(
            family.name, family.help, family.type, family.labels, list(family.samples)
        )
        return
    if (known.type, known.labels) != (family.type, family.labels):
        raise ValueError(
            f"metric {family.name} is published as {known.type} {known.labels} and as"
            f" {family.type} {family.labels}"
        )
    index = {labels: i for i, (labels, _) in enumerate(known.samples)}
    for labels, value in family.samples:
        at = index.get(labels)
        if at is None:
            index[labels] = len(known.samples)
            known.samples.append((labels, value))
            continue
        old = known.samples[at][1]
        known.samples[at] = (labels, _add(old, value))


def _add(a: float | Histogram, b: float | Histogram) -> float | Histogram:
    if isinstance(a, Histogram) and isinstance(b, Histogram):
        merged = Histogram(a.buckets)
        merged.counts = [x + y for x, y in zip(a.counts, b.counts, strict=True)]
        merged.sum = a.sum + b.sum
        merged.count = a.count + b.count
        return merged
    if isinstance(a, Histogram) or isinstance(b, Histogram):
        raise ValueError("a histogram sample cannot be added to a number")
    return a + b


def _export(family: Published) -> Metric:
    """A published family as prometheus_client's."""
    labels = list(family.labels)
    if family.type == "histogram":
        histogram = HistogramMetricFamily(family.name, family.help, labels=labels)
        for values, value in family.samples:
            if isinstance(value, Histogram):
                _histogram(histogram, list(values), value)
        return histogram
    out: CounterMetricFamily | GaugeMetricFamily
    if family.type == "counter":
        out = CounterMetricFamily(family.name, family.help, labels=labels)
    else:
        out = GaugeMetricFamily(family.name, family.help, labels=labels)
    for values, value in family.samples:
        if not isinstance(value, Histogram):
            out.add_metric(list(values), value)
    return out


class GatewayCollector(Collector):
    """Every gateway metric, from the GatewayService's objects as they are now."""

    def __init__(self, gateway: GatewayService) -> None:
        self.gateway = gateway
        self.spool_stats: Stats | None = None  # set by render() just before collecting

    def collect(self) -> Iterable[Metric]:
        yield from self._service()
        yield from self._published()
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
        last = gw.last_reload
        yield GaugeMetricFamily(
            "gateway_config_last_reload_successful",
            "1 when the last reload (or the start, before any) put the file in force, 0 when"
            " it was refused",
            value=int(last is None or last.ok),
        )
        yield GaugeMetricFamily(
            "gateway_config_last_reload_timestamp_seconds",
            "When the last reload was tried (the start time before any), Unix time",
            value=last.at if last is not None else gw.loaded_at,
        )
        routes = CounterMetricFamily(
            "gateway_route_messages",
            "Messages a route took: queued (in the spool for its destinations) or failed"
            " (a transform failed)",
            labels=["route", "outcome"],
        )
        for (route, outcome), n in sorted(gw.routed.items()):
            routes.add_metric([route, outcome], n)
        yield routes

    def _published(self) -> Iterator[Metric]:
        """What the listeners and destinations publish, families of one name merged."""
        families: dict[str, Published] = {}
        runtime = self.gateway.runtime
        destinations = runtime.destinations if runtime is not None else {}
        for _, service in sorted(self.gateway.listeners.items()):
            for family in service.listener.metrics():
                _merge(families, family)
        for _, destination in sorted(destinations.items()):
            for family in destination.metrics():
                _merge(families, family)
        for family in families.values():
            yield _export(family)

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
