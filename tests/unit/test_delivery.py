"""The shared sender against a scripted fake vendor (httpx.MockTransport): per-event outcomes,
retries of only the failed events, Retry-After, exhaustion, transport errors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx
import orjson
import pytest

from processor.delivery import Sender, VendorPipeline, backoff_delay, parse_retry_after
from processor.devstack.samples import as_event, make_view
from processor.events import Event, EventKind
from processor.metrics import Metrics
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

    def plan(self, events: Sequence[Event]) -> Plan:
        body = orjson.dumps([e.source.offset for e in events])
        return Plan(requests=[VendorRequest(self.base_url, body, list(events))])

    def interpret(self, request: VendorRequest, response: Response) -> list[Outcome]:
        if response.status != 200:
            return [status_outcome(response.status)] * len(request.events)
        table = {"ok": DELIVERED, "retry": retryable("busy"), "reject": rejected("bad event")}
        return [table[v] for v in response.json()]


class Harness:
    def __init__(self, script, **settings):
        self.calls: list[list[int]] = []
        self.settled: list[int] = []
        self.dead: list[tuple[int, str, int | None, str, int]] = []
        self.sleeps: list[float] = []

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
        self.pipe = VendorPipeline(self.adapter, client, self.metrics, lambda e: self.settled.append(e.source.offset),
                                   self._dead)

        async def fake_sleep(d: float) -> None:
            self.sleeps.append(d)

        self.pipe.sleep = fake_sleep

    def _dead(self, ev, vendor, error_class, status, reason, attempts, first_ms):
        self.dead.append((ev.source.offset, error_class, status, reason, attempts))

    async def run(self, n: int) -> None:
        for i in range(n):
            self.pipe.submit(as_event(EventKind.PRODUCT_VIEW, make_view(i, i), i))
        self.pipe.flush()
        assert await self.pipe.drain(5)
        await self.pipe.close()

    def count(self, outcome: str) -> float:
        return self.metrics.registry.get_sample_value(
            "processor_vendor_events_total", {"vendor": "fake", "event_kind": "product_view", "outcome": outcome}) or 0


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
    assert h.pipe.inflight == 0


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
    assert h.sleeps == [7.0]
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
    assert [d[1] for d in h.dead] == ["rejected", "rejected"]


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
    h.pipe.client = Sender(Slow())
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

    def plan(self, events: Sequence[Event]) -> Plan:
        self.planned = getattr(self, "planned", 0) + len(events)
        return Plan(requests=[VendorRequest(self.base_url, orjson.dumps([e.source.offset]), [e]) for e in events])


async def test_planned_requests_are_bounded_and_every_event_still_settles_in_bulk():
    planned_ahead = 0

    class Slow(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request):
            nonlocal planned_ahead
            planned_ahead = max(planned_ahead, h.pipe.unsent)
            await asyncio.sleep(0.001)
            return answer(["ok"] * len(orjson.loads(request.content)))

    h = Harness(lambda c, o: answer([]), concurrency=2, batch={"max_events": 5})
    h.adapter = h.pipe.adapter = PerEventAdapter(h.adapter.settings)
    h.pipe.client = Sender(Slow())
    settled_in_bulk: list[list[int]] = []
    h.pipe.settle_many = lambda evs: settled_in_bulk.append([e.source.offset for e in evs])
    await h.run(60)
    assert planned_ahead <= 2 * 2 + 5  # 2 x concurrency, checked before a batch (5 requests) is planned
    assert sorted(o for batch in settled_in_bulk for o in batch) == list(range(60))
    assert h.pipe.unsent == 0 and h.pipe.inflight == 0
    assert h.count("delivered") == 60
    assert h.metrics.registry.get_sample_value("processor_delivery_latency_seconds_count", {"vendor": "fake"}) == 60
