"""A schema registry that is slow, silent or failing for one id, in the production shape (registry
configured, parking on): the relay waits for it with a bound, says so in readiness naming the registry and
the id, exits on SIGTERM within the grace plus a margin whatever the registry does, and loses nothing."""

from __future__ import annotations

import time

from processor.consumer import CLOSE_MARGIN_S
from processor.devstack.kafka_io import committed, end_offsets, produce, read_all
from processor.devstack.registry import RegistryStub, embedded_schemas
from tests.integration.conftest import http_text, quicklizard_vendor, relay_config, wait_for
from tests.integration.test_registry_outage import gauge, product_ids, views

NEW_IDS = (11, 12)  # ProductView under ids the relay has not fetched before
GRACE_S = 3.0


def stub_with_new_ids() -> RegistryStub:
    schemas = embedded_schemas()
    return RegistryStub({**schemas, **{sid: schemas[1] for sid in NEW_IDS}}).start()


def readiness(relay) -> tuple[int, str]:
    return http_text(f"{relay.metrics_url}/readyz")


def want(*ranges: range) -> set[str]:
    return {f"P-{p:05d}" for r in ranges for p in r}


def all_committed(broker, topics) -> bool:
    return committed(broker.bootstrap, topics.group, topics.events) == end_offsets(broker.bootstrap, topics.events)


def test_a_registry_that_accepts_and_never_answers(broker, topics, sandbox, relays):
    """Not ready within a few seconds, naming the registry and the id; SIGTERM exits within the grace plus
    the margin; once it answers, everything is delivered by the next relay, nothing lost."""
    stub = stub_with_new_ids()
    try:
        cfg = relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)},
                           shutdown_grace_s=GRACE_S)
        cfg["schema_registry"] = {"url": stub.url}
        relay = relays(cfg)
        relay.wait_ready()
        before = views(1, 30)  # id 1: fetched while the registry answers
        produce(broker.bootstrap, topics.events, before)
        wait_for(lambda: len(product_ids(sandbox)) == 30, 60, "the first views delivered")

        stub.hold()  # from now on it accepts connections and answers nothing
        silent = views(101, 40, NEW_IDS[0])
        produce(broker.bootstrap, topics.events, silent)
        held_since = time.monotonic()
        wait_for(lambda: relay.alive_or_fail() and readiness(relay)[0] == 503, 15, "not ready")
        assert time.monotonic() - held_since < 10  # within a few seconds of the first unanswered fetch
        _status, why = readiness(relay)
        assert f"schema registry http://127.0.0.1:{stub.port}" in why and "schema id 11" in why, why
        wait_for(lambda: gauge(relay, "processor_schema_registry_up") == 0, 5, "the registry gauge to go 0")
        assert relay.metric("processor_decode_failures_total") == 0

        sent = time.monotonic()
        rc = relay.stop(timeout_s=GRACE_S + CLOSE_MARGIN_S + 5)
        took = time.monotonic() - sent
        print(f"\nSIGTERM with the registry silent: exit {rc} after {took:.1f}s (grace {GRACE_S:g}s, "
              f"margin {CLOSE_MARGIN_S:g}s)")
        assert rc == 0 and took < GRACE_S + CLOSE_MARGIN_S, relay.log()[-3000:]
        assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []

        stub.release()  # it answers again: the next relay delivers what waited
        after = views(201, 10)
        produce(broker.bootstrap, topics.events, after)
        again = relays(cfg, "again")
        wait_for(lambda: again.alive_or_fail() and set(product_ids(sandbox)) == want(range(1, 31), range(101, 141),
                                                                                   range(201, 211)),
                 90, "every view delivered once the registry answers")
        wait_for(lambda: all_committed(broker, topics), 30, "commits to the end")
        assert max(product_ids(sandbox).values()) <= 2  # lost 0 (duplicates only from the stopped relay)
        assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []
        assert again.stop() == 0
    finally:
        stub.stop()


def test_a_registry_answering_each_request_after_3s(broker, topics, sandbox, relays):
    """Slow, not down: everything is delivered, nothing dead-lettered."""
    stub = stub_with_new_ids()
    try:
        cfg = relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)})
        cfg["schema_registry"] = {"url": stub.url}
        stub.delay_s = 3.0
        relay = relays(cfg)
        relay.wait_ready()
        events = views(1, 20) + views(101, 20, NEW_IDS[0]) + views(201, 20, NEW_IDS[1])
        produce(broker.bootstrap, topics.events, events)
        wait_for(lambda: relay.alive_or_fail() and set(product_ids(sandbox)) == want(range(1, 21), range(101, 121),
                                                                                   range(201, 221)),
                 60, "every view delivered through the slow registry")
        wait_for(lambda: all_committed(broker, topics), 30, "commits to the end")
        assert max(product_ids(sandbox).values()) == 1
        assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []
        assert relay.metric("processor_decode_failures_total") == 0
        assert relay.stop() == 0
    finally:
        stub.stop()


def test_a_registry_failing_for_one_id_holds_only_the_partition_that_needs_it(broker, topics, sandbox, relays):
    """One id answers 500: the partition whose next message needs it waits (its order kept, nothing
    committed past it); the events of the other partitions are delivered meanwhile; readiness names the id;
    once the id answers, everything is delivered, nothing lost or dead-lettered."""
    stub = stub_with_new_ids()
    try:
        cfg = relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)})
        cfg["schema_registry"] = {"url": stub.url}
        stub.fail_ids = {NEW_IDS[0]: 500}
        relay = relays(cfg)
        relay.wait_ready()
        # partition 0: 100 healthy views, one under the failing id, 100 healthy; partitions 1 and 2: 700 healthy
        produce(broker.bootstrap, topics.events, views(1, 100), partition=0)
        produce(broker.bootstrap, topics.events, views(101, 1, NEW_IDS[0]), partition=0)
        produce(broker.bootstrap, topics.events, views(102, 100), partition=0)
        produce(broker.bootstrap, topics.events, views(1001, 700), partition=1)
        produce(broker.bootstrap, topics.events, views(2001, 700), partition=2)
        healthy_elsewhere = want(range(1, 101), range(1001, 1701), range(2001, 2701))
        wait_for(lambda: relay.alive_or_fail() and healthy_elsewhere <= set(product_ids(sandbox)), 60,
                 "the healthy partitions delivered while one id fails")
        status, why = readiness(relay)
        assert status == 503 and "schema id 11" in why and f"127.0.0.1:{stub.port}" in why, why
        got = set(product_ids(sandbox))
        waiting = want(range(101, 202))
        print(f"\nwhile schema id 11 answers 500: {len(got)} of 1,600 healthy views delivered; "
              f"{len(waiting & got)} of partition 0's 101 from the failing record on")
        assert not waiting & got  # partition 0 waits from the failing record on, in order
        wait_for(lambda: committed(broker.bootstrap, topics.group, topics.events).get(0) == 100, 30,
                 "partition 0 committed up to the record that waits")
        assert committed(broker.bootstrap, topics.group, topics.events).get(0) == 100  # and not past it

        stub.fail_ids = {}
        wait_for(lambda: set(product_ids(sandbox)) == healthy_elsewhere | waiting, 60, "everything delivered")
        wait_for(lambda: all_committed(broker, topics), 30, "commits to the end")
        wait_for(lambda: readiness(relay)[0] == 200, 30, "ready again")
        assert max(product_ids(sandbox).values()) == 1
        assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []
        assert relay.stop() == 0
    finally:
        stub.stop()
