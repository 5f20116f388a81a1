"""Liveness means a restart would cure it. A relay waiting for its broker, or holding events for a vendor
that blocks through a long outage, is alive (``/healthz`` 200) and not ready (``/readyz`` 503, saying
why); it recovers without a restart. And a relay that has not committed yet still shows its lag and the
parked backlog."""

from __future__ import annotations

import collections
from typing import Any

from confluent_kafka import Producer

from processor.devstack.kafka_io import produce
from processor.devstack.registry import RegistryStub
from processor.devstack.samples import encode, make_view
from processor.events import EventKind
from tests.integration.conftest import Topics, freeze, http_text, quicklizard_vendor, relay_config, wait_for
from tests.integration.test_faults import NO_BREAKER


def views(first: int, n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(first, first + n):
        rec = make_view(i, i, event_time=1_700_000_000_000 + i)
        rec["event_id"] = f"live-{i}"
        out.append((f"k{i}".encode(), encode(EventKind.PRODUCT_VIEW, rec)))
    return out


def view_ids(sandbox: Any) -> set[str]:
    return {i["product_id"] for i in sandbox.received("quicklizard") if i["event"] == "view"}


class Probes:
    """What the kubelet would have seen: every /healthz and /readyz answer, counted."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.health: collections.Counter[int] = collections.Counter()
        self.ready: collections.Counter[int] = collections.Counter()
        self.last_ready = ""

    def probe(self) -> bool:
        self.relay.alive_or_fail()
        health = http_text(f"{self.relay.metrics_url}/healthz")[0]
        ready, text = http_text(f"{self.relay.metrics_url}/readyz")
        if health:  # 0: not listening yet (the process is starting)
            self.health[health] += 1
            self.ready[ready] += 1
            self.last_ready = text
        return True


def test_a_relay_started_before_its_broker_stays_alive_then_becomes_ready_without_a_restart(own_broker, sandbox,
                                                                                            relays):
    topics = Topics(own_broker)
    # liveness would fail after 2 s of a stalled loop (30 s by default): the wait below is many times that
    cfg = relay_config(own_broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}, loop_stall_s=2)
    cfg["kafka"]["client"]["socket.connection.setup.timeout.ms"] = 3000
    freeze(own_broker, True)
    try:
        relay = relays(cfg)
        probes = Probes(relay)
        wait_for(lambda: probes.probe() and relay.log().count(f"broker {own_broker.bootstrap} not reachable") >= 2,
                 60, "the relay waiting for its broker through two attempts")
    finally:
        freeze(own_broker, False)
    assert set(probes.health) == {200}, probes.health  # 503 from 2 s on: the heartbeat waited for Kafka
    assert set(probes.ready) == {503} and "not assigned" in probes.last_ready
    pid = relay.proc.pid
    wait_for(lambda: probes.probe() and probes.ready[200] > 0, 90, "ready once the broker answers")
    produce(own_broker.bootstrap, topics.events, views(0, 20))
    wait_for(lambda: probes.probe() and view_ids(sandbox) >= {f"P-{i:05d}" for i in range(20)}, 60, "delivered")
    assert set(probes.health) == {200} and relay.proc.pid == pid
    assert relay.stop() == 0


def test_a_blocking_vendor_down_past_stall_after_s_is_not_ready_but_alive(broker, topics, sandbox, relays):
    vendor = quicklizard_vendor(sandbox, on_outage="block", breaker=NO_BREAKER,
                                retry={"max_attempts": 100, "base_delay_ms": 200, "max_delay_ms": 500,
                                       "max_elapsed_s": 3600})
    relay = relays(relay_config(broker, topics, sandbox, {"quicklizard": vendor}, stall_after_s=2))
    relay.wait_ready()
    probes = Probes(relay)
    sandbox.faults("quicklizard", error_rate=1.0, error_status=503)
    produce(broker.bootstrap, topics.events, views(0, 20))
    # down for longer than stall_after_s: readiness fails and says why; the oldest-unsettled gauge shows it
    wait_for(lambda: probes.probe() and probes.ready[503] > 0 and "quicklizard" in probes.last_ready, 60,
             "readiness to fail naming the vendor")
    assert "unsettled" in probes.last_ready, probes.last_ready
    assert relay.metric("processor_oldest_unsettled_seconds") > 2
    wait_for(lambda: probes.probe() and probes.ready[503] >= 20, 60, "a while not ready")
    assert set(probes.health) == {200}, probes.health  # liveness failed: a restart every stall_after_s
    assert "past relay.stall_after_s" in relay.log()
    sandbox.faults("quicklizard")  # back: everything delivered in place, ready again, never restarted
    wait_for(lambda: probes.probe() and view_ids(sandbox) >= {f"P-{i:05d}" for i in range(20)}, 60, "delivered")
    wait_for(lambda: http_text(f"{relay.metrics_url}/readyz")[0] == 200, 30, "ready again")
    assert set(probes.health) == {200}
    assert relay.stop() == 0


def gauge_series(relay: Any, name: str) -> dict[str, float]:
    """Every sample of ``name`` by its label text (empty while /metrics does not answer)."""
    status, text = http_text(f"{relay.metrics_url}/metrics")
    out = {}
    for line in text.splitlines() if status == 200 else []:
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") or head == name:
            out[head[len(name):]] = float(value)
    return out


def test_a_restarted_relay_exports_lag_and_the_parked_backlog_before_its_first_commit(broker, topics, sandbox,
                                                                                      relays):
    one_a_batch = {"batch.num.messages": 1}  # the local broker's high watermark is exact with one record a batch
    cfg = relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)})
    produce(broker.bootstrap, topics.events, views(0, 9), settings=one_a_batch)
    first = relays(cfg, "first")
    wait_for(lambda: first.alive_or_fail() and len(view_ids(sandbox)) == 9, 60, "the first run delivered")
    assert first.stop() == 0  # committed what it delivered

    produce(broker.bootstrap, topics.events, views(100, 30), settings=one_a_batch)
    put = Producer({"bootstrap.servers": broker.bootstrap, "log_level": 3, **one_a_batch})
    for key, value in views(200, 12):  # a parked backlog its redrive group has never committed on
        put.produce(topics.retry["quicklizard"], value=value, key=key, headers=[
            ("relay.vendor", b"quicklizard"), ("relay.error_class", b"parked"), ("relay.next_attempt_ms", b"0")])
    assert put.flush(30) == 0
    # restarted while the schema registry is away: every message is held, nothing registered, no commit
    registry = RegistryStub().start()
    registry.stop()
    cfg["schema_registry"] = {"url": registry.url, "client": {"max.retries": 0, "timeout": 2}}
    second = relays(cfg, "second")
    wait_for(lambda: second.alive_or_fail() and "waiting for the schema registry" in second.log(), 60,
             "the restarted relay waiting for the registry")
    wait_for(lambda: second.alive_or_fail() and sum(gauge_series(second, "processor_consumer_lag").values()) == 30
             and len(gauge_series(second, "processor_consumer_lag")) == 3, 60, "the consumer lag exported")
    wait_for(lambda: second.metric("processor_parked_events", vendor="quicklizard") == 12, 60,
             "the parked backlog exported")
    assert gauge_series(second, "processor_committed_offset") == {}  # it has not committed anything
    assert len(view_ids(sandbox)) == 9
    assert second.stop() == 0
