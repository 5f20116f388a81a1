"""Delivery: the one place that does vendor HTTP, retries and per-event outcomes.

Per vendor: one long-lived sender (``processor.transport``: explicit pool
limits and timeouts), a batcher, a budget of unsettled events, a circuit
breaker, an adaptive concurrency limit and a rate gate (``processor.isolation``).
A closed batch is planned by the adapter, sent, and every event's outcome
reported to the ``Settlement`` (``processor.offsets``):

* delivered -> settled (latency observed from the Kafka timestamp);
* rejected  -> dead-lettered at once for this vendor;
* retryable -> only those events are planned again after exponential
  backoff with full jitter (at least Retry-After). With ``on_outage: park``
  (the default) what still fails after ``retry.park_after_s`` or
  ``retry.max_attempts``, or meets an open breaker, is parked on the vendor's
  retry topic; with ``block`` it is retried in place. Either way, past
  ``retry.max_elapsed_s`` from its first failure it is dead-lettered as
  exhausted. A 429 counts against the elapsed time, never the attempts.
* the relay's own failure on a batch (an adapter bug, an error of ours) ->
  dead-lettered as ``internal``, naming the exception type: every event that
  enters a pipeline leaves it settled.

Intake parks at once (park mode) what the vendor cannot take now: while its
breaker is open, or beyond its budget. Work for a revoked partition is
dropped, not finished: the partition's new owner redelivers it.

Transport failures (connect errors, timeouts, broken connections) are
translated to retryable outcomes here, at this one boundary.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from email.utils import parsedate_to_datetime
from operator import attrgetter
from typing import Any

import httpx

from processor.deadletter import first_failure_ms
from processor.events import Event
from processor.isolation import AdaptiveLimit, BreakerState, CircuitBreaker, RateGate
from processor.logs import where_failed
from processor.metrics import Metrics, status_class
from processor.offsets import Settlement, is_revoked
from processor.transport import HttpSender
from processor.vendors.base import DELIVERED, Adapter, Outcome, Response, VendorRequest, Verdict, retryable

logger = logging.getLogger(__name__)

_kind = attrgetter("kind")
_timestamp = attrgetter("timestamp_ms")
CIRCUIT_OPEN = "circuit open"
PARK_REASONS = ("breaker_open", "budget_full", "retry_budget")
REDRIVE_OUTCOMES = ("delivered", "filtered", "dead_lettered", "parked", "expired")


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random = random._inst) -> float:  # type: ignore[attr-defined]
    """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
    return rng.uniform(0, min(max_s, base_s * (2 ** (attempt - 1))))


class _Answer:
    """What one request came back with: the response (None: no answer), one outcome per event (None:
    the adapter failed on the answer: ``internal``), and whether it was throttling."""

    __slots__ = ("outcomes", "response", "throttled")

    def __init__(self, response: Response | None, outcomes: list[Outcome] | None, throttled: bool = False) -> None:
        self.response = response
        self.outcomes = outcomes
        self.throttled = throttled


class VendorPipeline:
    """Batches, sends, retries, parks and settles one vendor's events."""

    def __init__(self, adapter: Adapter[Any, Any], client: HttpSender, metrics: Metrics, settlement: Settlement,
                 budget: int, parking: bool) -> None:
        from processor.batching import Batcher

        self.adapter = adapter
        self.name = name = adapter.name
        s = adapter.settings
        self.batcher = Batcher(s.batch)
        self.client = client
        self.settlement = settlement
        self.budget = budget
        self.parking = parking and s.on_outage == "park"
        m = metrics
        self.breaker = CircuitBreaker(s.breaker, self._breaker_changed)
        self.limit = AdaptiveLimit(s.concurrency, m.concurrency_limit.labels(name).set)
        self.gate = RateGate()
        m.breaker_state.labels(name).set(0)
        m.concurrency_limit.labels(name).set(s.concurrency)
        if self.parking:  # the series exist from the start, so the first parking is a visible increase
            for why in PARK_REASONS:
                m.parked.labels(name, why)
            for outcome in REDRIVE_OUTCOMES:
                m.redriven.labels(name, outcome)
        # Requests planned but not yet answered, bounded: a planned request holds its body, so without
        # this a vendor that takes one event a request built nearly every in-flight event's body up
        # front (bench/README.md, memory). A batch waits for room before it is planned (and before
        # each retry), never while it holds requests, so nothing can wait on itself.
        self.unsent = 0
        self.max_unsent = 2 * s.concurrency
        self._room = asyncio.Event()
        self.retry = s.retry
        self.total_timeout = s.timeout.total_s
        self.metrics = metrics
        self.tasks: set[asyncio.Task[None]] = set()
        self.sleep = asyncio.sleep  # replaceable in tests, with the clock
        self.clock = time.monotonic
        self.inflight = 0
        self._full = False
        self._inflight_gauge = m.inflight.labels(name)
        self._duration = m.request_duration.labels(name)
        self._latency = m.delivery_latency.labels(name)
        self._batch_size = m.batch_events.labels(name)
        self._retries = m.retries.labels(name)

    def _breaker_changed(self, state: BreakerState) -> None:
        self.metrics.breaker_state.labels(self.name).set(int(state))
        self.metrics.breaker_transitions.labels(self.name, state.name.lower()).inc()
        logger.warning("%s: circuit breaker %s", self.name, state.name.lower().replace("_", "-"))

    @property
    def impaired(self) -> bool:
        """Down, throttled or slowed: its breaker is not closed, its rate gate holds, or back-pressure
        cut its concurrency limit. Only an impaired vendor parks what overflows its budget."""
        return (self.breaker.state is not BreakerState.CLOSED or self.gate.wait_s() > 0
                or self.limit.current < self.limit.maximum)

    @property
    def full(self) -> bool:
        """The source must wait for it: at its budget while it may not park (``on_outage: block``), or while
        it is healthy and merely busy (a backlog being caught up: waiting costs nothing, parking would write
        and read back every event). Once full, until it is down to half its budget."""
        if self._full:
            self._full = self.inflight > self.budget // 2 and not (self.parking and self.impaired)
        else:
            self._full = self.inflight >= self.budget and not (self.parking and self.impaired)
        return self._full

    @property
    def blocked(self) -> bool:
        """It takes nothing for a while: its breaker is open or its rate gate holds."""
        return self.gate.wait_s() > 0 or self.breaker.is_open()

    def has_room(self, n: int, share: float = 1.0) -> bool:
        """Can it take ``n`` more events now, within ``share`` of its budget, without parking them (redrive
        asks before it submits)? Not while its breaker is open or its rate gate holds; while half-open, one
        batch when nothing else is in flight (its probes: more would only be parked again)."""
        if self.blocked:
            return False
        state = self.breaker.state
        if state is BreakerState.CLOSED:
            return self.inflight + n <= self.budget * share
        return state is BreakerState.HALF_OPEN and self.inflight == 0 and n <= self.batcher.max_events

    # -- intake ------------------------------------------------------------
    def submit_many(self, events: list[Event]) -> None:
        """Batch these events, in order; in park mode park at once what the vendor cannot take now."""
        if self.parking and events:
            if self.breaker.is_open():
                self._park_now(events, "breaker_open", CIRCUIT_OPEN, self.breaker.reopens_in())
                return
            room = self.budget - self.inflight
            if room < len(events) and self.impaired:  # a healthy vendor at its budget holds the source instead
                self._park_now(events[max(0, room):], "budget_full", "vendor at its in-flight budget", 1.0)
                events = events[:max(0, room)]
        self.inflight += len(events)
        for batch in self.batcher.add_many(events):
            self._dispatch(batch)

    def submit_redriven(self, events: list[Event]) -> None:
        """Parked events taken back from the retry topic (already a batch): sent as they are, their
        outcomes also counted as redriven."""
        self.inflight += len(events)
        self._dispatch(events, redriven=True)

    def _park_now(self, events: list[Event], why: str, reason: str, delay_s: float) -> None:
        counts: Counter[tuple[str, str]] = Counter()
        self.inflight += len(events)
        self._park(events, why, reason, 0, None, delay_s, counts)
        self._count(counts)

    def tick(self, now: float) -> None:
        batch = self.batcher.due(now)
        if batch is not None:
            self._dispatch(batch)

    def flush(self) -> None:
        batch = self.batcher.flush()
        if batch is not None:
            self._dispatch(batch)

    def _dispatch(self, events: list[Event], redriven: bool = False) -> None:
        self._batch_size.observe(len(events))
        self._inflight_gauge.set(self.inflight)
        task = asyncio.create_task(self._deliver(events, redriven), name=f"deliver-{self.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- delivery ----------------------------------------------------------
    async def _deliver(self, events: list[Event], redriven: bool = False) -> None:
        started = self.clock()
        first_ms: int | None = None
        attempt = 0  # attempts that count: not those only throttled or stopped by the open breaker
        pending = events
        settled: list[Event] = []  # this round's settled events, for the last-resort path below
        counts: Counter[tuple[str, str]] = Counter()
        last: dict[int, tuple[Outcome, int | None]] = {}  # per event, its last failure with the vendor's answer
        try:
            while pending:
                pending = self._drop_revoked(pending)
                if not pending:
                    return
                settled = []
                await self._room_to_plan()
                try:
                    plan = self.adapter.plan(pending)
                except Exception as exc:  # an adapter bug must not lose events or kill the relay
                    logger.error("%s adapter failed to plan a batch of %d: %s", self.name, len(pending),
                                 where_failed(exc))
                    self._internal(pending, exc, counts)
                    return
                for ev in plan.filtered:
                    self._settled(ev, "filtered", counts, settled)
                for ev, reason in plan.rejected:
                    self._dead(ev, "rejected", None, reason, attempt + 1, first_ms, counts, settled)
                self.unsent += len(plan.requests)
                answers = await asyncio.gather(*(self._send(r) for r in plan.requests))
                retry: list[tuple[Event, Outcome, int | None]] = []
                wait_at_least = 0.0
                counted = False
                now_s = time.time()
                for req, answer in zip(plan.requests, answers, strict=True):
                    outcomes, resp = answer.outcomes, answer.response
                    if outcomes is None:
                        self._internal(req.events, None, counts, settled)
                        continue
                    if outcomes.count(DELIVERED) == len(req.events):  # the common case, settled in bulk
                        self._delivered(req.events, now_s, counts)
                        settled += req.events
                        continue
                    status = resp.status if resp is not None else None
                    for ev, out in zip(req.events, outcomes, strict=True):
                        if out.note:
                            self.metrics.notes.labels(self.name, out.note).inc()
                        if out.verdict is Verdict.DELIVERED:
                            ts = ev.timestamp_ms
                            if ts:
                                self._latency.observe(max(0.0, now_s - ts / 1000))
                            self._settled(ev, "delivered", counts, settled)
                        elif out.verdict is Verdict.REJECTED:
                            self._dead(ev, "rejected", status, out.reason, attempt + 1, first_ms, counts, settled)
                        else:
                            if out.reason == CIRCUIT_OPEN and id(ev) in last:  # say what the vendor said last
                                retry.append((ev, *last[id(ev)]))
                            else:
                                retry.append((ev, out, status))
                            if out.retry_after_s:
                                wait_at_least = max(wait_at_least, out.retry_after_s)
                    if not answer.throttled and outcomes[0].reason != CIRCUIT_OPEN:
                        counted = True
                if not retry:
                    return
                last = {id(ev): (out, st) for ev, out, st in retry}
                attempt += counted
                if first_ms is None:
                    first_ms = int(now_s * 1000)
                pending = await self._after_failure(retry, attempt, first_ms, started, wait_at_least, counts)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # last resort: our own bug in this task; its events still settle
            logger.error("%s: delivery of %d events failed inside the relay: %s", self.name, len(pending),
                         where_failed(exc))
            done = set(map(id, settled))
            self._internal([ev for ev in pending if id(ev) not in done], exc, counts)
        finally:
            self._count(counts, redriven)

    async def _after_failure(self, retry: list[tuple[Event, Outcome, int | None]], attempt: int, first_ms: int,
                             started: float, wait_at_least: float,
                             counts: Counter[tuple[str, str]]) -> list[Event]:
        """Retry in place after a backoff (the events to send again), park, or dead-letter as exhausted."""
        r = self.retry
        delay = max(wait_at_least, self.gate.wait_s(), self.breaker.reopens_in(),
                    backoff_delay(max(1, attempt), r.base_delay_ms / 1000, r.max_delay_ms / 1000))
        out = retry[0][1]
        events = self._drop_revoked([ev for ev, _, _ in retry])
        if self.parking and (self.breaker.is_open() or attempt >= r.max_attempts
                             or self.clock() - started + delay > r.park_after_s):
            why = "breaker_open" if self.breaker.is_open() else "retry_budget"
            self._park(events, why, f"{out.reason} (after {attempt} attempts)", attempt, first_ms, delay, counts,
                       status=retry[0][2])
            return []
        if not self.parking and (attempt >= r.max_attempts or time.time() + delay - first_ms / 1000
                                 > r.max_elapsed_s):
            by_event = {id(ev): (o, st) for ev, o, st in retry}
            for ev in events:
                o, st = by_event[id(ev)]
                self._dead(ev, "exhausted", st, f"{o.reason} (after {attempt} attempts)", attempt, first_ms, counts)
            return []
        self._retries.inc(len(events))
        logger.debug("%s: %d events retry in %.2fs (attempt %d): %s", self.name, len(events), delay, attempt,
                     out.reason)
        await self.sleep(delay)
        return events

    def _drop_revoked(self, events: list[Event]) -> list[Event]:
        if not any(map(is_revoked, events)):
            return events
        keep = [ev for ev in events if not is_revoked(ev)]
        self.inflight -= len(events) - len(keep)
        logger.info("%s: dropped %d events of revoked partitions (their new owner redelivers them)",
                    self.name, len(events) - len(keep))
        return keep

    def _park(self, events: list[Event], why: str, reason: str, attempts: int, first_ms: int | None,
              delay_s: float, counts: Counter[tuple[str, str]], status: int | None = None) -> None:
        """Onto the vendor's retry topic, due after ``delay_s``; what waited past ``retry.max_elapsed_s``
        since its first failure is dead-lettered as exhausted instead."""
        now_s = time.time()
        next_ms = int((now_s + delay_s) * 1000)
        limit_ms = (now_s - self.retry.max_elapsed_s) * 1000
        parked = 0
        for ev in events:
            first = first_failure_ms(ev) or first_ms
            if first is not None and first < limit_ms:
                self._dead(ev, "exhausted", status, f"{reason}; waited past retry.max_elapsed_s", attempts,
                           first_ms, counts)
                continue
            counts[(ev.kind.value, "parked")] += 1
            self.inflight -= 1
            self.settlement.park(ev, self.name, why, reason, attempts, first_ms, next_ms)
            parked += 1
        if parked:
            self.metrics.parked.labels(self.name, why).inc(parked)

    def _internal(self, events: list[Event], exc: BaseException | None, counts: Counter[tuple[str, str]],
                  settled: list[Event] | None = None) -> None:
        what = type(exc).__name__ if exc is not None else "the adapter failed on the answer"
        for ev in events:
            self._dead(ev, "internal", None, f"internal error in the relay ({what}; see logs)", 0, None, counts,
                       settled)

    def _delivered(self, events: list[Event], now_s: float, counts: Counter[tuple[str, str]]) -> None:
        """Every event of one request delivered: latency, counts and settlement per request, not per event."""
        self._latency.observe_since(now_s, map(_timestamp, events))
        for kind, n in Counter(map(_kind, events)).items():
            counts[(kind.value, "delivered")] += n
        self.inflight -= len(events)
        self.settlement.settle_many(events)

    def _settled(self, ev: Event, outcome: str, counts: Counter[tuple[str, str]], settled: list[Event]) -> None:
        counts[(ev.kind.value, outcome)] += 1
        self.inflight -= 1
        self.settlement.settle_many((ev,))
        settled.append(ev)

    def _dead(self, ev: Event, error_class: str, status: int | None, reason: str, attempts: int,
              first_ms: int | None, counts: Counter[tuple[str, str]], settled: list[Event] | None = None) -> None:
        counts[(ev.kind.value, "dead_lettered")] += 1
        self.inflight -= 1
        self.settlement.dead_letter(ev, self.name, error_class, status, reason, attempts, first_ms)
        if settled is not None:
            settled.append(ev)

    def _count(self, counts: Counter[tuple[str, str]], redriven: bool = False) -> None:
        m = self.metrics
        for (kind, outcome), n in counts.items():
            m.vendor_events.labels(self.name, kind, outcome).inc(n)
            if redriven:
                m.redriven.labels(self.name, outcome).inc(n)
        counts.clear()
        self._inflight_gauge.set(self.inflight)

    async def _room_to_plan(self) -> None:
        while self.unsent >= self.max_unsent:
            self._room.clear()
            await self._room.wait()

    async def _send(self, req: VendorRequest) -> _Answer:
        try:
            return await self._send_one(req)
        finally:
            self.unsent -= 1
            if self.unsent < self.max_unsent:
                self._room.set()

    async def _send_one(self, req: VendorRequest) -> _Answer:
        n = len(req.events)
        await self.gate.wait(self.sleep)
        if not self.breaker.allow():
            return _Answer(None, [retryable(CIRCUIT_OPEN)] * n)
        await self.limit.acquire()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.total_timeout):
                r = await self.client.request(req.method, req.url, content=req.content, headers=req.headers)
        except (TimeoutError, httpx.TimeoutException):
            self._no_answer(t0, backpressure=True)
            return _Answer(None, [retryable("timeout")] * n)
        except httpx.TransportError as exc:
            self._no_answer(t0, backpressure=False)
            return _Answer(None, [retryable(f"transport error: {type(exc).__name__}")] * n)
        except BaseException:  # cancelled: give the limit and any probe back
            self.limit.release(ok=False)
            self.breaker.abandon()
            raise
        latency = time.perf_counter() - t0
        self._duration.observe(latency)
        status = r.status_code
        after = parse_retry_after(r.headers.get("retry-after")) if status >= 400 else None
        throttled = status == 429 or (status == 503 and after is not None)
        self.breaker.record(throttled or status < 500 or status == 501)
        self.limit.release(ok=True, backpressure=throttled, latency_s=latency)
        if throttled:
            self.gate.hold(after if after is not None else 1.0)
        self.metrics.vendor_requests.labels(self.name, status_class(r.status_code)).inc()
        resp = Response(r.status_code, r.headers, r.content)
        try:
            outcomes = self.adapter.interpret(req, resp)
        except Exception as exc:  # an adapter bug: these events are dead-lettered as internal, never lost
            logger.error("%s adapter failed to interpret an HTTP %d answer: %s", self.name, r.status_code,
                         where_failed(exc))
            return _Answer(resp, None)
        if len(outcomes) != n:
            logger.error("%s adapter returned %d outcomes for %d events", self.name, len(outcomes), n)
            return _Answer(resp, None)
        if after:
            outcomes = [Outcome(o.verdict, o.reason, o.retry_after_s or after, o.note)
                        if o.verdict is Verdict.RETRYABLE else o for o in outcomes]
        return _Answer(resp, outcomes, throttled)

    def _no_answer(self, t0: float, backpressure: bool) -> None:
        self._duration.observe(time.perf_counter() - t0)
        self.metrics.vendor_requests.labels(self.name, "error").inc()
        self.breaker.record(False)
        self.limit.release(ok=False, backpressure=backpressure)

    async def drain(self, timeout_s: float) -> bool:
        """Flush the open batch and wait for in-flight deliveries (up to timeout)."""
        self.flush()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout_s)
        return not self.tasks

    async def cancel(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.client.aclose()
