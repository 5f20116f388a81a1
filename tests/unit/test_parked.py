"""The redrive of parked records: how much of a held partition is handed to its vendor at once, and when
its partition is paused."""

from __future__ import annotations

import time
from collections import deque

from processor.codec import Decoder
from processor.deadletter import dlq_headers
from processor.devstack.samples import encode, make_view
from processor.events import EventKind, Source
from processor.isolation import BreakerState
from processor.parked import ParkedRedrive
from processor.redrive import Redrive, RelayRecord
from tests.unit.test_delivery import Harness, answer

RETRY = "shop.events.retry.fake"


def parked(offset: int, next_attempt_ms: int | None = None, age_ms: int = 0, waiting_on: str = "") -> RelayRecord:
    """A parked record; its first failure ``age_ms`` ago (0: just now, within the vendor's retry.max_elapsed_s);
    ``waiting_on``: parked because the vendor made it wait (``relay.waiting_on``)."""
    value = encode(EventKind.PRODUCT_VIEW, make_view(offset, offset))
    original = Source("shop.events", 0, offset, 1_000, b"k", value, [])
    now_ms = int(time.time() * 1000)
    headers = dlq_headers(original, "fake", "parked", 503, "HTTP 503", 1, now_ms - age_ms, now_ms, 0)
    if next_attempt_ms is not None:
        headers.append(("relay.next_attempt_ms", str(next_attempt_ms).encode()))
    if waiting_on:
        headers.append(("relay.waiting_on", waiting_on.encode()))
    return RelayRecord.from_source(Source(RETRY, 0, offset, 1_000, b"k", value, headers))


def redrive_of(h: Harness, records: list[RelayRecord]) -> ParkedRedrive:
    """The redrive's release path alone (no Kafka consumer): one held partition of ``h``'s vendor."""
    r = ParkedRedrive.__new__(ParkedRedrive)
    r.pipelines, r.vendor_of, r.settlement, r.metrics = {"fake": h.pipe}, {RETRY: "fake"}, h.settlement, h.metrics
    r.tracker = h.tracker
    h.tracker.assign(RETRY, 0)
    r.deciders = {"fake": Redrive(h.adapter, Decoder(), h.tracker, max_replays=None)}
    r.reservoir = {(RETRY, 0): deque(records)}
    r.fetch_batch, r._full = 10, set()
    return r


async def test_a_held_partition_is_handed_over_batch_after_batch_up_to_half_the_budget():
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), parking=True, budget=100,
                batch={"max_events": 10})
    r = redrive_of(h, [parked(i) for i in range(80)])
    r._release()
    assert h.pipe.admission.unsettled == 50  # half the budget in one release, in batches of the vendor's size
    assert len(r.reservoir[(RETRY, 0)]) == 30
    assert await h.pipe.drain(5)
    assert sorted(h.settled) == list(range(50)) and all(len(c) == 10 for c in h.calls)
    r._release()  # room again: the rest
    assert await h.pipe.drain(5)
    assert sorted(h.settled) == list(range(80)) and not r.reservoir[(RETRY, 0)] and not h.parked
    await h.pipe.close()


async def test_a_record_not_yet_due_holds_its_partition():
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), parking=True, budget=100,
                batch={"max_events": 10})
    far = 10 ** 15  # ms: not due in this test's lifetime
    r = redrive_of(h, [parked(0), parked(1), parked(2, far), parked(3)])
    r._release()
    assert h.pipe.admission.unsettled == 2 and [x.offset for x in r.reservoir[(RETRY, 0)]] == [2, 3]
    assert await h.pipe.drain(5)
    await h.pipe.close()


async def test_a_busy_vendor_keeps_its_partition_fetching_up_to_the_reservoir():
    """Pausing drops librdkafka's prefetched records: a vendor that merely has no room this moment keeps
    fetching until half its budget's worth of records waits in memory, then is paused until down to half."""
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), parking=True, budget=100,
                batch={"max_events": 10})
    r = redrive_of(h, [parked(i) for i in range(80)])
    r._release()
    # busy: fetching
    assert h.pipe.admission.unsettled == 50 and len(r.reservoir[(RETRY, 0)]) == 30 and r._holds() == set()
    q = r.reservoir[(RETRY, 0)]
    q.extend(parked(i) for i in range(80, 100))  # 50 waiting: what it may hand over at once
    assert r._holds() == {(RETRY, 0)}
    while len(q) > 26:
        q.popleft()
    assert r._holds() == {(RETRY, 0)}  # still above half
    q.popleft()
    assert r._holds() == set()  # half: fetching again
    q.clear()
    assert r._holds() == set()
    assert await h.pipe.drain(5)
    await h.pipe.close()


async def test_a_vendor_that_cannot_take_anything_for_a_while_has_its_partition_paused():
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), parking=True, budget=100)
    r = redrive_of(h, [parked(0, 10 ** 15)])  # not due
    assert r._holds() == {(RETRY, 0)}
    r.reservoir[(RETRY, 0)] = deque([parked(1)])
    assert r._holds() == set()
    h.pipe.admission.gate.hold(60)  # throttled
    assert r._holds() == {(RETRY, 0)}
    await h.pipe.close()


async def test_a_half_open_vendor_is_handed_one_batch_at_a_time_for_its_probes():
    """Half-open, the breaker lets only its probes through: more redriven events would only be parked again,
    and with no live events the redrive's batch is what probes the vendor."""
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), parking=True, budget=100,
                batch={"max_events": 10})
    r = redrive_of(h, [parked(i) for i in range(40)])
    h.pipe.admission.breaker._set(BreakerState.HALF_OPEN)
    r._release()
    assert h.pipe.admission.unsettled == 10 and len(r.reservoir[(RETRY, 0)]) == 30
    r._release()  # that batch still in flight: nothing more
    assert h.pipe.admission.unsettled == 10
    assert await h.pipe.drain(5)
    r._release()  # one probe (one request of this fake vendor) succeeded: another batch for the second
    assert h.pipe.admission.unsettled == 10 and len(r.reservoir[(RETRY, 0)]) == 20
    assert await h.pipe.drain(5)
    assert h.pipe.admission.breaker.state is BreakerState.CLOSED  # both probes succeeded
    r._release()
    assert h.pipe.admission.unsettled == 20  # closed: up to half the budget again, the rest
    assert await h.pipe.drain(5)
    assert sorted(h.settled) == list(range(40)) and not h.parked
    await h.pipe.close()


# -- the redrive inside the bounds (issue 17, finding 4) ----------------------------------------------


async def test_a_vendor_with_a_budget_of_one_is_redriven_one_record_at_a_time():
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), parking=True, budget=1,
                batch={"max_events": 10})
    r = redrive_of(h, [parked(i) for i in range(3)])
    for n in range(1, 4):
        r._release()
        assert h.pipe.admission.unsettled == 1
        assert await h.pipe.drain(5)
        assert sorted(h.settled) == list(range(n))
    await h.pipe.close()


async def test_records_parked_again_count_against_the_vendor_until_kafka_acknowledged_them():
    """A vendor that fails again parks what it was handed: its admission count drops at once, but the records
    stay unsettled until the retry topic acknowledges the write; the redrive takes no more than the vendor's
    budget in unsettled records, however slow the acknowledgements."""
    h = Harness(lambda call, offsets: answer([], status=503), parking=True, budget=20,
                batch={"max_events": 10}, retry={"max_attempts": 1, "base_delay_ms": 1, "max_delay_ms": 1},
                breaker={"consecutive_failures": 1000})
    acks: list = []
    h.park = lambda source, vendor, reason, attempts, first_ms, next_ms, on_ack, waiting_on="": (  # type: ignore[method-assign]
        h.parked.append((source.offset, h.why, reason, attempts, next_ms)), acks.append(on_ack))
    r = redrive_of(h, [parked(i) for i in range(100)])
    for _ in range(10):
        r._release()
        assert await h.pipe.drain(5)
    assert len(h.parked) == 20 and h.pipe.admission.unsettled == 0  # parked again, not yet acknowledged
    for ack in acks:
        ack()
    r._release()
    assert await h.pipe.drain(5)
    assert len(h.parked) == 30  # acknowledged: room again
    await h.pipe.close()


def test_the_redrive_reports_consumer_errors_and_stops_on_a_fatal_one(caplog):
    import logging

    import pytest
    from confluent_kafka import KafkaError, KafkaException

    h = Harness(lambda call, offsets: answer([]), parking=True)
    r = redrive_of(h, [])

    class Failed:
        def __init__(self, err: KafkaError) -> None:
            self.err = err

        def error(self) -> KafkaError:
            return self.err

    with caplog.at_level(logging.WARNING, logger="processor.parked"):
        r._take([Failed(KafkaError(KafkaError._TRANSPORT, "broker down"))])
    assert any("broker down" in rec.getMessage() for rec in caplog.records)
    with pytest.raises(KafkaException):
        r._take([Failed(KafkaError(KafkaError._FATAL, "fenced", fatal=True))])


def test_the_redrives_unsettled_records_count_in_the_relays_bound_and_its_stall_detector():
    from processor.offsets import OffsetTracker
    from tests.unit.test_routing import relay

    rel = relay()
    redrive = ParkedRedrive.__new__(ParkedRedrive)
    redrive.tracker = OffsetTracker(retry_topics=True)
    rel.parked = redrive
    redrive.tracker.assign(RETRY, 0)
    records = [parked(i) for i in range(5)]
    redrive.tracker.register_many(records, [1] * 5)
    for slot in (rec.slot for rec in records):
        slot[3] -= 10 ** 6  # registered long ago
    assert rel.rules.stalled() is not None and "unsettled" in rel.rules.stalled()
    limit = rel.config.relay.max_inflight_events
    redrive.tracker.register_many([parked(i) for i in range(5, 5 + limit)], [1] * limit)
    assert rel._want_pause()


async def test_redriven_outcomes_are_counted_once_each_and_only_what_waited_in_the_topic_is_expired():
    """The redriven counts are what the outcome counts are, for the retry topics' events (a test subtracts
    one from the other): a record past retry.max_elapsed_s before it is redriven is ``expired``; a redriven
    event that fails again and would wait past it is ``dead_lettered``, as any dead letter."""
    h = Harness(lambda call, offsets: answer([], status=503), parking=True, budget=100,
                retry={"max_attempts": 1, "base_delay_ms": 1, "max_delay_ms": 1, "max_elapsed_s": 60},
                breaker={"consecutive_failures": 1, "cooldown_s": 5})
    h.tracker.retry_topics = True  # the redrive's tracker
    # 0: past max_elapsed_s while parked; 1: not yet, but it fails again and the breaker's 5 s would pass it
    r = redrive_of(h, [parked(0, age_ms=120_000), parked(1, age_ms=58_000), parked(2)])
    r._release()
    assert await h.pipe.drain(5)

    def redriven(outcome: str) -> float:
        return h.metrics.registry.get_sample_value("processor_redriven_events_total",
                                                   {"vendor": "fake", "outcome": outcome}) or 0

    assert sorted((d[0], d[1]) for d in h.dead) == [(0, "exhausted"), (1, "exhausted")]
    assert redriven("expired") == 1 and redriven("dead_lettered") == 1 and h.count("dead_lettered") == 2
    assert [p[0] for p in h.parked] == [2] and redriven("parked") == 1  # failed again: parked again
    await h.pipe.close()


async def test_a_record_the_vendor_made_wait_is_never_expired_at_its_redrive():
    """Events parked by a 429 or a setup error carry ``relay.waiting_on``: waiting is what they needed, so
    their redrive delivers them however long ago they first failed; a record parked for a failure of its own
    past retry.max_elapsed_s is still ``expired`` (before, a throttle or a setup error lasting longer than the
    budget dead-lettered every parked event as exhausted here)."""
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), parking=True, budget=100,
                retry={"max_attempts": 1, "base_delay_ms": 1, "max_delay_ms": 1, "max_elapsed_s": 60})
    h.tracker.retry_topics = True
    r = redrive_of(h, [parked(0, age_ms=120_000, waiting_on="throttled"),
                       parked(1, age_ms=120_000, waiting_on="setup_error"), parked(2, age_ms=120_000)])
    r._release()
    assert await h.pipe.drain(5)
    assert [(d[0], d[1]) for d in h.dead] == [(2, "exhausted")]
    assert h.count("delivered") == 2
    await h.pipe.close()


def test_a_park_for_the_vendors_sake_says_so_in_its_record():
    """The settlement hands ``throttled`` and ``setup_error`` parks to the writer as ``waiting_on`` (the
    ``relay.waiting_on`` header), and no other park reason; the header survives the record's round trip."""
    from processor.deadletter import DeadLetterWriter

    h = Harness(lambda call, offsets: answer([]), parking=True, budget=100)
    events = h.events(3)
    h.tracker.register_many(events, [1] * 3)
    for ev, why in zip(events, ("throttled", "setup_error", "retry_budget"), strict=True):
        h.settlement.park(ev, "fake", why, "HTTP 429", 1, None, 0)
    assert h.waiting_on == [(0, "throttled"), (1, "setup_error"), (2, "")]

    written: list[list[tuple[str, bytes]]] = []
    w = DeadLetterWriter.__new__(DeadLetterWriter)
    w.retry_topic_prefix = "shop.events.retry"
    w._produce = lambda topic, source, headers, *rest: written.append(headers)
    w.park(events[0].source, "fake", "HTTP 429", 1, None, 0, lambda: None, waiting_on="throttled")
    w.park(events[2].source, "fake", "HTTP 500", 1, None, 0, lambda: None)
    back = [RelayRecord.from_source(Source(RETRY, 0, i, 1_000, b"k", b"v", hs)) for i, hs in enumerate(written)]
    assert [b.waiting_on for b in back] == ["throttled", ""]
