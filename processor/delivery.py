"""Delivery: one vendor's pipeline, from intake to each event's one outcome.

The walk of a poll's events for one vendor, in one direction:

1. ``submit_many`` asks the vendor's admission policy (``processor.admission``) how many to take now; in
   park mode the rest are parked at once (breaker open, or beyond the budget while impaired);
2. the batcher (``processor.batching``) closes batches on size or time; each closed batch is one task;
3. the adapter plans the batch into requests (filtered and rejected events get their outcome here);
4. the request service (``processor.service``) sends each request and returns one outcome per event,
   whatever it raised;
5. as each answer comes, its delivered and rejected events are reported to the ``Settlement``
   (``processor.offsets``): an accepted request never waits for its siblings (throttled, or slow); once all
   are answered, the retryable ones go to the retry decision (``processor.retry``): retried in place after
   a backoff (full jitter, at least Retry-After), parked, or dead-lettered as exhausted; events waiting on
   the vendor (throttled, a setup error) are never exhausted.

Every event leaves with exactly one outcome for this vendor: delivered, filtered, rejected, exhausted,
parked, internal (the relay's own failure on it, naming the exception type) or dropped (its partition was
revoked: the new owner redelivers it). The settlement refuses a second one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from operator import attrgetter
from typing import Any

from processor.admission import Admission
from processor.batching import Batcher
from processor.deadletter import first_failure_ms
from processor.events import Event
from processor.isolation import BreakerState
from processor.logs import where_failed
from processor.metrics import Metrics
from processor.offsets import Settlement, any_revoked, is_revoked
from processor.retry import Step, backoff_delay, decide, expired
from processor.service import CIRCUIT_OPEN, Answer, RequestService
from processor.transport import HttpSender
from processor.vendors.base import DELIVERED, Adapter, Outcome, VendorRequest, Verdict
from processor.vendors.recent import RecentKeys

logger = logging.getLogger(__name__)

_timestamp = attrgetter("timestamp_ms")
PARK_REASONS = ("breaker_open", "budget_full", "retry_budget", "throttled", "setup_error")
REDRIVE_OUTCOMES = ("delivered", "filtered", "dead_lettered", "parked", "expired")


class VendorPipeline:
    """One vendor's intake, batching and delivery rounds; its decisions are the admission policy's, the
    request service's, the retry decision's and the settlement's."""

    def __init__(self, adapter: Adapter[Any, Any], client: HttpSender, metrics: Metrics, settlement: Settlement,
                 budget: int, parking: bool) -> None:
        self.adapter = adapter
        self.name = name = adapter.name
        s = adapter.settings
        self.batcher = Batcher(s.batch)
        self.settlement = settlement
        self.parking = parking and s.on_outage == "park"
        m = self.metrics = metrics
        self.admission = Admission(budget, self.parking, s.batch.max_events, s.breaker, s.concurrency,
                                   self._breaker_changed, m.concurrency_limit.labels(name).set)
        self.service = RequestService(adapter, client, self.admission, metrics)
        m.breaker_state.labels(name).set(0)
        m.concurrency_limit.labels(name).set(s.concurrency)
        if self.parking:  # the series exist from the start, so the first parking is a visible increase
            for why in PARK_REASONS:
                m.parked.labels(name, why)
            for outcome in REDRIVE_OUTCOMES:
                m.redriven.labels(name, outcome)
        # Requests planned but not yet answered, bounded: a planned request holds its body, so without
        # this a vendor that takes one event a request would build nearly every unsettled event's body up
        # front. A batch waits for room before it is planned (and before each retry), never while it holds
        # requests, so nothing can wait on itself.
        self.unsent = 0
        self.max_unsent = 2 * s.concurrency
        self._waiting: deque[asyncio.Future[None]] = deque()  # batches waiting for room to plan, in turn
        self.retry = s.retry
        self.tasks: set[asyncio.Task[None]] = set()
        self._unsettled_gauge = m.inflight.labels(name)
        self._latency = m.delivery_latency.labels(name)
        self._batch_size = m.batch_events.labels(name)
        self._retries = m.retries.labels(name)
        if adapter.memory is not None:  # the series exist from the start
            self._memory_hits = m.vendor_memory.labels(name, "hit")
            self._memory_evictions = m.vendor_memory.labels(name, "eviction")
            self._memory_keys = m.vendor_memory_keys.labels(name)

    @property
    def clock(self) -> Callable[[], float]:
        """Monotonic seconds; replaceable in tests, with ``sleep`` (the request service's too)."""
        return self.service.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.service.clock = clock

    @property
    def sleep(self) -> Callable[[float], Awaitable[None]]:
        return self.service.sleep  # type: ignore[no-any-return]

    @sleep.setter
    def sleep(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        self.service.sleep = sleep

    def _breaker_changed(self, state: BreakerState) -> None:
        self.metrics.breaker_state.labels(self.name).set(int(state))
        self.metrics.breaker_transitions.labels(self.name, state.name.lower()).inc()
        logger.warning("%s: circuit breaker %s", self.name, state.name.lower().replace("_", "-"))

    # -- intake ------------------------------------------------------------
    def submit_many(self, events: list[Event]) -> None:
        """Batch these events, in order; in park mode park at once what the vendor cannot take now."""
        if self.parking and events:
            take, why = self.admission.intake(len(events))
            if take < len(events):
                a = self.admission
                if why == "breaker_open":
                    self._park_now(events[take:], why, CIRCUIT_OPEN, a.breaker.reopens_in())
                else:
                    self._park_now(events[take:], why, "vendor at its in-flight budget", 1.0)
                events = events[:take]
        if not events:
            return
        self.admission.admit(len(events))
        for batch in self.batcher.add_many(events):
            self._dispatch(batch)

    def submit_redriven(self, events: list[Event]) -> None:
        """Parked events taken back from the retry topic (already a batch): sent as they are."""
        self.admission.admit(len(events))
        self._dispatch(events)

    def _park_now(self, events: list[Event], why: str, reason: str, delay_s: float) -> None:
        self.admission.admit(len(events))
        self._park(events, why, reason, None, 0, None, delay_s)
        self._unsettled_gauge.set(self.admission.unsettled)

    def tick(self, now: float) -> None:
        self.admission.tick(now)
        batch = self.batcher.due(now)
        if batch is not None:
            self._dispatch(batch)

    def flush(self) -> None:
        batch = self.batcher.flush()
        if batch is not None:
            self._dispatch(batch)

    def _dispatch(self, events: list[Event]) -> None:
        self._batch_size.observe(len(events))
        self._unsettled_gauge.set(self.admission.unsettled)
        task = asyncio.create_task(self._deliver(events), name=f"deliver-{self.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- delivery ----------------------------------------------------------
    async def _deliver(self, events: list[Event]) -> None:
        failing_since: float | None = None  # monotonic: the first failure in this delivery
        memory = self.adapter.memory
        first_ms: int | None = None  # the same, epoch ms (the dead-letter and parked records' header)
        attempts: dict[int, int] = {}  # per failed event: its counted attempts (not throttled, not circuit-open)
        last: dict[int, tuple[Outcome, int | None]] = {}  # per failed event: its last failure and HTTP status
        waiting: dict[int, str] = {}  # failed events whose last answer was a throttle or a setup error: which
        pending = events
        try:
            while pending:
                pending = self._drop_revoked(pending)
                if not pending:
                    return
                await self._room_to_plan()
                try:
                    plan = self.adapter.plan(pending)
                except Exception as exc:  # an adapter bug must not lose events or kill the relay
                    logger.error("%s adapter failed to plan a batch of %d: %s", self.name, len(pending),
                                 where_failed(exc))
                    self._internal(pending, type(exc).__name__)
                    return
                if plan.filtered:
                    self._release(self.settlement.settle_many(plan.filtered, self.name, "filtered"))
                for ev, reason in plan.rejected:
                    self._dead(ev, "rejected", None, reason, attempts.get(id(ev), 0) + 1, first_ms)
                retry: list[Event] = []
                wait_at_least = 0.0

                def settle(req: VendorRequest, answer: Answer, first_ms: int | None = first_ms,
                           retry: list[Event] = retry) -> None:
                    """One answer's events, as soon as it comes: an accepted request settles whatever its
                    siblings wait for (a rate gate, a slow answer)."""
                    nonlocal wait_at_least
                    outcomes = answer.outcomes
                    if outcomes is None:
                        self._internal(req.events, answer.internal)
                        return
                    if memory is not None:  # remembered before settled: what was delivered is never sent again
                        self.adapter.delivered(req, outcomes)
                    if outcomes.count(DELIVERED) == len(req.events):  # the common case, settled in bulk
                        self._delivered(req.events, time.time())
                    else:
                        wait_at_least = max(wait_at_least, self._one_by_one(
                            req, answer, outcomes, time.time(), attempts, last, waiting, retry, first_ms))

                await self._send_all(plan.requests, settle)
                if memory is not None:
                    self._memory_counts(memory)
                if not retry:
                    return
                if failing_since is None or first_ms is None:
                    failing_since, first_ms = self.clock(), int(time.time() * 1000)
                pending = await self._after_failure(retry, attempts, last, waiting, first_ms, failing_since,
                                                    wait_at_least)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # last resort: our own bug in this task; its events still get one outcome
            self._last_resort(events, exc)
        finally:
            self._unsettled_gauge.set(self.admission.unsettled)

    def _memory_counts(self, memory: RecentKeys) -> None:
        hits, evictions = memory.counts_since_last()
        if hits:
            self._memory_hits.inc(hits)
        if evictions:
            self._memory_evictions.inc(evictions)
        self._memory_keys.set(len(memory))

    def _one_by_one(self, req: VendorRequest, answer: Answer, outcomes: list[Outcome], now_s: float,
                    attempts: dict[int, int], last: dict[int, tuple[Outcome, int | None]], waiting: dict[int, str],
                    retry: list[Event], first_ms: int | None) -> float:
        """A request whose events did not all succeed: each event's outcome; the retryable ones appended to
        ``retry`` with their attempts counted (when the request counts) and marked ``waiting`` when the
        vendor throttled or refused the relay's setup. Returns the longest Retry-After."""
        wait = 0.0
        status, counted = answer.status, answer.counted
        on_vendor = "setup_error" if answer.setup else "throttled" if answer.throttled else ""
        for ev, out in zip(req.events, outcomes, strict=True):
            if out.note:
                self.metrics.notes.labels(self.name, out.note).inc()
            if out.verdict is Verdict.DELIVERED:
                self._delivered([ev], now_s)
            elif out.verdict is Verdict.REJECTED:
                self._dead(ev, "rejected", status, out.reason, attempts.get(id(ev), 0) + 1, first_ms)
            else:
                key = id(ev)
                attempts[key] = attempts.get(key, 0) + counted
                if out.reason != CIRCUIT_OPEN or key not in last:  # else: say what the vendor said last
                    last[key] = (out, status)
                if on_vendor:
                    waiting[key] = on_vendor
                elif counted:
                    waiting.pop(key, None)
                retry.append(ev)
                if out.retry_after_s:
                    wait = max(wait, out.retry_after_s)
        return wait

    async def _after_failure(self, retry: list[Event], attempts: dict[int, int],
                             last: dict[int, tuple[Outcome, int | None]], waiting: dict[int, str], first_ms: int,
                             failing_since: float, wait_at_least: float) -> list[Event]:
        """The retry decision for each group of equally tried events: the events to send again (after the
        backoff), the others parked or dead-lettered as exhausted. Events waiting on the vendor (throttled,
        or a setup error) are never exhausted: they wait in place or are parked."""
        retry = self._drop_revoked(retry)
        if not retry:
            return []
        r, a = self.retry, self.admission
        most = max(attempts[id(ev)] for ev in retry)
        delay = max(wait_at_least, a.gate.wait_s(), a.breaker.reopens_in(),
                    backoff_delay(max(1, most), r.base_delay_ms / 1000, r.max_delay_ms / 1000))

        def key(ev: Event) -> tuple[int, str]:
            return attempts[id(ev)], waiting.get(id(ev), "")

        failing_s, now_ms = self.clock() - failing_since, time.time() * 1000
        steps = {k: decide(k[0], failing_s, first_ms, now_ms, delay, parking=self.parking,
                           breaker_open=a.breaker.is_open(), settings=r, on_vendor=bool(k[1]))
                 for k in {key(ev) for ev in retry}}
        for k, d in steps.items():
            if d.step is Step.RETRY:
                continue
            n = k[0]
            group = [ev for ev in retry if key(ev) == k]
            if d.step is Step.PARK:
                why = k[1] if k[1] and d.why == "retry_budget" else d.why  # throttled, setup_error
                self._park(group, why, "", last, n, first_ms, delay, on_vendor=bool(k[1]))
            else:
                for ev in group:
                    out, status = last[id(ev)]
                    self._dead(ev, "exhausted", status, f"{out.reason} (after {n} attempts)", n, first_ms)
        again = [ev for ev in retry if steps[key(ev)].step is Step.RETRY]
        if not again:
            return []
        self._retries.inc(len(again))
        logger.debug("%s: %d events retry in %.2fs (attempts up to %d): %s", self.name, len(again), delay, most,
                     last[id(again[0])][0].reason)
        await self.sleep(delay)
        return again

    # -- outcomes: reported to the settlement, each event leaving the admission's count once -----------
    def _release(self, n: int) -> None:
        self.admission.release(n)

    def _drop_revoked(self, events: list[Event]) -> list[Event]:
        if not any_revoked(events):
            return events
        keep = [ev for ev in events if not is_revoked(ev)]
        dropped = [ev for ev in events if is_revoked(ev)]
        self._release(self.settlement.drop(dropped, self.name))
        logger.info("%s: dropped %d events of revoked partitions (their new owner redelivers them)",
                    self.name, len(dropped))
        return keep

    def _delivered(self, events: list[Event], now_s: float) -> None:
        """Delivered, settled in bulk (per request, not per event), their latency observed."""
        self._latency.observe_since(now_s, map(_timestamp, events))
        self._release(self.settlement.settle_many(events, self.name))

    def _park(self, events: list[Event], why: str, reason: str, last: dict[int, tuple[Outcome, int | None]] | None,
              attempts: int, first_ms: int | None, delay_s: float, on_vendor: bool = False) -> None:
        """Onto the vendor's retry topic, due after ``delay_s``; what would wait past ``retry.max_elapsed_s``
        from its first failure (a redriven event's is in its headers) is dead-lettered as exhausted instead,
        but for events waiting on the vendor (``on_vendor``: throttled, or a setup error): parked all the same."""
        now_s = time.time()
        next_ms = int((now_s + min(delay_s, self.retry.max_elapsed_s)) * 1000)  # finite, whatever it was given
        s = self.settlement
        for ev in events:
            status = None
            if last is not None:
                out, status = last[id(ev)]
                reason = f"{out.reason} (after {attempts} attempts)"
            if not on_vendor and expired(first_failure_ms(ev) or first_ms, next_ms, self.retry.max_elapsed_s):
                self._dead(ev, "exhausted", status, f"{reason}; waited past retry.max_elapsed_s", attempts, first_ms)
            else:
                self._release(s.park(ev, self.name, why, reason, attempts, first_ms, next_ms))

    def _dead(self, ev: Event, error_class: str, status: int | None, reason: str, attempts: int,
              first_ms: int | None) -> None:
        self._release(self.settlement.dead_letter(ev, self.name, error_class, status, reason, attempts, first_ms))

    def _internal(self, events: list[Event], what: str) -> None:
        for ev in events:
            self._dead(ev, "internal", None, f"internal error in the relay ({what}; see logs)", 0, None)

    def _last_resort(self, events: list[Event], exc: Exception) -> None:
        """A bug of ours in a delivery: the events still without an outcome are dead-lettered as internal.
        If that fails too, they stay unsettled (their messages are not committed: redelivered after a
        restart, which the stall detector forces) and leave the vendor's count."""
        s, name = self.settlement, self.name
        left = [ev for ev in events if not s.has_outcome(ev, name)]
        logger.error("%s: delivery of %d events failed inside the relay (%d without an outcome): %s", name,
                     len(events), len(left), where_failed(exc))
        try:
            self._internal(left, type(exc).__name__)
        except Exception as again:
            stuck = [ev for ev in left if not s.has_outcome(ev, name)]
            logger.critical("%s: %d events left without an outcome (%s): not committed, redelivered after a "
                            "restart", name, len(stuck), where_failed(again))
            self._release(len(stuck))

    async def _room_to_plan(self) -> None:
        """Until fewer than ``max_unsent`` requests are planned and unanswered. Waiting batches take their
        turns in order, woken one at a time (not every waiting batch on every answer): a batch given room
        wakes the next, which looks again once this one has planned (no await between the two)."""
        again = False
        while self.unsent >= self.max_unsent:
            fut = asyncio.get_running_loop().create_future()
            if again:  # woken, but no room after all: still first in line
                self._waiting.appendleft(fut)
            else:
                self._waiting.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # woken, then cancelled: the turn passes on
                    self._wake()
                elif fut in self._waiting:
                    self._waiting.remove(fut)
                raise
            again = True
        self._wake()

    def _wake(self) -> None:
        """The first waiting batch looks for room, if there is any now."""
        while self._waiting and self.unsent < self.max_unsent:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _send_all(self, requests: list[VendorRequest], settle: Callable[[VendorRequest, Answer], None]) -> None:
        """Each request sent and its answer handed to ``settle`` as it comes; sent concurrently by at most
        ``concurrency`` workers (the vendor's limit lets no more through at once), in the order planned:
        one task a worker, not one a request, and none for a batch of one request. An error of ``settle``
        is raised once every worker has finished (no answer is left unsettled behind it)."""
        n = len(requests)
        self.unsent += n
        todo = iter(requests)
        try:
            if n == 1:
                await self._worker(todo, settle)
            else:
                workers = min(n, self.admission.limit.maximum)
                done = await asyncio.gather(*(self._worker(todo, settle) for _ in range(workers)),
                                            return_exceptions=True)
                for result in done:
                    if isinstance(result, BaseException):
                        raise result
        finally:
            left = sum(1 for _ in todo)  # cancelled (or a worker failed) before a worker took them: never sent
            if left:
                self._sent(left)

    async def _worker(self, todo: Iterator[VendorRequest], settle: Callable[[VendorRequest, Answer], None]) -> None:
        send = self.service.send
        for req in todo:
            try:
                answer = await send(req)
            finally:
                self._sent(1)
            settle(req, answer)

    def _sent(self, n: int) -> None:
        self.unsent -= n
        if self._waiting:
            self._wake()


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
        await self.service.client.aclose()
