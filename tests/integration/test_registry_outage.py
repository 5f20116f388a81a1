"""Registry unavailable for a while: consumption pauses (readiness false, the registry gauge 0), nothing
is dead-lettered for it, and everything is delivered once it is back. Only the registry's own answer
that an id does not exist dead-letters its messages."""

from __future__ import annotations

import collections

from processor.codec import confluent_frame
from processor.deadletter import headers_dict
from processor.devstack.kafka_io import committed, end_offsets, produce, read_all
from processor.devstack.registry import RegistryStub, embedded_schemas
from processor.devstack.samples import encode, make_view
from processor.events import EventKind
from tests.integration.conftest import http_text, quicklizard_vendor, relay_config, wait_for

VIEW_IDS = (11, 12)  # the same ProductView schema under ids the relay has not seen before the outage


def views(first: int, n: int, schema_id: int = 1) -> list[tuple[bytes, bytes]]:
    out = []
    for p in range(first, first + n):
        rec = make_view(p, p, event_time=1_700_000_000_000 + p)
        rec["event_id"] = f"outage-{p}"
        out.append((f"v{p % 7}".encode(), confluent_frame(schema_id, encode(EventKind.PRODUCT_VIEW, rec)[5:])))
    return out


def gauge(relay, name: str) -> float | None:
    """The value of an unlabelled gauge, None while /metrics does not answer or does not have it."""
    status, text = http_text(f"{relay.metrics_url}/metrics")
    if status != 200:
        return None
    for line in text.splitlines():
        metric, _, value = line.partition(" ")
        if metric == name:
            return float(value)
    return None


def product_ids(sandbox) -> collections.Counter[str]:
    return collections.Counter(i["product_id"] for i in sandbox.received("quicklizard"))


def test_registry_outage_pauses_then_resumes_without_dead_letters(broker, topics, sandbox, relays):
    schemas = embedded_schemas()
    stub = RegistryStub({**schemas, **{sid: schemas[1] for sid in VIEW_IDS}}).start()
    try:
        cfg = relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)})
        cfg["schema_registry"] = {"url": stub.url, "client": {"max.retries": 0, "timeout": 2}}
        relay = relays(cfg)
        relay.wait_ready()

        before = views(1, 50)  # id 1: fetched while the registry is up
        produce(broker.bootstrap, topics.events, before)
        wait_for(lambda: len(product_ids(sandbox)) == 50, 60, "the first views delivered")
        assert gauge(relay, "processor_schema_registry_up") == 1

        stub.stop()
        during = views(101, 60, VIEW_IDS[0]) + views(201, 60, VIEW_IDS[1])  # ids never fetched
        produce(broker.bootstrap, topics.events, during)
        wait_for(lambda: relay.alive_or_fail() and gauge(relay, "processor_schema_registry_up") == 0, 60,
                 "the registry gauge to go 0")
        wait_for(lambda: http_text(f"{relay.metrics_url}/readyz")[0] == 503, 30, "readiness false")
        assert relay.alive_or_fail()
        assert len(product_ids(sandbox)) == 50  # the new ids' views wait: none sent, none dead-lettered
        assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []
        assert relay.metric("processor_decode_failures_total") == 0

        stub.start()  # back on the same port
        want = {f"P-{p:05d}" for p in [*range(1, 51), *range(101, 161), *range(201, 261)]}
        wait_for(lambda: set(product_ids(sandbox)) == want, 90, "every view delivered after the outage")
        wait_for(lambda: gauge(relay, "processor_schema_registry_up") == 1, 30, "the registry gauge back to 1")
        wait_for(lambda: http_text(f"{relay.metrics_url}/readyz")[0] == 200, 30, "ready again")

        # an id the registry answers does not exist: dead-lettered, precisely, and the partition goes on
        unknown = views(301, 1, 99)
        after = views(401, 10)
        produce(broker.bootstrap, topics.events, unknown + after)
        wait_for(lambda: {f"P-{p:05d}" for p in range(401, 411)} <= set(product_ids(sandbox)), 60,
                 "views after the unknown id delivered")
        (dead,) = read_all(broker.bootstrap, topics.dlq, expect=1, timeout_s=30)
        h = headers_dict(dead.headers())
        assert (h["relay.error_class"], dead.value()) == ("undecodable", unknown[0][1])
        assert h["relay.reason"].startswith("unknown_schema: schema id 99 not found in the registry")
        produced = len(before) + len(during) + len(unknown) + len(after)
        wait_for(lambda: sum(committed(broker.bootstrap, topics.group, topics.events).values()) == produced, 30,
                 "commits to the end")
        assert committed(broker.bootstrap, topics.group, topics.events) == end_offsets(broker.bootstrap,
                                                                                      topics.events)
        got = product_ids(sandbox)
        assert sum(got.values()) == produced - 1 and max(got.values()) == 1  # lost 0, duplicates 0
        assert relay.stop() == 0
    finally:
        stub.stop()
