"""Delivery: the one place that does vendor HTTP, retries and per-event settlement.

Per vendor: one long-lived ``Sender`` (an httpx transport with explicit pool
limits and timeouts), a bound on concurrent requests, and a batcher. A closed batch is
planned by the adapter, sent, and every event's outcome acted on:

* delivered -> settled (latency observed from the Kafka timestamp);
* rejected  -> dead-lettered at once for this vendor;
* retryable -> only those events are planned again after exponential
  backoff with full jitter (at least Retry-After), bounded by attempts and
  elapsed time; then dead-lettered as exhausted.

Transport failures (connect errors, timeouts, broken connections) are
translated to retryable outcomes here, at this one boundary.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from operator import attrgetter
from typing import Any

import httpx

from processor.events import Event
from processor.metrics import Metrics, status_class
from processor.vendors.base import DELIVERED, Adapter, Outcome, Response, VendorRequest, Verdict, retryable

logger = logging.getLogger(__name__)

Settle = Callable[[Event], None]
SettleMany = Callable[[list[Event]], None]
_kind = attrgetter("kind")
_timestamp = attrgetter("timestamp_ms")
DeadLetter = Callable[[Event, str, str, int | None, str, int, int | None], None]


class Sender:
    """The relay's one HTTP call: an httpx Request handed to an httpx transport, its body read.

    httpx.AsyncClient wraps every request in layers a relay does not use: a cookie jar (a vendor's
    cookies are never sent back), auth and redirect handling (an answer is the answer: adapters
    classify 3xx), default-header merging. They cost ~40% of the relay's time when a vendor takes one
    event a request; going to the transport directly sends ~60% more requests a second on the same
    HTTP stack (bench/README.md). Transport errors are httpx's, as they were through the client."""

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout | None = None) -> None:
        self.transport = transport
        self._timeout = (timeout or httpx.Timeout(10.0)).as_dict()

    async def request(self, method: str, url: str, content: bytes, headers: Mapping[str, str]) -> httpx.Response:
        request = httpx.Request(method, url, content=content, headers=headers,
                                extensions={"timeout": self._timeout})
        response = await self.transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


def make_sender(adapter: Adapter[Any, Any], transport: str = "aiohttp") -> Sender:
    """The vendor's sender: pool limits from its concurrency, its timeouts; ``transport`` is aiohttp's
    (via httpx-aiohttp, the default: ~10x the requests/s of httpx's own here) or httpx's own."""
    s = adapter.settings
    limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency,
                          keepalive_expiry=30)
    timeout = httpx.Timeout(s.timeout.total_s, connect=s.timeout.connect_s)
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return Sender(AiohttpTransport(limits=limits), timeout)
    return Sender(httpx.AsyncHTTPTransport(limits=limits), timeout)


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


class VendorPipeline:
    """Batches, sends, retries and settles one vendor's events."""

    def __init__(self, adapter: Adapter[Any, Any], client: Sender, metrics: Metrics,
                 settle: Settle, dead_letter: DeadLetter, settle_many: SettleMany | None = None) -> None:
        from processor.batching import Batcher

        self.adapter = adapter
        self.name = adapter.name
        s = adapter.settings
        self.batcher = Batcher(s.batch)
        self.client = client
        self.sem = asyncio.Semaphore(s.concurrency)
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
        self.settle = settle
        self.settle_many: SettleMany = settle_many or self._settle_each
        self.dead_letter = dead_letter
        self.tasks: set[asyncio.Task[None]] = set()
        self.sleep = asyncio.sleep  # replaceable in tests
        self.inflight = 0
        m = metrics
        self._inflight_gauge = m.inflight.labels(self.name)
        self._duration = m.request_duration.labels(self.name)
        self._latency = m.delivery_latency.labels(self.name)
        self._batch_size = m.batch_events.labels(self.name)
        self._retries = m.retries.labels(self.name)

    # -- intake ------------------------------------------------------------
    def submit(self, event: Event) -> None:
        self.inflight += 1
        batch = self.batcher.add(event)
        if batch is not None:
            self._dispatch(batch)

    def submit_many(self, events: list[Event]) -> None:
        """``submit`` for each event, in order."""
        self.inflight += len(events)
        for batch in self.batcher.add_many(events):
            self._dispatch(batch)

    def tick(self, now: float) -> None:
        batch = self.batcher.due(now)
        if batch is not None:
            self._dispatch(batch)

    def flush(self) -> None:
        batch = self.batcher.flush()
        if batch is not None:
            self._dispatch(batch)

    def _dispatch(self, events: list[Event]) -> None:
        self._batch_size.observe(len(events))
        self._inflight_gauge.set(self.inflight)
        task = asyncio.create_task(self._deliver(events), name=f"deliver-{self.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- delivery ----------------------------------------------------------
    async def _deliver(self, events: list[Event]) -> None:
        started = time.monotonic()
        first_failure_ms: int | None = None
        attempt = 0
        pending = events
        counts: Counter[tuple[str, str]] = Counter()
        try:
            while pending:
                attempt += 1
                await self._room_to_plan()
                try:
                    plan = self.adapter.plan(pending)
                except Exception:  # an adapter bug must not lose events or kill the relay
                    logger.exception("%s adapter failed to plan a batch of %d", self.name, len(pending))
                    for ev in pending:
                        self._dead(ev, "rejected", None, "internal error in the adapter (see logs)", attempt,
                                   first_failure_ms, counts)
                    return
                for ev in plan.filtered:
                    self._settled(ev, "filtered", counts)
                for ev, reason in plan.rejected:
                    self._dead(ev, "rejected", None, reason, attempt, first_failure_ms, counts)
                self.unsent += len(plan.requests)
                results = await asyncio.gather(*(self._send(r) for r in plan.requests))
                retry: list[tuple[Event, Outcome, int | None]] = []
                wait_at_least = 0.0
                now_s = time.time()
                for req, (resp, outcomes) in zip(plan.requests, results, strict=True):
                    if outcomes.count(DELIVERED) == len(req.events):  # the common case, settled in bulk
                        self._delivered(req.events, now_s, counts)
                        continue
                    status = resp.status if resp is not None else None
                    for ev, out in zip(req.events, outcomes, strict=True):
                        if out.note:
                            self.metrics.notes.labels(self.name, out.note).inc()
                        if out.verdict is Verdict.DELIVERED:
                            ts = ev.timestamp_ms
                            if ts:
                                self._latency.observe(max(0.0, now_s - ts / 1000))
                            self._settled(ev, "delivered", counts)
                        elif out.verdict is Verdict.REJECTED:
                            self._dead(ev, "rejected", status, out.reason, attempt, first_failure_ms, counts)
                        else:
                            retry.append((ev, out, status))
                            if out.retry_after_s:
                                wait_at_least = max(wait_at_least, out.retry_after_s)
                if not retry:
                    return
                if first_failure_ms is None:
                    first_failure_ms = int(now_s * 1000)
                delay = max(wait_at_least, backoff_delay(attempt, self.retry.base_delay_ms / 1000,
                                                         self.retry.max_delay_ms / 1000))
                elapsed = time.monotonic() - started
                if attempt >= self.retry.max_attempts or elapsed + delay > self.retry.max_elapsed_s:
                    for ev, out, status in retry:
                        self._dead(ev, "exhausted", status, f"{out.reason} (after {attempt} attempts)", attempt,
                                   first_failure_ms, counts)
                    return
                self._retries.inc(len(retry))
                logger.info("%s: %d events retry in %.2fs (attempt %d): %s", self.name, len(retry), delay,
                            attempt, retry[0][1].reason)
                await self.sleep(delay)
                pending = [ev for ev, _, _ in retry]
        finally:
            for (kind, outcome), n in counts.items():
                self.metrics.vendor_events.labels(self.name, kind, outcome).inc(n)
            self._inflight_gauge.set(self.inflight)

    def _delivered(self, events: list[Event], now_s: float, counts: Counter[tuple[str, str]]) -> None:
        """Every event of one request delivered: latency, counts and settlement per request, not per event."""
        self._latency.observe_since(now_s, map(_timestamp, events))
        for kind, n in Counter(map(_kind, events)).items():
            counts[(kind.value, "delivered")] += n
        self.inflight -= len(events)
        self.settle_many(events)

    def _settle_each(self, events: list[Event]) -> None:
        for ev in events:
            self.settle(ev)

    def _settled(self, ev: Event, outcome: str, counts: Counter[tuple[str, str]]) -> None:
        counts[(ev.kind.value, outcome)] += 1
        self.inflight -= 1
        self.settle(ev)

    def _dead(self, ev: Event, error_class: str, status: int | None, reason: str, attempts: int,
              first_ms: int | None, counts: Counter[tuple[str, str]]) -> None:
        counts[(ev.kind.value, "dead_lettered")] += 1
        self.inflight -= 1
        self.dead_letter(ev, self.name, error_class, status, reason, attempts, first_ms)

    async def _room_to_plan(self) -> None:
        while self.unsent >= self.max_unsent:
            self._room.clear()
            await self._room.wait()

    async def _send(self, req: VendorRequest) -> tuple[Response | None, list[Outcome]]:
        try:
            return await self._send_one(req)
        finally:
            self.unsent -= 1
            if self.unsent < self.max_unsent:
                self._room.set()

    async def _send_one(self, req: VendorRequest) -> tuple[Response | None, list[Outcome]]:
        n = len(req.events)
        async with self.sem:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(self.total_timeout):
                    r = await self.client.request(req.method, req.url, content=req.content, headers=req.headers)
            except (TimeoutError, httpx.TimeoutException):
                self.metrics.vendor_requests.labels(self.name, "error").inc()
                return None, [retryable("timeout")] * n
            except httpx.TransportError as exc:
                self.metrics.vendor_requests.labels(self.name, "error").inc()
                return None, [retryable(f"transport error: {type(exc).__name__}")] * n
            finally:
                self._duration.observe(time.perf_counter() - t0)
        self.metrics.vendor_requests.labels(self.name, status_class(r.status_code)).inc()
        resp = Response(r.status_code, r.headers, r.content)
        outcomes = self.adapter.interpret(req, resp)
        if len(outcomes) != n:
            logger.error("%s adapter returned %d outcomes for %d events; retrying them", self.name,
                         len(outcomes), n)
            return resp, [retryable("adapter outcome count mismatch")] * n
        after = parse_retry_after(r.headers.get("retry-after")) if r.status_code >= 400 else None
        if after:
            outcomes = [Outcome(o.verdict, o.reason, o.retry_after_s or after, o.note)
                        if o.verdict is Verdict.RETRYABLE else o for o in outcomes]
        return resp, outcomes

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
