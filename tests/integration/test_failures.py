"""Vendor faults and back-pressure: retried, dead-lettered, paused and resumed. (Crashes and rebalances:
test_faults.py.)"""

from __future__ import annotations

import collections

from processor.deadletter import headers_dict
from processor.devstack.kafka_io import committed, end_offsets, produce, read_all
from tests.integration.conftest import quicklizard_vendor, relay_config, wait_for
from tests.integration.test_spine import sample_messages


def view_ids(items):
    return [i["product_id"] for i in items if i["event"] == "view"]


def expected_view_ids(messages):
    return {f"P-{i:05d}" for i in range(len(messages)) if i % 10 != 9}


def test_retryable_failures_are_retried_and_exhausted_ones_dead_lettered(broker, topics, sandbox, relays):
    """With ``on_outage: block`` a vendor retries in place until its attempts run out (park mode has its
    own tests: test_isolation.py). On the embedded id map: with test_bad_input's poison messages, the
    small suite of the relay without a schema registry."""
    msgs = sample_messages(100)
    produce(broker.bootstrap, topics.events, msgs)
    sandbox.faults("quicklizard", burst=3, error_status=503)  # three failures, then healthy
    vendor = quicklizard_vendor(sandbox, on_outage="block", breaker={"consecutive_failures": 1000})
    cfg = relay_config(broker, topics, sandbox, {"quicklizard": vendor}, registry=False)
    relay = relays(cfg)
    want = expected_view_ids(msgs)
    wait_for(lambda: want <= set(view_ids(sandbox.received("quicklizard"))), 60, "delivered after retries")
    wait_for(lambda: relay.metric("processor_vendor_retries_total", vendor="quicklizard") > 0, 10, "retries counted")
    assert relay.metric("processor_vendor_requests_total", vendor="quicklizard", status_class="5xx") >= 3
    assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []

    # now the vendor is down for good: every event is dead-lettered as exhausted, and committed
    sandbox.faults("quicklizard", error_rate=1.0, error_status=500)
    more = sample_messages(20, start=1000)
    produce(broker.bootstrap, topics.events, more)
    dlq = read_all(broker.bootstrap, topics.dlq, expect=20, timeout_s=60)
    assert len(dlq) == 20
    heads = [headers_dict(m.headers()) for m in dlq]
    assert {h["relay.error_class"] for h in heads} == {"exhausted"}
    assert {h["relay.http_status"] for h in heads} == {"500"}
    assert {h["relay.attempts"] for h in heads} == {"4"}
    assert all(int(h["relay.last_failure_ms"]) >= int(h["relay.first_failure_ms"]) for h in heads)
    assert collections.Counter(m.value() for m in dlq) == collections.Counter(v for _, v in more)
    wait_for(lambda: committed(broker.bootstrap, topics.group, topics.events)
             == end_offsets(broker.bootstrap, topics.events), 30, "commits to the end")
    assert relay.stop() == 0


def test_back_pressure_pauses_fetching_and_resumes(broker, topics, sandbox, relays):
    msgs = sample_messages(1500)
    produce(broker.bootstrap, topics.events, msgs)
    sandbox.faults("quicklizard", latency_ms=50)
    # a vendor that keeps order (on_outage: block) holds the source at its budget; one that parks never does
    vendor = quicklizard_vendor(sandbox, batch={"max_events": 10, "max_wait_ms": 50}, concurrency=1,
                                on_outage="block")
    cfg = relay_config(broker, topics, sandbox, {"quicklizard": vendor}, max_inflight_events=100)
    cfg["kafka"]["consume_batch"] = 50
    relay = relays(cfg)
    relay.wait_ready()
    wait_for(lambda: relay.metric("processor_source_paused") == 1, 30, "fetching paused")
    peak = 0.0

    def done() -> bool:
        nonlocal peak
        peak = max(peak, relay.metric("processor_inflight_messages"))
        return committed(broker.bootstrap, topics.group, topics.events) == end_offsets(broker.bootstrap, topics.events)

    sandbox.faults("quicklizard")
    wait_for(done, 120, "everything delivered and committed", step=0.2)
    assert peak <= 100 + 50  # the limit plus at most one consume batch
    assert set(view_ids(sandbox.received("quicklizard"))) >= expected_view_ids(msgs)
    assert relay.stop() == 0
