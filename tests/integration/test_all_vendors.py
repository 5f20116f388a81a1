"""All five vendors at once through the real CLI, configured exactly as ``make run`` configures them
(each adapter's example settings against its sandbox twin)."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest

from processor.deadletter import headers_dict
from processor.devstack.demo import demo_config
from processor.devstack.kafka_io import committed, end_offsets, produce, read_all
from processor.devstack.samples import Workload, encode, make_view, with_changes
from processor.events import EventKind
from processor.vendors import REGISTRY, adapter_class
from tests.integration.conftest import wait_for

OUTCOMES = ("delivered", "filtered", "dead_lettered", "parked")


def workload_messages(n: int = 400) -> tuple[list[tuple[bytes, bytes]], Counter[EventKind]]:
    workload = Workload(visitors=40, order_rate=0.3, seed=11, sites=("shop-1", "shop-2"))
    events = list(itertools.islice(iter(workload), n))
    kinds = Counter(kind for kind, _, _ in events)
    assert kinds[min(kinds)] > 20 and len(kinds) == 2  # both kinds, enough of each
    return [(key, encode(kind, rec)) for kind, rec, key in events], kinds


def start_relay(broker, topics, sandbox, relays, registry_url: str | None = None) -> tuple[Any, dict[str, str]]:
    """The five vendors as ``make run`` configures them (embedded schema ids), or, given ``registry_url``,
    resolving ids through that schema registry (the production shape; parking is on in both)."""
    demo, env = demo_config(broker.bootstrap, sandbox.url, 0)
    assert set(demo["vendors"]) == set(REGISTRY)  # the demo shows all five
    config = {**demo, "kafka": {**demo["kafka"], "group_id": topics.group, "topics": [topics.events]},
              "deadletter": {"topic": topics.dlq}, "relay": {"shutdown_grace_s": 10, "commit_interval_s": 0.5}}
    if registry_url is not None:
        config["schema_registry"] = {"url": registry_url}
    for vendor in config["vendors"].values():  # fast retries, so injected failures settle quickly
        vendor["retry"] = {"max_attempts": 8, "base_delay_ms": 20, "max_delay_ms": 200, "max_elapsed_s": 20}
    relay = relays(config, "all", env=env)
    relay.wait_ready()
    return relay, env


def wait_settled(relay, kinds: Counter[EventKind],
                 waiting: frozenset[str] = frozenset()) -> dict[str, dict[str, float]]:
    """Wait until every vendor settled every event of the kinds it takes, and every event it parked was
    redriven and settled; its counts by outcome (``dead_lettered``: every dead letter written for it).
    ``waiting``: vendors whose parked events keep waiting on the vendor (a setup error that lasts): parked
    counts as settled, redriven or not."""
    out = {}
    for vendor in REGISTRY:
        want = sum(n for kind, n in kinds.items() if kind in adapter_class(vendor).kinds)

        def counts(v: str = vendor) -> dict[str, float]:
            return {o: relay.metric("processor_vendor_events_total", vendor=v, outcome=o) for o in OUTCOMES}

        def once(v: str = vendor) -> dict[str, float]:
            """By outcome, each event once: a parked event redriven later counts as parked, not again."""
            out = counts(v)
            for o in OUTCOMES:
                out[o] -= relay.metric("processor_redriven_events_total", vendor=v, outcome=o)
            return out

        def redriven(v: str = vendor) -> bool:
            return (relay.metric("processor_parked_total", vendor=v)
                    == relay.metric("processor_redriven_events_total", vendor=v))

        wait_for(lambda c=once, w=want: sum(c().values()) >= w, 90, f"{vendor} to settle {want} events")
        if vendor not in waiting:
            wait_for(redriven, 90, f"{vendor}'s parked events to be redriven")
        assert sum(once().values()) == want, (vendor, once())
        out[vendor] = counts()
    return out


@pytest.mark.parametrize("with_registry", [False, True], ids=["embedded-ids", "schema-registry"])
def test_every_vendor_receives_what_it_takes(broker, topics, sandbox, relays, registry, with_registry):
    messages, kinds = workload_messages()
    produce(broker.bootstrap, topics.events, messages)
    asked = registry.requests
    relay, env = start_relay(broker, topics, sandbox, relays, registry.url if with_registry else None)

    for vendor, counts in wait_settled(relay, kinds).items():
        assert counts["dead_lettered"] == 0 and counts["delivered"] > 0, (vendor, counts)
    assert (registry.requests > asked) is with_registry  # the writer schemas came from where configured
    stats = sandbox.stats()
    for vendor in REGISTRY:
        assert stats[vendor]["accepted"] > 0, vendor
        assert stats[vendor].get("rejected", 0) == 0, (vendor, stats[vendor])
    wait_for(lambda: committed(broker.bootstrap, topics.group, topics.events)
             == end_offsets(broker.bootstrap, topics.events), 30, "commits to the end")
    assert relay.stop() == 0
    assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []
    log = relay.log()
    assert '"level": "error"' not in log
    for secret in env.values():
        assert secret not in log


def settled_and_dead_letters(broker, topics, relay, kinds,
                             waiting: frozenset[str] = frozenset()) -> tuple[dict[str, dict[str, float]], list]:
    """Every event settled by every vendor, the source committed to its end, and the dead-letter topic
    holding what the relay counted as dead-lettered, per vendor, once each: (settled counts, dlq records).
    A record twice only where its write's acknowledgement was lost and the relay wrote it again (at least
    once: ``processor_dlq_produce_failures_total``)."""
    settled = wait_settled(relay, kinds, waiting)
    wait_for(lambda: committed(broker.bootstrap, topics.group, topics.events)
             == end_offsets(broker.bootstrap, topics.events), 30, "commits to the end")
    dead = sum(c["dead_lettered"] for c in settled.values())
    dlq = read_all(broker.bootstrap, topics.dlq, expect=int(dead))
    once: dict[tuple[str, ...], Any] = {}
    for m in dlq:
        h = headers_dict(m.headers())
        once.setdefault((h["relay.vendor"], h["relay.original_partition"], h["relay.original_offset"]), m)
    assert len(once) == dead
    assert len(dlq) - len(once) <= relay.metric("processor_dlq_produce_failures_total"), "dead-lettered twice"
    by_vendor = Counter(key[0] for key in once)
    assert by_vendor == {v: c["dead_lettered"] for v, c in settled.items() if c["dead_lettered"]}
    return settled, list(once.values())


def test_partial_failures_and_invalid_events_dead_letter_only_those_for_that_vendor(broker, topics, sandbox,
                                                                                     relays):
    messages, kinds = workload_messages(300)
    # valid for every vendor but Qubit (no Qubit visitor id): dead-lettered for Qubit alone, naming the field
    no_qubit_id = make_view(7, 7)
    del no_qubit_id["visitor"]["vendor_ids"]["qubit_visitor_id"]
    no_qubit_id = with_changes(no_qubit_id, "event_id", "no-qubit-id")
    messages.insert(100, (b"no-qubit-id", encode(EventKind.PRODUCT_VIEW, no_qubit_id)))
    kinds[EventKind.PRODUCT_VIEW] += 1
    for vendor in REGISTRY:
        sandbox.faults(vendor, partial_failure_rate=0.05)
    produce(broker.bootstrap, topics.events, messages)
    relay, _ = start_relay(broker, topics, sandbox, relays)

    settled, dlq = settled_and_dead_letters(broker, topics, relay, kinds)
    # the injected failures hit every vendor; the rest of each batch was delivered all the same
    for vendor, counts in settled.items():
        assert counts["delivered"] > 0, (vendor, counts)
        assert sandbox.stats()[vendor].get("rejected", 0) > 0, vendor
    # (another vendor may dead-letter it too, by an injected failure: those are random)
    reasons = [headers_dict(m.headers()) for m in dlq if m.key() == b"no-qubit-id"]
    assert [(h["relay.error_class"], h["relay.reason"]) for h in reasons if h["relay.vendor"] == "qubit"] == [
        ("rejected", "missing required field visitor.vendor_ids.qubit_visitor_id")]
    assert relay.stop() == 0
