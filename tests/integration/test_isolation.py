"""Vendor isolation through the real CLI: one vendor hangs, fails or throttles on a steady stream while
the other receives every event produced meanwhile; the broken vendor's events are parked on its retry
topic and redriven when it recovers; nothing is lost, a kill -9 mid-redrive included."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from processor.deadletter import headers_dict
from processor.devstack.kafka_io import committed, end_offsets, produce, read_all
from processor.devstack.samples import encode, make_view
from processor.events import EventKind
from processor.vendors import adapter_class
from tests.integration.conftest import quicklizard_vendor, relay_config, wait_for

TRACARDI_ENV = adapter_class("tracardi").example_env


def view(i: int, site: str = "shop-1") -> tuple[bytes, bytes]:
    rec = make_view(i, i, site_id=site, event_time=1_700_000_000_000 + i)
    rec["event_id"] = f"e{i}"
    return f"v{i % 13}".encode(), encode(EventKind.PRODUCT_VIEW, rec)


class Stream:
    """A steady producer of views in a thread (``sites`` in turn): ``produced`` is how many were acknowledged
    so far."""

    def __init__(self, bootstrap: str, topic: str, per_tick: int = 40, sites: tuple[str, ...] = ("shop-1",)) -> None:
        self.bootstrap, self.topic, self.per_tick, self.sites = bootstrap, topic, per_tick, sites
        self.produced = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            n = self.produced
            produce(self.bootstrap, self.topic,
                    [view(i, self.sites[i % len(self.sites)]) for i in range(n, n + self.per_tick)])
            self.produced = n + self.per_tick

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(30)
        return self.produced


def quicklizard_ids(sandbox: Any) -> set[int]:
    return {int(i["product_id"][2:]) for i in sandbox.received("quicklizard") if i["event"] == "view"}


def tracardi_ids(sandbox: Any) -> set[int]:
    return {int(i["id"][1:]) for i in sandbox.received("tracardi")}


def isolation_config(broker: Any, topics: Any, sandbox: Any) -> dict[str, Any]:
    fragile = quicklizard_vendor(
        sandbox, batch={"max_events": 50, "max_wait_ms": 100}, concurrency=4,
        timeout={"connect_s": 1, "total_s": 1.5},
        retry={"max_attempts": 3, "base_delay_ms": 50, "max_delay_ms": 200, "park_after_s": 2,
               "max_elapsed_s": 600},
        breaker={"consecutive_failures": 3, "cooldown_s": 1, "max_cooldown_s": 3, "probes": 1})
    healthy = {**adapter_class("tracardi").example_settings(sandbox.url), "batch": {"max_events": 50,
                                                                                     "max_wait_ms": 100}}
    return relay_config(broker, topics, sandbox, {"quicklizard": fragile, "tracardi": healthy})


FAULTS = {
    "hang": {"timeout_rate": 1.0, "hang_s": 30},
    "503": {"error_rate": 1.0, "error_status": 503},
    "429": {"throttle_rate": 1.0, "retry_after_s": 1},
}


@pytest.mark.parametrize("shape", list(FAULTS))
def test_one_vendor_down_never_stalls_the_other_and_its_events_are_redriven(shape, broker, topics, sandbox,
                                                                             relays):
    relay = relays(isolation_config(broker, topics, sandbox), env=TRACARDI_ENV)
    relay.wait_ready()
    stream = Stream(broker.bootstrap, topics.events)
    wait_for(lambda: stream.produced >= 200 and len(tracardi_ids(sandbox)) >= 100, 60, "a steady stream")

    sandbox.faults("quicklizard", **FAULTS[shape])
    start = stream.produced
    wait_for(lambda: relay.metric("processor_parked_total", vendor="quicklizard") > 0, 60, "parking")
    wait_for(lambda: stream.produced >= start + 600, 60, "events produced during the outage")
    during = set(range(start, stream.produced))
    # the healthy vendor receives every event produced while the other one is down, before it recovers
    wait_for(lambda: during <= tracardi_ids(sandbox), 60, "the healthy vendor to keep up during the outage")
    if shape == "503":
        wait_for(lambda: relay.metric("processor_vendor_breaker_state", vendor="quicklizard") == 2, 30,
                 "the breaker open")

    sandbox.faults("quicklizard")  # recovered
    total = stream.stop()
    everything = set(range(total))
    wait_for(lambda: everything <= tracardi_ids(sandbox), 60, "the healthy vendor to receive everything")
    wait_for(lambda: everything <= quicklizard_ids(sandbox), 120, "the parked events redriven")
    wait_for(lambda: committed(broker.bootstrap, topics.group, topics.events)
             == end_offsets(broker.bootstrap, topics.events), 30, "commits to the end")
    dead = [headers_dict(m.headers()) for m in read_all(broker.bootstrap, topics.dlq, idle_s=1)]
    assert dead == []  # nothing waited past its budget; under 429 nothing at all is dead-lettered
    assert relay.metric("processor_redriven_events_total", vendor="quicklizard", outcome="delivered") > 0
    if shape == "503":
        for state in ("open", "half_open", "closed"):
            assert relay.metric("processor_vendor_breaker_transitions_total", vendor="quicklizard",
                                state=state) >= 1, state
        assert relay.metric("processor_vendor_breaker_state", vendor="quicklizard") == 0
    assert relay.stop() == 0


def test_kill_9_while_events_are_parked_and_redriven_loses_nothing(broker, topics, sandbox, relays):
    cfg = isolation_config(broker, topics, sandbox)
    msgs = [view(i) for i in range(1500)]
    sandbox.faults("quicklizard", error_rate=1.0, error_status=503)
    first = relays(cfg, "first", env=TRACARDI_ENV)
    produce(broker.bootstrap, topics.events, msgs)
    wait_for(lambda: relay_parked(first) >= 1000, 90, "most events parked")
    sandbox.faults("quicklizard", latency_ms=100)  # recovered, slowly: the redrive is under way when killed
    wait_for(lambda: len(quicklizard_ids(sandbox)) >= 100, 60, "the redrive under way")
    first.kill()
    assert len(quicklizard_ids(sandbox)) < 1500
    sandbox.faults("quicklizard")
    second = relays(cfg, "second", env=TRACARDI_ENV)
    want = set(range(1500))
    wait_for(lambda: want <= quicklizard_ids(sandbox), 120, "every parked event delivered after the restart")
    wait_for(lambda: want <= tracardi_ids(sandbox), 60, "the healthy vendor has everything")
    assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []
    assert second.stop() == 0


def relay_parked(relay: Any) -> float:
    return relay.metric("processor_parked_total", vendor="quicklizard")
