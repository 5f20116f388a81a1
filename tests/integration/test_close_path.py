"""SIGTERM ends the relay within ``shutdown_grace_s`` plus the close margin whatever its neighbours do: a
vendor that hangs, a broker that stopped answering, a group that fenced the member (the broker restarted),
a revoke in flight. Each time nothing is lost: a second relay (or the same one) settles every event
(tests/integration/reconcile.py)."""

from __future__ import annotations

import subprocess
import time

from processor.consumer import CLOSE_MARGIN_S
from processor.devstack.kafka_io import committed, produce, read_all
from tests.integration.conftest import Topics, freeze, wait_for
from tests.integration.reconcile import below_commit, fault_events, reconcile
from tests.integration.test_faults import fault_config, settled

GRACE_S = 3.0
BOUND_S = GRACE_S + CLOSE_MARGIN_S


def sigterm(relay, scenario: str) -> tuple[int | str, float]:
    """SIGTERM; the exit code (or how long it was still running) and the seconds it took."""
    sent = time.monotonic()
    try:
        rc: int | str = relay.stop(timeout_s=BOUND_S + 5)
    except subprocess.TimeoutExpired:
        rc = f"still running {BOUND_S + 5:g}s after SIGTERM"
    took = time.monotonic() - sent
    print(f"\n{scenario}: SIGTERM -> exit {rc} after {took:.1f}s (bound {BOUND_S:g}s)")
    return rc, took


def test_sigterm_while_a_vendor_hangs(broker, topics, sandbox, relays):
    sandbox.faults("quicklizard", timeout_rate=1.0, hang_s=600)  # every request held, never answered
    cfg = fault_config(broker, topics, sandbox, shutdown_grace_s=GRACE_S)
    events = fault_events(400)
    produce(broker.bootstrap, topics.events, [(e.key, e.value) for e in events])
    relay = relays(cfg, "hung")
    relay.wait_ready(30)
    wait_for(lambda: sandbox.stats().get("quicklizard", {}).get("requests", 0) > 0
             or relay.metric("processor_inflight_messages") > 0, 30, "requests to the hung vendor")
    rc, took = sigterm(relay, "vendor hangs")
    assert rc == 0 and took < BOUND_S, relay.log()[-3000:]
    sandbox.faults("quicklizard")
    rest = relays(cfg, "rest")
    rest.wait_ready(30)
    settled(broker, topics, sandbox, events, "SIGTERM while a vendor hangs, then a second relay").assert_complete()
    assert rest.stop() == 0


def test_sigterm_while_the_broker_is_stopped(own_broker, sandbox, relays):
    topics = Topics(own_broker)
    cfg = fault_config(own_broker, topics, sandbox, shutdown_grace_s=GRACE_S)
    events = fault_events(300)
    produce(own_broker.bootstrap, topics.events, [(e.key, e.value) for e in events[:200]])
    relay = relays(cfg, "frozen")
    relay.wait_ready(30)
    wait_for(lambda: relay.metric("processor_committed_offset") > 0, 30, "a first commit")
    freeze(own_broker, True)
    try:
        rc, took = sigterm(relay, "broker stopped")
        log = relay.log()
    finally:
        freeze(own_broker, False)
    assert rc == 0 and took < BOUND_S, log[-3000:]
    produce(own_broker.bootstrap, topics.events, [(e.key, e.value) for e in events[200:]])
    rest = relays(cfg, "rest")
    rest.wait_ready(40)
    settled(own_broker, topics, sandbox, events, "SIGTERM while the broker is stopped, then a second relay",
            timeout_s=120).assert_complete()
    assert rest.stop() == 0


def test_sigterm_after_the_group_fenced_the_member_in_a_broker_restart(own_broker, sandbox, relays, tmp_path):
    """The local broker keeps everything in memory: after its restart the topics are created again, the
    member the relay was is unknown to it. The relay goes on with the new broker (or is fenced and never
    commits for the old member), delivers what is produced after the restart, and exits in the bound."""
    topics = Topics(own_broker)
    cfg = fault_config(own_broker, topics, sandbox, shutdown_grace_s=GRACE_S)
    before, after = fault_events(100), fault_events(200, start=100)
    produce(own_broker.bootstrap, topics.events, [(e.key, e.value) for e in before])
    relay = relays(cfg, "fenced")
    relay.wait_ready(30)
    wait_for(lambda: relay.metric("processor_committed_offset") > 0, 30, "a first commit")
    own_broker.stop()
    own_broker.start()  # the same port, nothing of before
    own_broker.create_topics({topics.events: 3, topics.dlq: 1, **dict.fromkeys(topics.retry.values(), 1)})
    produce(own_broker.bootstrap, topics.events, [(e.key, e.value) for e in after])
    sandbox.reset()
    r = settled(own_broker, topics, sandbox, after, "after a broker restart", timeout_s=120)
    log = relay.log()
    print(f"fenced: {'fenced' in log}, commit failures logged: {log.count('commit failed')}")
    rc, took = sigterm(relay, "after a broker restart")
    assert rc == 0 and took < BOUND_S, relay.log()[-3000:]
    r.assert_complete()


def test_sigterm_while_a_revoke_is_in_flight(broker, topics, sandbox, relays):
    """A second relay joins, the first drains its revoke (a slow vendor: the whole grace) and gets SIGTERM
    meanwhile: it exits in the bound, and everything below what it committed was delivered, dead-lettered or
    parked. (The local broker does not complete a rebalance a member left in the middle of, so the second
    relay never takes over here: what the first committed is checked instead.)"""
    sandbox.faults("quicklizard", latency_ms=2000)  # slow: the revoke's drain takes its whole grace
    cfg = fault_config(broker, topics, sandbox, shutdown_grace_s=GRACE_S)
    events = fault_events(600)
    produce(broker.bootstrap, topics.events, [(e.key, e.value) for e in events])
    a = relays(cfg, "a")
    a.wait_ready(30)
    wait_for(lambda: a.metric("processor_committed_offset") > 0, 30, "a first commit")
    b = relays(cfg, "b")
    wait_for(lambda: a.alive_or_fail() and "revoking" in a.log(), 40, "a revoke in flight at a")
    rc, took = sigterm(a, "revoke in flight")
    assert rc == 0 and took < BOUND_S, a.log()[-3000:]
    b.kill()
    done = committed(broker.bootstrap, topics.group, topics.events)
    assert sum(max(0, o) for o in done.values()) > 0
    below = below_commit(events, read_all(broker.bootstrap, topics.events, idle_s=1), done)
    received = {v: sandbox.received(v) for v in ("quicklizard", "tracardi")}
    parked = [m for t in topics.retry.values() for m in read_all(broker.bootstrap, t, idle_s=0.5)]
    r = reconcile(below, received, [*read_all(broker.bootstrap, topics.dlq, idle_s=1), *parked])
    print(r.summary("SIGTERM during a revoke: below the commits"))
    r.assert_accounted()
