"""The fault suite (issue 10): crashes, rebalances, a graceful stop under load, the broker away, the
dead-letter topic unwritable. Real CLI, real broker, the sandbox's twins. Every scenario ends by
reconciling (tests/integration/reconcile.py) and prints its figures (``pytest -s`` shows them)."""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from processor.devstack.kafka_io import committed, end_offsets, produce, read_all
from tests.integration.conftest import (
    Topics,
    freeze,
    http_text,
    quicklizard_vendor,
    relay_config,
    relay_starter,
    tracardi_vendor,
    wait_for,
)
from tests.integration.reconcile import Reconciliation, Stream, below_commit, fault_event, fault_events, reconcile

SEED = int(os.environ.get("FAULT_SEED", "20261201"))
# fast retries in place, then parked (after 2 s) and redriven; dead-lettered as exhausted after 2 minutes
FAST_RETRY = {"max_attempts": 3, "base_delay_ms": 20, "max_delay_ms": 100, "park_after_s": 2, "max_elapsed_s": 120}
KILLS = 20
INFLIGHT_LIMIT = 200
CONSUME_BATCH = 50


NO_BREAKER = {"consecutive_failures": 1_000_000, "min_requests": 1_000_000}


def fault_config(broker, topics, sandbox, **relay: Any) -> dict[str, Any]:
    ql = quicklizard_vendor(sandbox, batch={"max_events": 20, "max_wait_ms": 50}, concurrency=2, retry=FAST_RETRY)
    tr = tracardi_vendor(sandbox, batch={"max_events": 20, "max_wait_ms": 50}, concurrency=4, retry=FAST_RETRY)
    relay = {"max_inflight_events": INFLIGHT_LIMIT, "commit_interval_s": 0.3, "shutdown_grace_s": 5, **relay}
    cfg = relay_config(broker, topics, sandbox, {"quicklizard": ql, "tracardi": tr}, **relay)
    cfg["kafka"]["consume_batch"] = CONSUME_BATCH
    return cfg


def settled(broker, topics, sandbox, produced, scenario: str, timeout_s: float = 90) -> Reconciliation:
    """Wait until the group committed every partition to its end, then reconcile and print the figures."""
    ends = end_offsets(broker.bootstrap, topics.events)
    assert sum(ends.values()) == len(produced)
    wait_for(lambda: committed(broker.bootstrap, topics.group, topics.events) == ends, timeout_s,
             "commits to the end", step=0.5)

    def outcome() -> Reconciliation | None:
        """Parked events settle on their vendor's retry topic first: wait (bounded) for their redrive."""
        received = {v: sandbox.received(v) for v in ("quicklizard", "tracardi")}
        r = reconcile(produced, received, read_all(broker.bootstrap, topics.dlq, idle_s=1.5))
        return r if not r.lost else None

    try:
        r = wait_for(outcome, timeout_s, "every event received or dead-lettered", step=1.0)
    except TimeoutError:
        received = {v: sandbox.received(v) for v in ("quicklizard", "tracardi")}
        r = reconcile(produced, received, read_all(broker.bootstrap, topics.dlq, idle_s=1.5))
    print(r.summary(scenario))
    return r


def test_kill_9_at_random_instants_loses_nothing(broker, topics, sandbox, relays):
    """kill -9 at KILLS random instants while a stream is produced, with retries, partial failures and dead
    letters in flight, a restart after each: nothing lost; duplicates bounded by the in-flight limit."""
    rng = random.Random(SEED)
    print(f"[crash] seed={SEED} (FAULT_SEED=... to replay other instants)")
    sandbox.faults("quicklizard", error_rate=0.2, partial_failure_rate=0.02, latency_ms=10)
    sandbox.faults("tracardi", error_rate=0.1, partial_failure_rate=0.02, drop_rate=0.02, latency_ms=10)
    cfg = fault_config(broker, topics, sandbox, commit_interval_s=0.1)
    # a killed member is evicted after the session timeout before its successor's join completes: keep it short
    cfg["kafka"]["client"].update({"session.timeout.ms": 2000, "heartbeat.interval.ms": 500})
    stream = Stream(broker.bootstrap, topics.events, fault_events(4000, reject_every=50), per_tick=5,
                    tick_s=0.1).start()
    instants = []
    for kill in range(KILLS):
        relay = relays(cfg, f"crash{kill}")
        relay.wait_ready(30)
        instants.append(round(rng.uniform(0.1, 2.0), 2))
        time.sleep(instants[-1])  # the random instant of this kill, after the relay became ready
        relay.alive_or_fail()
        relay.kill()
    produced = stream.join()
    final = relays(cfg, "final")
    final.wait_ready(30)
    r = settled(broker, topics, sandbox, produced, "crash")
    assert final.stop() == 0
    print(f"[crash] kills={KILLS} at {instants} s after ready; duplicates per kill: "
          f"{ {v: round(n / KILLS, 1) for v, n in r.duplicates.items()} } (bound {INFLIGHT_LIMIT + CONSUME_BATCH})")
    r.assert_complete()
    # a kill redelivers at most what was consumed and not committed: the in-flight limit plus one poll
    for vendor, n in r.duplicates.items():
        assert n <= KILLS * (INFLIGHT_LIMIT + CONSUME_BATCH), (vendor, n)


@pytest.mark.parametrize("assignor", ["range,roundrobin", "cooperative-sticky"])
def test_rebalance_one_two_one_loses_nothing(broker, topics, sandbox, relays, assignor):
    """Scale 1 -> 2 -> 1 processes during a steady stream: a second relay joins the group, then the first
    one is stopped (SIGTERM). Eager rebalances, then incremental ones (the local broker completes these)."""
    sandbox.faults("quicklizard", error_rate=0.2, partial_failure_rate=0.02, latency_ms=10)
    sandbox.faults("tracardi", error_rate=0.1, partial_failure_rate=0.02, latency_ms=10)
    cfg = fault_config(broker, topics, sandbox)
    cfg["kafka"]["client"]["partition.assignment.strategy"] = assignor
    a = relays(cfg, "a")
    a.wait_ready(30)
    stream = Stream(broker.bootstrap, topics.events, fault_events(1000, reject_every=50), per_tick=5,
                    tick_s=0.1).start()
    wait_for(lambda: sandbox.stats().get("tracardi", {}).get("accepted", 0) > 100, 30, "a delivering")
    b = relays(cfg, "b")
    b.wait_ready(40)
    wait_for(lambda: b.metric("processor_events_consumed_total") > 50, 30, "b consuming its share")
    consumed = a.metric("processor_events_consumed_total")
    wait_for(lambda: a.metric("processor_events_consumed_total") > consumed, 30, "a consuming its share")
    assert a.stop() == 0
    produced = stream.join()
    r = settled(broker, topics, sandbox, produced, f"rebalance 1-2-1 ({assignor})")
    assert b.stop() == 0
    r.assert_complete()
    first_revoke = next(line for line in a.log().splitlines()
                        if f'"revoking {topics.events}[' in line)  # the input topic's group (not the redrive's)
    incremental = first_revoke.count("[") < 3  # the join took one partition from a, not all three
    assert incremental == (assignor == "cooperative-sticky"), first_revoke


def retried_in_place(cfg: dict[str, Any], max_attempts: int, max_elapsed_s: float) -> None:
    """QuickLizard in block mode without a breaker: what fails is retried in place (200-500 ms apart),
    never parked, until ``max_attempts`` or ``max_elapsed_s``."""
    cfg["vendors"]["quicklizard"].update(on_outage="block", breaker=NO_BREAKER)
    cfg["vendors"]["quicklizard"]["retry"] = {"max_attempts": max_attempts, "base_delay_ms": 200,
                                              "max_delay_ms": 500, "max_elapsed_s": max_elapsed_s}


def test_revoke_mid_retry_does_not_dead_letter_twice(broker, topics, sandbox, relays):
    """A revoke whose drain outlasts the grace: the revoked events are redelivered to their next owner, so the
    old pipelines must give them up, not keep retrying them into a second dead letter."""
    sandbox.faults("quicklizard", error_rate=1.0)  # down: every QuickLizard batch retries until exhausted
    cfg = fault_config(broker, topics, sandbox, shutdown_grace_s=1, max_inflight_events=5000)  # never paused
    retried_in_place(cfg, max_attempts=50, max_elapsed_s=6)
    events = fault_events(300)
    produce(broker.bootstrap, topics.events, [(e.key, e.value) for e in events])
    a = relays(cfg, "a")
    a.wait_ready(30)
    wait_for(lambda: a.metric("processor_vendor_retries_total", vendor="quicklizard") > 0, 30, "retries")
    b = relays(cfg, "b")
    b.wait_ready(40)
    r = settled(broker, topics, sandbox, events, "revoke mid-retry", timeout_s=60)
    assert a.stop() == 0 and b.stop() == 0
    r.assert_complete()
    assert r.dead_lettered[("quicklizard", "exhausted")] == len(events)
    assert not r.dead_twice, f"dead-lettered twice: {dict(r.dead_twice)}"


def test_rebalance_while_paused_keeps_fetching(broker, topics, sandbox, relays):
    """A relay paused for back-pressure when a rebalance gives it partitions again: librdkafka keeps a
    partition's pause across a rebalance, so the relay must resume what it paused or stall for good. (The
    revoke takes every in-flight event away, so the relay never pauses again, and never resumes. With
    incremental rebalances the revoke takes one partition's share only: the relay re-pauses at once and
    resumes later, so the same flaw stalls only when that share brings it below the resume mark.)"""
    sandbox.faults("quicklizard", error_rate=1.0)  # down: nothing settles, the in-flight limit is reached at once
    cfg = fault_config(broker, topics, sandbox, max_inflight_events=100, shutdown_grace_s=1)
    retried_in_place(cfg, max_attempts=100, max_elapsed_s=20)  # and holds the source at its budget
    events = fault_events(1000)
    produce(broker.bootstrap, topics.events, [(e.key, e.value) for e in events])
    a = relays(cfg, "a")
    a.wait_ready(30)
    wait_for(lambda: a.metric("processor_source_paused") == 1, 30, "a paused for back-pressure")
    b = relays(cfg, "b")
    b.wait_ready(40)
    wait_for(lambda: a.metric("processor_rebalances_total", kind="assign") >= 2, 30, "a assigned again")
    sandbox.faults("quicklizard")  # healthy again: everything can settle now
    r = settled(broker, topics, sandbox, events, "rebalance while paused", timeout_s=30)
    assert a.stop() == 0 and b.stop() == 0
    r.assert_complete()


@pytest.fixture(scope="module")
def graceful_stop(broker, sandbox_proc, tmp_path_factory) -> dict[str, Any]:
    """SIGTERM while heavily loaded, then a second relay finishes the rest; what each step showed."""
    sandbox, topics, grace = sandbox_proc, Topics(broker), 4.0
    sandbox.reset()
    start, kill_all = relay_starter(tmp_path_factory.mktemp("graceful"))
    try:
        sandbox.faults("quicklizard", latency_ms=1500)  # slow vendors: more in flight than the grace can drain
        sandbox.faults("tracardi", latency_ms=200)
        cfg = fault_config(broker, topics, sandbox, shutdown_grace_s=grace, max_inflight_events=400)
        cfg["vendors"]["tracardi"]["concurrency"] = 8
        events = fault_events(2000, reject_every=50)
        produce(broker.bootstrap, topics.events, [(e.key, e.value) for e in events])
        relay = start(cfg, "loaded")
        relay.wait_ready(30)
        # each vendor holds at most its budget (400 / 2): more than QuickLizard drains within the grace
        wait_for(lambda: relay.metric("processor_inflight_messages") >= 150
                 and sandbox.stats().get("quicklizard", {}).get("accepted", 0) > 0, 30, "heavy load")
        out: dict[str, Any] = {"grace": grace}
        try:
            out["rc"] = relay.stop(timeout_s=grace + 3)  # the bound: one grace period and a margin, not two
        except subprocess.TimeoutExpired:
            out["rc"] = f"still running {grace + 3:g}s after SIGTERM"
        out["log"] = relay.log()
        out["committed"] = done = committed(broker.bootstrap, topics.group, topics.events)
        part = below_commit(events, read_all(broker.bootstrap, topics.events, idle_s=1), done)
        received = {v: sandbox.received(v) for v in ("quicklizard", "tracardi")}
        # committed below: received, dead-lettered, or parked on the vendor's retry topic (redriven later)
        parked = [m for t in topics.retry.values() for m in read_all(broker.bootstrap, t, idle_s=0.5)]
        out["early"] = reconcile(part, received, [*read_all(broker.bootstrap, topics.dlq, idle_s=1), *parked])
        print(out["early"].summary("graceful stop: the committed part"))
        sandbox.faults("quicklizard")
        sandbox.faults("tracardi")
        rest = start(cfg, "rest")
        rest.wait_ready(30)
        out["all"] = settled(broker, topics, sandbox, events, "graceful stop, then a second relay")
        out["rest_rc"] = rest.stop()
        return out
    finally:
        kill_all()


def test_sigterm_under_load_exits_0_within_the_grace_and_commits_what_settled(graceful_stop):
    assert graceful_stop["rc"] == 0
    assert sum(max(0, o) for o in graceful_stop["committed"].values()) > 0, "nothing settled was committed"
    graceful_stop["early"].assert_accounted()  # every event below the commits was received or dead-lettered
    graceful_stop["all"].assert_complete()
    assert graceful_stop["rest_rc"] == 0


def test_sigterm_under_load_drains_once(graceful_stop):
    log = graceful_stop["log"]
    assert log.count("stopping: no more fetching") == 1
    assert log.count("not settled after the grace time") <= 1, "the drain ran more than once"


def test_broker_unavailable_at_start_and_for_30s_mid_run(own_broker, sandbox, relays):
    topics = Topics(own_broker)
    sandbox.faults("quicklizard", error_rate=0.1)
    cfg = fault_config(own_broker, topics, sandbox)
    # give up a connection attempt to a broker that does not answer after 3 s (librdkafka's default is 30 s)
    cfg["kafka"]["client"]["socket.connection.setup.timeout.ms"] = 3000
    freeze(own_broker, True)
    try:
        relay = relays(cfg, "patient")
        wait_for(lambda: relay.alive_or_fail() and any(f"broker {own_broker.bootstrap} not reachable" in line
                                                       for line in relay.log().splitlines()),
                 30, "a log line naming the broker it cannot reach")
        assert http_text(f"{relay.metrics_url}/readyz")[0] == 503
        assert relay.alive_or_fail()
    finally:
        freeze(own_broker, False)
    relay.wait_ready(60)
    print("[broker away] at start:", next(line for line in relay.log().splitlines() if "not reachable" in line)[:240])
    stream = Stream(own_broker.bootstrap, topics.events, fault_events(2000, reject_every=50), per_tick=5,
                    tick_s=0.1).start()
    wait_for(lambda: sandbox.stats().get("tracardi", {}).get("accepted", 0) > 200, 30, "deliveries")
    pid = relay.proc.pid
    freeze(own_broker, True)
    try:
        ready_during = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the outage lasts 30 s; watch the relay meanwhile
            relay.alive_or_fail()
            ready_during.add(http_text(f"{relay.metrics_url}/readyz")[0])
            time.sleep(1)
    finally:
        freeze(own_broker, False)
    print(f"[broker away] readiness answers during the 30 s outage: {sorted(ready_during)}")
    produced = stream.join()
    r = settled(own_broker, topics, sandbox, produced, "broker away at start and for 30 s", timeout_s=120)
    assert relay.proc.pid == pid and relay.proc.poll() is None  # recovered without a restart
    log = relay.log()
    assert "Consumer group session timed out" in log and log.count('"msg":"assigned ') >= 2, "no rejoin logged"
    assert relay.stop() == 0
    r.assert_complete()


@pytest.fixture(scope="module")
def dlq_unwritable(broker, sandbox_proc, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A relay whose dead-letter writes are refused (its producer takes no record over 1,000 bytes, and the
    event to dead-letter carries a 2 kB header), given an event that must be dead-lettered: partition 0
    holds 19 good events, one QuickLizard rejects (offset 19), 19 good ones; partitions 1 and 2 hold good
    events only. (A dead-letter topic missing at start is refused before anything is consumed: below.)"""
    sandbox, topics = sandbox_proc, Topics(broker)
    sandbox.reset()
    start, kill_all = relay_starter(tmp_path_factory.mktemp("dlq"))
    cfg = fault_config(broker, topics, sandbox)
    cfg["deadletter"] = {"topic": topics.dlq, "retry_delay_s": 0.5, "producer": {"message.max.bytes": 1000}}
    parts = {0: [fault_events(19, start=1), [fault_event(20, reject_every=20)], fault_events(19, start=21)],
             1: [fault_events(30, start=100)], 2: [fault_events(30, start=200)]}
    for p, chunks in parts.items():
        for chunk in chunks:
            big = [("trace", b"x" * 2000)] if len(chunk) == 1 else None
            produce(broker.bootstrap, topics.events, [(e.key, e.value) for e in chunk], headers=big, partition=p)
    relay = start(cfg, "no-dlq")
    try:
        relay.wait_ready(30)
        want = {0: 19, 1: 30, 2: 30}  # everything but the rejected event and what follows it in partition 0
        wait_for(lambda: committed(broker.bootstrap, topics.group, topics.events) == want, 30, "commits")
        wait_for(lambda: relay.metric("processor_dlq_produce_failures_total") >= 1, 30, "failed dead-letter writes")
        yield {"relay": relay, "committed": committed(broker.bootstrap, topics.group, topics.events),
               "failures": relay.metric("processor_dlq_produce_failures_total"),
               "readyz": http_text(f"{relay.metrics_url}/readyz")[0]}
    finally:
        kill_all()


def test_unwritable_dead_letter_topic_holds_the_commit_and_is_loud(dlq_unwritable):
    relay = dlq_unwritable["relay"]
    assert dlq_unwritable["committed"] == {0: 19, 1: 30, 2: 30}  # not past the event without its dead letter
    assert dlq_unwritable["failures"] >= 1
    errors = [line for line in relay.log().splitlines() if '"level":"error"' in line and "dead-letter" in line]
    assert errors and all("[0]@19" in line for line in errors), errors[:3]
    # a refusal for good (the record is larger than the producer takes): one line naming the topic and the cause,
    # retried slowly (not a line every retry_delay_s)
    assert len(errors) == 1 and "max.message.bytes" in errors[0] and "refuses" in errors[0], errors
    print(f"[dlq unwritable] committed={dlq_unwritable['committed']} failures={dlq_unwritable['failures']:g} "
          f"readyz={dlq_unwritable['readyz']} error line: {errors[0][:240]}")


def test_unwritable_dead_letter_topic_makes_the_relay_not_ready(dlq_unwritable):
    assert dlq_unwritable["readyz"] == 503


def test_a_missing_dead_letter_topic_is_refused_at_start(broker, topics, sandbox, relays):
    cfg = fault_config(broker, topics, sandbox)
    cfg["deadletter"] = {"topic": f"{topics.dlq}.missing"}
    relay = relays(cfg, "no-dlq-topic")
    assert relay.proc.wait(60) == 2
    assert f"topics missing: {topics.dlq}.missing" in relay.log()

