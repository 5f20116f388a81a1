"""The shared sender against a scripted fake vendor (httpx.MockTransport): per-event outcomes,
retries of only the failed events, Retry-After, exhaustion, transport errors; and isolation: the
breaker, budgets, parking, throttling, revoked work and the relay's own failures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import httpx
import orjson
import pytest

from processor.delivery import VendorPipeline
from processor.devstack.samples import as_event, make_view
from processor.events import Event, EventKind
from processor.metrics import Metrics
from processor.offsets import OffsetTracker, RelaySettlement
from processor.retry import backoff_delay
from processor.service import parse_retry_after
from processor.transport import Sender
from processor.vendors.base import (
    DELIVERED,
    Adapter,
    Frozen,
    NoOptions,
    Outcome,
    Plan,
    Response,
    VendorRequest,
    rejected,
    retryable,
    status_outcome,
)


class FakeSite(Frozen):
    pass


class FakeAdapter(Adapter[FakeSite, NoOptions]):
    """Sends event offsets; the scripted vendor answers one verdict per event: ok, retry or reject."""

    name = "fake"
    kinds = frozenset(EventKind)
    Site = FakeSite
    default_base_url = "http://fake.test/events"

    def build(self, events: Sequence[Event]) -> Plan:
        body = orjson.dumps([e.source.offset for e in events])
        return Plan(requests=[VendorRequest(self.base_url, body, list(events))])

    def interpret(self, request: VendorRequest, response: Response) -> list[Outcome]:
        if response.status != 200:
            return [status_outcome(response.status)] * len(request.events)
        table = {"ok": DELIVERED, "retry": retryable("busy"), "reject": rejected("bad event")}
        return [table[v] for v in response.json()]


class Recording(RelaySettlement):
    """The relay's settlement, recording what it accepted: ``settled``, ``dead`` and ``parked`` (by offset)."""

    def __init__(self, h: Harness) -> None:
        super().__init__(h.tracker, h, h.metrics)
        self.h = h

    def settle_many(self, events, vendor, outcome="delivered"):
        n = super().settle_many(events, vendor, outcome)
        offsets = [e.offset for e in events][:n]
        self.h.settled += offsets
        self.h.settled_batches.append(offsets)
        return n

    def park(self, ev, vendor, why, reason, attempts, first_ms, next_attempt_ms):
        self.h.why = why
        return super().park(ev, vendor, why, reason, attempts, first_ms, next_attempt_ms)


class Harness:
    """A pipeline reporting to the relay's own settlement, whose writes are recorded (and acknowledged at
    once): ``settled``, ``dead`` and ``parked`` (by offset)."""

    def __init__(self, script, parking: bool = False, budget: int = 10_000, **settings):
        self.calls: list[list[int]] = []
        self.settled: list[int] = []
        self.settled_batches: list[list[int]] = []
        self.dead: list[tuple[int, str, int | None, str, int]] = []
        self.parked: list[tuple[int, str, str, int, int]] = []
        self.waiting_on: list[tuple[int, str]] = []  # (offset, relay.waiting_on) of each parked record
        self.sleeps: list[float] = []
        self.tracker = OffsetTracker()
        self.why = ""

        def handler(request: httpx.Request) -> httpx.Response:
            offsets = orjson.loads(request.content)
            self.calls.append(offsets)
            return script(len(self.calls), offsets)

        cfg = {"sites": {"default": {}}, "options": {},
               "retry": {"max_attempts": 4, "base_delay_ms": 10, "max_delay_ms": 100, "max_elapsed_s": 60},
               **settings}
        self.adapter = FakeAdapter(FakeAdapter.settings_model().model_validate(cfg))
        self.metrics = Metrics()
        client = Sender(httpx.MockTransport(handler))
        self.settlement = Recording(self)
        self.pipe = VendorPipeline(self.adapter, client, self.metrics, self.settlement, budget, parking)

        self.slept = 0.0

        async def fake_sleep(d: float) -> None:
            self.sleeps.append(d)
            self.slept += d

        self.pipe.sleep = fake_sleep
        self.pipe.clock = lambda: 1000.0 + self.slept

    # the writer the settlement has the dead-letter and parking writes made by
    def write(self, source, vendor, error_class, status, reason, attempts, first_ms, on_ack):
        self.dead.append((source.offset, error_class, status, reason, attempts))
        on_ack()

    def park(self, source, vendor, reason, attempts, first_ms, next_attempt_ms, on_ack, waiting_on=""):
        self.parked.append((source.offset, self.why, reason, attempts, next_attempt_ms))
        self.waiting_on.append((source.offset, waiting_on))
        on_ack()

    def events(self, n: int, start: int = 0, partition: int = 0) -> list[Event]:
        if ("shop.events", partition) not in self.tracker.tracks:
            self.tracker.assign("shop.events", partition)
        evs = [as_event(EventKind.PRODUCT_VIEW, make_view(i, i), i, partition=partition)
               for i in range(start, start + n)]
        self.tracker.register_many(evs, [1] * n)
        return evs

    async def run(self, n: int, close: bool = True) -> None:
        self.pipe.submit_many(self.events(n))
        self.pipe.flush()
        assert await self.pipe.drain(5)
        if close:
            await self.pipe.close()

    def count(self, outcome: str) -> float:
        return self.metrics.registry.get_sample_value(
            "processor_vendor_events_total", {"vendor": "fake", "event_kind": "product_view", "outcome": outcome}) or 0

    def gauge(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"vendor": "fake"})


def answer(verdicts, status=200, headers=None):
    return httpx.Response(status, content=orjson.dumps(verdicts), headers=headers)


async def test_only_failed_events_are_retried_and_rejects_dead_lettered_at_once():
    def script(call, offsets):
        if call == 1:
            return answer(["ok", "retry", "reject", "retry"])
        return answer(["ok"] * len(offsets))

    h = Harness(script)
    await h.run(4)
    assert h.calls == [[0, 1, 2, 3], [1, 3]]
    assert sorted(h.settled) == [0, 1, 3]
    assert h.dead == [(2, "rejected", 200, "bad event", 1)]
    assert h.count("delivered") == 3 and h.count("dead_lettered") == 1
    assert h.metrics.registry.get_sample_value("processor_vendor_retries_total", {"vendor": "fake"}) == 2
    assert h.pipe.admission.unsettled == 0


async def test_retries_are_bounded_by_attempts_then_exhausted():
    h = Harness(lambda call, offsets: answer([], status=503))
    await h.run(2)
    assert len(h.calls) == 4
    assert [(d[0], d[1], d[2], d[4]) for d in h.dead] == [(0, "exhausted", 503, 4), (1, "exhausted", 503, 4)]
    assert "HTTP 503" in h.dead[0][3] and "after 4 attempts" in h.dead[0][3]
    assert len(h.sleeps) == 3 and all(0 <= s <= 0.1 for s in h.sleeps)


async def test_retries_are_bounded_by_elapsed_time():
    h = Harness(lambda call, offsets: answer([], status=500, headers={"Retry-After": "120"}),
                retry={"max_attempts": 50, "base_delay_ms": 10, "max_delay_ms": 100, "max_elapsed_s": 30})
    await h.run(1)
    assert len(h.calls) == 1  # waiting 120 s would pass the 30 s budget: give up now
    assert h.dead[0][1] == "exhausted"


async def test_retry_after_is_honoured():
    def script(call, offsets):
        if call == 1:
            return answer([], status=429, headers={"Retry-After": "7"})
        return answer(["ok"] * len(offsets))

    h = Harness(script)
    await h.run(3)
    assert h.sleeps[0] == 7.0 and max(h.sleeps) <= 7.0  # the retry waits, and so does the vendor's gate
    assert sorted(h.settled) == [0, 1, 2]


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])
async def test_transport_errors_are_retryable(exc):
    def script(call, offsets):
        if call == 1:
            raise exc
        return answer(["ok"] * len(offsets))

    h = Harness(script)
    await h.run(2)
    assert sorted(h.settled) == [0, 1] and not h.dead
    assert h.metrics.registry.get_sample_value(
        "processor_vendor_requests_total", {"vendor": "fake", "status_class": "error"}) == 1


async def test_an_adapter_bug_dead_letters_instead_of_crashing():
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)))

    def broken(events):
        raise ValueError("boom")

    h.adapter.plan = broken  # type: ignore[method-assign]
    await h.run(2)
    assert [d[1] for d in h.dead] == ["internal", "internal"]
    assert "ValueError" in h.dead[0][3]


async def test_an_adapter_that_fails_on_an_answer_dead_letters_those_events_as_internal():
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)))

    def broken(request, response):
        raise KeyError("results")

    h.adapter.interpret = broken  # type: ignore[method-assign]
    await h.run(3)
    assert sorted(d[0] for d in h.dead) == [0, 1, 2] and {d[1] for d in h.dead} == {"internal"}
    assert h.pipe.admission.unsettled == 0


async def test_a_bug_inside_the_relay_still_settles_every_event_once():
    h = Harness(lambda call, offsets: answer(["ok", "retry"] * (len(offsets) // 2)))
    calls = 0
    real = h.pipe._after_failure

    async def broken(*args, **kwargs):
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    h.pipe._after_failure = broken  # type: ignore[method-assign]
    await h.run(4)
    assert calls == 1 and real is not None
    assert sorted(h.settled) == [0, 2]  # delivered before the bug
    assert sorted(d[0] for d in h.dead) == [1, 3] and {d[1] for d in h.dead} == {"internal"}
    assert "RuntimeError" in h.dead[0][3]
    assert h.pipe.admission.unsettled == 0


async def test_concurrency_is_bounded():
    active = 0
    peak = 0

    class Slow(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request):
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1
            return answer(["ok"] * len(orjson.loads(request.content)))

    h = Harness(lambda c, o: answer([]), concurrency=2, batch={"max_events": 1})
    h.pipe.service.client = Sender(Slow())
    await h.run(10)
    assert peak == 2 and len(h.settled) == 10


def test_backoff_has_full_jitter_and_a_cap():
    import random

    rng = random.Random(1)
    delays = [backoff_delay(a, 0.1, 1.0, rng) for a in range(1, 30)]
    assert all(0 <= d <= 1.0 for d in delays)
    assert len(set(delays)) == len(delays)


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


class PerEventAdapter(FakeAdapter):
    """One request per event, like Convead: the case where planning ahead would build every body."""

    def build(self, events: Sequence[Event]) -> Plan:
        self.planned = getattr(self, "planned", 0) + len(events)
        return Plan(requests=[VendorRequest(self.base_url, orjson.dumps([e.source.offset]), [e]) for e in events])


def per_event_harness(concurrency: int, max_events: int, seen: Callable[[httpx.Request], None]) -> Harness:
    """One request per event, each answered ok after 1 ms; ``seen`` is called with each request as it arrives."""

    class Slow(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request):
            seen(request)
            await asyncio.sleep(0.001)
            return answer(["ok"] * len(orjson.loads(request.content)))

    h = Harness(lambda c, o: answer([]), concurrency=concurrency, batch={"max_events": max_events})
    h.adapter = h.pipe.adapter = h.pipe.service.adapter = PerEventAdapter(h.adapter.settings)
    h.pipe.service.client = Sender(Slow())
    return h


async def test_planned_requests_are_bounded_and_every_event_still_settles_in_bulk():
    planned_ahead = 0

    def seen(request: httpx.Request) -> None:
        nonlocal planned_ahead
        planned_ahead = max(planned_ahead, h.pipe.unsent)

    h = per_event_harness(2, 5, seen)
    await h.run(60)
    settled_in_bulk = h.settled_batches
    assert planned_ahead <= 2 * 2 + 5  # 2 x concurrency, checked before a batch (5 requests) is planned
    assert sorted(o for batch in settled_in_bulk for o in batch) == list(range(60))
    assert h.pipe.unsent == 0 and h.pipe.admission.unsettled == 0
    assert h.count("delivered") == 60
    assert h.metrics.registry.get_sample_value("processor_delivery_latency_seconds_count", {"vendor": "fake"}) == 60


async def test_a_batch_of_many_requests_is_sent_in_order_on_at_most_concurrency_tasks():
    """A batch's requests are sent concurrently, in the order planned, but on no more tasks than the vendor's
    concurrency lets requests through at once (not one task a request)."""
    sent: list[int] = []
    peak_tasks = 0

    def seen(request: httpx.Request) -> None:
        nonlocal peak_tasks
        peak_tasks = max(peak_tasks, len(asyncio.all_tasks()))
        sent.extend(orjson.loads(request.content))

    h = per_event_harness(3, 40, seen)
    await h.run(40)
    assert sent == list(range(40)) and sorted(h.settled) == list(range(40))
    assert peak_tasks <= 1 + 1 + 3  # the test, the batch's delivery, its three senders
    assert h.pipe.unsent == 0 and h.pipe.admission.unsettled == 0


async def test_requests_queued_behind_the_limit_meet_the_breaker_when_their_turn_comes():
    """A batch's requests ask the breaker when a sender takes them, not all when the batch starts: once the
    breaker opens mid-batch, the rest are parked as circuit-open instead of going out behind the limit
    (before the workers, all five reached the failing vendor)."""

    class Failing(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request):
            h.calls.append(orjson.loads(request.content))
            await asyncio.sleep(0.001)  # a real request suspends: the batch's other requests queue meanwhile
            return httpx.Response(503)

    h = Harness(lambda call, offsets: answer([]), parking=True, concurrency=1, batch={"max_events": 5},
                breaker={"consecutive_failures": 2}, retry={"max_attempts": 1})
    h.adapter = h.pipe.adapter = h.pipe.service.adapter = PerEventAdapter(h.adapter.settings)
    h.pipe.service.client = Sender(Failing())
    await h.run(5)
    assert h.calls == [[0], [1]]
    assert sorted((p[0], p[2]) for p in h.parked) == [
        (0, "HTTP 503 (after 1 attempts)"), (1, "HTTP 503 (after 1 attempts)"),
        *((i, "circuit open (after 0 attempts)") for i in (2, 3, 4))]
    assert h.pipe.admission.unsettled == 0 and h.pipe.unsent == 0


async def until(condition: Callable[[], bool], bound: int = 10_000) -> None:
    """Let the loop run until ``condition`` holds (at most ``bound`` turns)."""
    for _ in range(bound):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def test_batches_waiting_for_room_take_turns_and_a_cancelled_one_passes_its_turn_on():
    """Batches waiting for room to plan are woken one at a time, in order. One cancelled while it waits
    leaves the line; one cancelled just after it was woken hands its turn to the next, which plans at once
    (else it would wait for an answer that never comes here)."""
    first, last = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    class Held(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request):
            offsets = orjson.loads(request.content)
            h.calls.append(offsets)
            if offsets == [1]:  # batch A's second request: A's first answer has just woken batch B
                tasks[1].cancel()
                await last.wait()
            await first.wait()
            return answer(["ok"])

    h = Harness(lambda c, o: answer([]), concurrency=1, batch={"max_events": 2})  # 2 requests planned at most
    h.adapter = h.pipe.adapter = h.pipe.service.adapter = PerEventAdapter(h.adapter.settings)
    h.pipe.service.client = Sender(Held())
    for start in (0, 2, 4, 6):  # batches A, B, C, D of two one-event requests each
        before = set(h.pipe.tasks)
        h.pipe.submit_many(h.events(2, start=start))
        tasks += list(h.pipe.tasks - before)
    await until(lambda: len(h.pipe._waiting) == 3)  # A planned; B, C, D wait in that order
    tasks[2].cancel()  # C, while it waits
    await until(lambda: len(h.pipe._waiting) == 2)
    first.set()
    await until(lambda: h.pipe.unsent == 3)  # D planned while A's second request is still unanswered
    assert h.calls == [[0], [1]]
    last.set()
    assert await h.pipe.drain(5)
    assert h.calls == [[0], [1], [6], [7]] and sorted(h.settled) == [0, 1, 6, 7]
    assert h.pipe.unsent == 0 and not h.pipe._waiting
    await h.pipe.close()


async def test_a_cancelled_batch_leaves_no_request_counted_as_unsent():
    """Cancelled mid-batch (a revocation's drain timed out, shutdown): the requests in flight and those no
    sender took yet all leave the planned-unsent count."""
    started = asyncio.Event()

    class Hung(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request):
            started.set()
            await asyncio.Event().wait()  # never answers: only the cancel ends it

    h = Harness(lambda c, o: answer([]), concurrency=2, batch={"max_events": 10})
    h.adapter = h.pipe.adapter = h.pipe.service.adapter = PerEventAdapter(h.adapter.settings)
    h.pipe.service.client = Sender(Hung())
    h.pipe.submit_many(h.events(10))
    h.pipe.flush()
    await asyncio.wait_for(started.wait(), 5)
    assert h.pipe.unsent == 10
    await h.pipe.cancel()
    assert h.pipe.unsent == 0 and h.pipe.admission.limit.in_use == 0
    await h.pipe.close()


# -- isolation: park, don't block --------------------------------------------------------------------


async def test_park_mode_parks_what_still_fails_after_its_fast_retries():
    h = Harness(lambda call, offsets: answer([], status=503), parking=True,
                breaker={"consecutive_failures": 100})
    await h.run(3)
    assert len(h.calls) == 4 and not h.dead  # max_attempts fast tries, then parked, not dead-lettered
    assert sorted(p[0] for p in h.parked) == [0, 1, 2]
    assert {p[1] for p in h.parked} == {"retry_budget"} and {p[3] for p in h.parked} == {4}
    assert "HTTP 503" in h.parked[0][2]
    assert h.count("parked") == 3 and h.pipe.admission.unsettled == 0
    assert h.metrics.registry.get_sample_value("processor_parked_total",
                                               {"vendor": "fake", "reason": "retry_budget"}) == 3


async def test_an_open_breaker_parks_at_intake_and_the_state_is_exported():
    h = Harness(lambda call, offsets: answer([], status=500), parking=True, batch={"max_events": 1},
                breaker={"consecutive_failures": 2, "cooldown_s": 30})
    await h.run(2, close=False)  # two failed requests in a row: open
    assert h.gauge("processor_vendor_breaker_state") == 2
    calls = len(h.calls)
    h.pipe.submit_many(h.events(5, start=10))
    assert len(h.calls) == calls  # nothing sent
    # the two failing events met the open breaker on their retry; the new ones at intake
    assert sorted(p[0] for p in h.parked) == [0, 1, 10, 11, 12, 13, 14]
    assert {p[1] for p in h.parked} == {"breaker_open"}
    assert h.pipe.admission.unsettled == 0
    assert h.metrics.registry.get_sample_value("processor_vendor_breaker_transitions_total",
                                               {"vendor": "fake", "state": "open"}) == 1
    await h.pipe.close()


async def test_beyond_its_budget_an_impaired_vendor_parks_and_a_healthy_one_holds_the_source():
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), parking=True, budget=3,
                batch={"max_events": 100})
    h.pipe.submit_many(h.events(5))  # healthy and merely busy (a backlog): waiting costs nothing
    assert not h.parked and h.pipe.admission.unsettled == 5 and h.pipe.admission.holds_source
    h.pipe.flush()
    assert await h.pipe.drain(5)
    assert sorted(h.settled) == [0, 1, 2, 3, 4] and not h.pipe.admission.holds_source

    h.pipe.admission.gate.hold(60)  # throttled (a 429's Retry-After): impaired
    h.pipe.submit_many(h.events(5, start=10))
    assert [p[0] for p in h.parked] == [13, 14] and {p[1] for p in h.parked} == {"budget_full"}
    # a parking vendor never holds the source while impaired
    assert h.pipe.admission.unsettled == 3 and not h.pipe.admission.holds_source
    await h.pipe.cancel()
    await h.pipe.close()


def test_a_full_vendor_holds_the_source_until_half_its_budget_is_left():
    h = Harness(lambda call, offsets: answer([]), parking=True, budget=10)
    a = h.pipe.admission
    a.admit(10)
    assert a.holds_source
    a.release(4)
    assert a.holds_source  # hysteresis: no pause/resume flapping at the limit
    a.release(1)
    assert not a.holds_source
    a.admit(4)
    assert not a.holds_source


async def test_a_blocking_vendor_at_its_budget_asks_the_source_to_wait():
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), parking=False, budget=3,
                batch={"max_events": 100})
    h.pipe.submit_many(h.events(5))
    assert not h.parked and h.pipe.admission.holds_source
    h.pipe.flush()
    assert await h.pipe.drain(5)
    assert sorted(h.settled) == [0, 1, 2, 3, 4] and not h.pipe.admission.holds_source
    await h.pipe.close()


async def test_429s_slow_the_vendor_and_never_count_as_attempts():
    def script(call, offsets):
        if call <= 6:
            return answer([], status=429, headers={"Retry-After": "2"})
        return answer(["ok"] * len(offsets))

    h = Harness(script, retry={"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 100,
                               "max_elapsed_s": 600, "park_after_s": 600}, parking=True)
    await h.run(2)
    assert len(h.calls) == 7 and sorted(h.settled) == [0, 1] and not h.dead and not h.parked
    assert h.gauge("processor_vendor_concurrency_limit") < 8  # back-pressure cut the limit
    assert h.gauge("processor_vendor_breaker_state") == 0  # throttling is not a failure


async def test_429s_past_the_park_budget_park_and_are_never_dead_lettered():
    h = Harness(lambda call, offsets: answer([], status=429, headers={"Retry-After": "5"}), parking=True,
                retry={"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 100, "park_after_s": 12})
    await h.run(2)
    assert not h.dead and sorted(p[0] for p in h.parked) == [0, 1]


async def test_parked_records_past_the_elapsed_budget_are_dead_lettered_as_exhausted():
    import time

    h = Harness(lambda call, offsets: answer([], status=503), parking=True,
                retry={"max_attempts": 1, "base_delay_ms": 10, "max_delay_ms": 100, "max_elapsed_s": 60})
    ev = h.events(1)[0]
    old = str(int(time.time() * 1000) - 120_000).encode()  # a parked record that first failed 2 min ago
    ev.headers = [("relay.first_failure_ms", old), ("relay.original_topic", b"shop.events"),
                  ("relay.original_offset", b"0")]
    h.pipe.submit_many([ev])
    h.pipe.flush()
    assert await h.pipe.drain(5)
    assert not h.parked and [(d[0], d[1]) for d in h.dead] == [(0, "exhausted")]
    assert "max_elapsed_s" in h.dead[0][3]


async def test_work_of_a_revoked_partition_is_dropped_not_dead_lettered():
    h = Harness(lambda call, offsets: answer([], status=503))
    evs = h.events(2, partition=0) + h.events(2, start=2, partition=1)

    async def revoke_during_backoff(d: float) -> None:
        h.tracker.revoke("shop.events", 0)

    h.pipe.sleep = revoke_during_backoff
    h.pipe.submit_many(evs)
    h.pipe.flush()
    assert await h.pipe.drain(5)
    assert sorted(d[0] for d in h.dead) == [2, 3]  # partition 1's, exhausted; partition 0's dropped
    assert h.calls[1] == [2, 3]
    assert h.pipe.admission.unsettled == 0
