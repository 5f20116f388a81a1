"""Every Prometheus family the relay exports, in one place; recorded from result objects, per batch.

Labels come from small fixed sets only (vendor, event kind, outcome, status
class, error class, topic, partition, decode reason, note): never a visitor,
order or URL.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

C = TypeVar("C")

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10, 30, 60, 120, 300)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


def status_class(status: int | None) -> str:
    """'2xx'..'5xx', or 'error' for a request that got no HTTP answer (connect error, timeout)."""
    return f"{status // 100}xx" if status else "error"


def _created_series() -> bool:
    """Whether prometheus_client exports ``_created`` samples (``PROMETHEUS_DISABLE_CREATED_SERIES`` or
    ``disable_created_metrics()`` turn them off)."""
    return bool(getattr(prometheus_metrics, "_use_created", True))


class _Family(Generic[C]):
    """A labelled family of the relay's own (children made on first use, as prometheus_client's); a
    collector on ``registry``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        registry.register(self)  # type: ignore[arg-type]

    def labels(self, *values: str) -> C:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._child()
        return child

    def _child(self) -> C:
        raise NotImplementedError


class BulkHistogram(_Family["BulkHistogramChild"]):
    """A labelled histogram whose children take a whole request's observations at once.

    prometheus_client's Histogram takes a lock and walks its buckets in Python for every
    observation; once per delivered event that was a visible share of the relay's time (bench/README.md).
    Exposed exactly like a Histogram (``_bucket``, ``_sum``, ``_count``, and ``_created`` when ``created``).
    Event loop only."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry, created: bool = False) -> None:
        self.bounds = [float(b) for b in buckets] + [float("inf")]
        self.created = created
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> BulkHistogramChild:
        return BulkHistogramChild(self.bounds)

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._children.items():
            cumulative, buckets = 0, []
            for bound, n in zip(self.bounds, child.counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(key), buckets, child.sum)
            if self.created and _created_series():
                family.add_sample(self.name + "_created", dict(zip(self.labelnames, key, strict=True)),
                                  child.created)
        yield family


class BulkHistogramChild:
    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= le
        self.sum += value

    def observe_since(self, now_s: float, timestamps_ms: Iterable[int | None]) -> None:
        """``observe(max(0, now_s - ts / 1000))`` for every timestamp (missing ones skipped), with no
        Python work per value: the timestamps are sorted once and each bucket bound is one bisection
        (an age <= bound is a timestamp >= now - bound), up to the first bound every age is within."""
        ts = sorted(filter(None, timestamps_ms))  # type: ignore[arg-type]
        n = len(ts)
        if not n:
            return
        now_ms = now_s * 1000
        if n == 1:  # one event a request (Convead's, most of Tracardi's): its bucket by one bisection
            one: float = ts[0]  # compared with the float bounds below
            if one <= now_ms:
                self.sum += (now_ms - one) / 1000
            # the first bound with now - bound <= ts; compared negated (exact), as key, to bisect the bounds
            self.counts[bisect_left(self.bounds, -one, hi=len(self.bounds) - 1, key=lambda b: b * 1000 - now_ms)] += 1
            return
        past = bisect_right(ts, now_ms)  # later timestamps (clock skew) count as age 0
        self.sum += (past * now_ms - sum(ts[:past] if past < n else ts)) / 1000
        counts, below = self.counts, 0
        last = len(counts) - 1
        for i, bound in enumerate(self.bounds):
            at_most = n if i == last else n - bisect_left(ts, now_ms - bound * 1000)
            counts[i] += at_most - below
            if at_most == n:  # every age counted: the later buckets get nothing more
                return
            below = at_most


class PlainCounter(_Family["PlainCounterChild"]):
    """A labelled counter without prometheus_client's lock per increment (the relay counts once per HTTP
    request). Exposed exactly like a Counter (``_total``, ``_created``). Event loop only."""

    def _child(self) -> PlainCounterChild:
        return PlainCounterChild()

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _created_series()
        for key, child in self._children.items():
            family.add_metric(list(key), child.value, created=child.created if created else None)
        yield family


class PlainCounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


def relay_version() -> str:
    """The installed event-relay's version ("unknown" when run from a tree that was not installed)."""
    try:
        return version("event-relay")
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        # the process's memory, CPU, file descriptors and start time (process_*, Linux /proc) and the
        # Python build (python_info): prometheus_client registers these on its global registry only
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Info("processor_build", "The relay's version", registry=r)
        self.build_info.info({"version": relay_version()})
        self.events_consumed = Counter(
            "processor_events_consumed", "Messages consumed from Kafka", ["topic"], registry=r)
        self.decode_failures = Counter(
            "processor_decode_failures", "Messages that could not be decoded", ["topic", "reason"], registry=r)
        self.vendor_events = Counter(
            "processor_vendor_events", "Events settled per vendor",
            ["vendor", "event_kind", "outcome"], registry=r)
        self.vendor_requests = PlainCounter(
            "processor_vendor_requests", "HTTP requests to vendors", ["vendor", "status_class"], r)
        self.transport_errors = Counter(
            "processor_vendor_transport_errors", "Vendor requests without an HTTP answer, by what happened "
            "(processor.errors.TRANSPORT_ERRORS' metric names)", ["vendor", "error"], registry=r)
        self.unrecognised_answers = Counter(
            "processor_vendor_unrecognised_answers", "Vendor answers that are not the vendor's documented success "
            "(nor a documented error): a page, an empty or oversized body, JSON of another shape; retried",
            ["vendor"], registry=r)
        self.request_duration = BulkHistogram(
            "processor_vendor_request_duration_seconds", "Vendor HTTP request duration", ["vendor"],
            REQUEST_BUCKETS, r, created=True)
        self.delivery_latency = BulkHistogram(
            "processor_delivery_latency_seconds", "Kafka timestamp to vendor acknowledgement", ["vendor"],
            LATENCY_BUCKETS, r)
        self.batch_events = Histogram(
            "processor_batch_events", "Events per closed batch", ["vendor"], buckets=BATCH_BUCKETS, registry=r)
        self.retries = Counter(
            "processor_vendor_retries", "Events scheduled for another attempt", ["vendor"], registry=r)
        self.notes = Counter(
            "processor_vendor_notes", "Vendor-specific observations (warnings, changed ids, bad source)",
            ["vendor", "note"], registry=r)
        self.vendor_memory = Counter(
            "processor_vendor_memory", "Rows left out as already delivered (hit), keys forgotten at the bound "
            "(eviction), of a vendor's memory of what it was sent", ["vendor", "result"], registry=r)
        self.vendor_memory_keys = Gauge(
            "processor_vendor_memory_keys", "Keys in a vendor's memory of what it was sent", ["vendor"],
            registry=r)
        self.dlq_events = Counter(
            "processor_dlq_events", "Dead-letter records acknowledged by Kafka", ["vendor", "error_class"],
            registry=r)
        self.dlq_failures = Counter(
            "processor_dlq_produce_failures", "Dead-letter writes not acknowledged (retried)", registry=r)
        self.inflight = Gauge(
            "processor_inflight_events", "Events batched or being delivered", ["vendor"], registry=r)
        self.inflight_messages = Gauge(
            "processor_inflight_messages", "Consumed messages not yet settled by every vendor", registry=r)
        self.paused = Gauge(
            "processor_source_paused", "1 while fetching is paused for back-pressure", registry=r)
        self.consumer_lag = Gauge(
            "processor_consumer_lag", "High watermark minus committed position", ["topic", "partition"],
            registry=r)
        self.committed_offset = Gauge(
            "processor_committed_offset", "Last committed offset", ["topic", "partition"], registry=r)
        self.commit_failures = Counter(
            "processor_commit_failures", "Offset commits that failed", registry=r)
        self.rebalances = Counter(
            "processor_rebalances", "Partition assignment changes", ["kind"], registry=r)
        self.oldest_unsettled = Gauge(
            "processor_oldest_unsettled_seconds", "Age of the oldest consumed message not yet settled",
            ["topic", "partition"], registry=r)
        self.schema_registry_up = Gauge(
            "processor_schema_registry_up", "1 while the schema registry answers (or none is configured)",
            registry=r)
        # vendor isolation: breaker, adaptive concurrency, parking and redrive
        self.breaker_state = Gauge(
            "processor_vendor_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", ["vendor"],
            registry=r)
        self.breaker_transitions = Counter(
            "processor_vendor_breaker_transitions", "Circuit breaker state changes", ["vendor", "state"],
            registry=r)
        self.concurrency_limit = Gauge(
            "processor_vendor_concurrency_limit", "Current adaptive limit of concurrent requests", ["vendor"],
            registry=r)
        self.parked = Counter(
            "processor_parked", "Events parked on the vendor's retry topic, by why", ["vendor", "reason"],
            registry=r)
        self.parked_backlog = Gauge(
            "processor_parked_events", "Parked events on the vendor's retry topic not yet redriven",
            ["vendor"], registry=r)
        self.redriven = Counter(
            "processor_redriven_events", "Parked events taken from the retry topic and settled",
            ["vendor", "outcome"], registry=r)
        self.setup_errors = Counter(
            "processor_vendor_setup_errors", "Answers saying the relay's setup is wrong (3xx, 401, 403, 404, "
            "407): its events held or parked, never dead-lettered", ["vendor", "status_class"], registry=r)
        self.setup_held_sites = Gauge(
            "processor_vendor_setup_held_sites", "Sites whose requests are held after a setup error", ["vendor"],
            registry=r)
        self.park_failures = Counter(
            "processor_park_produce_failures", "Retry-topic writes not acknowledged (retried)", registry=r)
