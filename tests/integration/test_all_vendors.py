"""All five vendors at once through the real CLI, configured exactly as ``make run`` configures them
(each adapter's example settings against its sandbox twin): every event reaches every vendor that
takes it, nothing is dead-lettered, the twins reject nothing, offsets are committed to the end."""

from __future__ import annotations

import itertools
from collections import Counter

from processor.devstack.demo import demo_config
from processor.devstack.kafka_io import committed, end_offsets, produce, read_all
from processor.devstack.samples import Workload, encode
from processor.vendors import REGISTRY, adapter_class
from tests.integration.conftest import wait_for


def test_every_vendor_receives_what_it_takes(broker, topics, sandbox, relays):
    workload = Workload(visitors=40, order_rate=0.3, seed=11, sites=("shop-1", "shop-2"))
    events = list(itertools.islice(iter(workload), 400))
    kinds = Counter(kind for kind, _, _ in events)
    assert kinds[min(kinds)] > 20 and len(kinds) == 2  # both kinds, enough of each
    produce(broker.bootstrap, topics.events, [(key, encode(kind, rec)) for kind, rec, key in events])

    demo, env = demo_config(broker.bootstrap, sandbox.url, 0)
    assert set(demo["vendors"]) == set(REGISTRY)  # the demo shows all five
    config = {**demo, "kafka": {**demo["kafka"], "group_id": topics.group, "topics": [topics.events]},
              "deadletter": {"topic": topics.dlq}, "relay": {"shutdown_grace_s": 10, "commit_interval_s": 0.5}}
    relay = relays(config, "all", env=env)
    relay.wait_ready()

    def settled(vendor: str) -> float:
        return sum(relay.metric("processor_vendor_events_total", vendor=vendor, outcome=o)
                   for o in ("delivered", "filtered", "dead_lettered"))

    for vendor in REGISTRY:
        adapter = adapter_class(vendor)
        want = sum(n for kind, n in kinds.items() if kind in adapter.kinds)
        wait_for(lambda v=vendor, w=want: settled(v) >= w, 90, f"{vendor} to settle {want} events")
        delivered = relay.metric("processor_vendor_events_total", vendor=vendor, outcome="delivered")
        assert relay.metric("processor_vendor_events_total", vendor=vendor, outcome="dead_lettered") == 0, vendor
        assert delivered > 0, vendor
        assert settled(vendor) == want, vendor

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
