import random

from processor.metrics import LATENCY_BUCKETS, BulkHistogramChild


def test_observe_since_matches_one_observation_per_timestamp():
    rng = random.Random(3)
    bounds = [float(b) for b in LATENCY_BUCKETS] + [float("inf")]
    for _ in range(50):
        now_s = 1_700_000_000.0005 + rng.randint(0, 10**6)
        now_ms = int(now_s * 1000)
        # ages from the future (clock skew) to beyond the last bucket, some exactly on a bound, some missing
        stamps = [rng.choice([None, 0, now_ms + rng.randint(1, 5000), now_ms - rng.randint(0, 400_000),
                              now_ms - int(rng.choice(LATENCY_BUCKETS) * 1000)]) for _ in range(rng.randint(0, 300))]
        one, bulk = BulkHistogramChild(bounds), BulkHistogramChild(bounds)
        for ts in stamps:
            if ts:
                one.observe(max(0.0, now_s - ts / 1000))
        bulk.observe_since(now_s, iter(stamps))
        assert bulk.counts == one.counts
        assert abs(bulk.sum - one.sum) < 1e-6 * max(1.0, one.sum)


def test_observe_since_of_one_timestamp_counts_as_the_bulk_path_does():
    """One timestamp takes a shortcut (one bisection): the same bucket and sum as the bulk path gives it,
    here fed the same timestamp twice."""
    rng = random.Random(4)
    bounds = [float(b) for b in LATENCY_BUCKETS] + [float("inf")]
    for _ in range(3000):
        now_s = 1_700_000_000.0005 + rng.randint(0, 10**6) + rng.random()
        now_ms = int(now_s * 1000)
        ts = rng.choice([now_ms + rng.randint(1, 5000), now_ms - rng.randint(0, 400_000), now_ms,
                         now_ms - int(rng.choice(LATENCY_BUCKETS) * 1000), int(now_s * 1000 - 25)])
        one, bulk = BulkHistogramChild(bounds), BulkHistogramChild(bounds)
        one.observe_since(now_s, [ts, None])
        one.observe_since(now_s, iter([ts]))
        bulk.observe_since(now_s, [ts, ts])
        assert one.counts == bulk.counts and sum(one.counts) == 2
        assert abs(one.sum - bulk.sum) <= 1e-9 * max(1.0, bulk.sum)


def test_registry_carries_the_process_and_platform_collectors_and_the_build_info():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from processor.metrics import Metrics, relay_version

    families = {f.name: f for f in text_string_to_metric_families(generate_latest(Metrics().registry).decode())}
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_start_time_seconds",
                 "python_info"):
        assert name in families, name
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    (build,) = families["processor_build_info"].samples
    assert build.name == "processor_build_info" and build.labels == {"version": relay_version()}
    assert relay_version() != "unknown"  # installed by make install


async def test_metrics_endpoint_restricts_the_exposition_to_the_names_asked_for():
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    from processor.health import HealthServer
    from processor.metrics import Metrics

    m = Metrics()
    m.vendor_events.labels("qubit", "product_view", "delivered").inc(3)
    m.vendor_requests.labels("qubit", "2xx").inc()
    server = HealthServer(m.registry, "127.0.0.1", 0, lambda: None)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.port}/metrics"
            async with http.get(base, params=[("name[]", "processor_vendor_events_total")]) as r:
                assert r.status == 200
                only = list(text_string_to_metric_families(await r.text()))
            async with http.get(base) as r:
                everything = {f.name for f in text_string_to_metric_families(await r.text())}
    finally:
        await server.stop()
    assert [f.name for f in only] == ["processor_vendor_events"]
    assert [(s.labels, s.value) for s in only[0].samples if s.name.endswith("_total")] == [
        ({"vendor": "qubit", "event_kind": "product_view", "outcome": "delivered"}, 3.0)]
    assert {"processor_vendor_events", "processor_vendor_requests", "process_resident_memory_bytes"} <= everything


def _exposition(registry) -> str:
    """The text exposition with every ``_created`` value replaced by its series' name (made at different
    instants by the two implementations)."""
    from prometheus_client import generate_latest

    lines = []
    for line in generate_latest(registry).decode().splitlines():
        name = line.split("{")[0]
        if name.endswith("_created") and not line.startswith("#"):
            line = line.rsplit(" ", 1)[0] + " <created>"
        lines.append(line)
    return "\n".join(lines)


def test_plain_counter_and_bulk_histogram_expose_what_prometheus_client_does():
    """The request counter and duration histogram, observed per request without prometheus_client's locks,
    give the same exposition as its Counter and Histogram for the same observations."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from processor.metrics import REQUEST_BUCKETS, BulkHistogram, PlainCounter

    rng = random.Random(5)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = PlainCounter("processor_vendor_requests", "HTTP requests to vendors", ["vendor", "status_class"], ours)
    ref_counter = Counter("processor_vendor_requests", "HTTP requests to vendors", ["vendor", "status_class"],
                          registry=theirs)
    hist = BulkHistogram("processor_vendor_request_duration_seconds", "Vendor HTTP request duration", ["vendor"],
                         REQUEST_BUCKETS, ours, created=True)
    ref_hist = Histogram("processor_vendor_request_duration_seconds", "Vendor HTTP request duration", ["vendor"],
                         buckets=REQUEST_BUCKETS, registry=theirs)
    for _ in range(2000):
        vendor = rng.choice(["convead", "tracardi", "convert"])
        cls = rng.choice(["2xx", "4xx", "5xx", "error"])
        counter.labels(vendor, cls).inc()
        ref_counter.labels(vendor, cls).inc()
        # durations on and around the bucket bounds, tiny and beyond the last bound
        value = rng.choice([rng.random() * 12, rng.choice(REQUEST_BUCKETS), 0.0, 1e-9, 30.0])
        hist.labels(vendor).observe(value)
        ref_hist.labels(vendor).observe(value)
    counter.labels("qubit", "2xx")  # made, never increased: exposed at 0 as prometheus_client does
    ref_counter.labels("qubit", "2xx")
    assert _exposition(ours) == _exposition(theirs)
    assert "processor_vendor_requests_created" in _exposition(ours)
    assert "processor_vendor_request_duration_seconds_created" in _exposition(ours)


def test_plain_counter_refuses_a_decrease_as_prometheus_client_does():
    import pytest
    from prometheus_client import CollectorRegistry

    from processor.metrics import PlainCounter

    child = PlainCounter("c", "d", ["v"], CollectorRegistry()).labels("x")
    with pytest.raises(ValueError):
        child.inc(-1)
