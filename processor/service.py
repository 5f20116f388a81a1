"""The request service: one planned request in, one outcome per event out, whatever happens.

``RequestService.send`` takes one ``VendorRequest`` through the vendor's rate gate, circuit breaker and
adaptive concurrency limit (``processor.admission``) and the vendor's sender (``processor.transport``, the
only HTTP I/O), and has the adapter read the answer. It never raises (but on cancellation): this is the one
boundary where what a request can raise becomes that request's outcome, and no other request's:

* no answer: the sender's ``TransportError`` (processor.errors, named by what happened: connection
  refused, TLS verification failed, a timeout ...) or the service's own timer: every event of that request
  is retryable with the class's label as the reason, the breaker records a failure, and only a timeout is
  back-pressure for the adaptive limit (a refused connection says nothing about the vendor's load); a
  TLS verification failure is logged as an ERROR once per vendor, naming the host and the reason;
* an answer the adapter fails on (or gives the wrong number of outcomes for): ``internal`` for that request's
  events (the vendor answered: sending them again could duplicate them);
* an answer: the adapter's per-event outcomes, Retry-After applied to the retryable ones;
* an answer that is not the vendor's success answer (the adapter says ``unrecognised answer``, or the body is
  over the vendor's ``max_answer_bytes``): retryable, counted per vendor, logged at most once a minute, and
  a failure for the breaker, never a success for the breaker or the limit.

A throttled answer (429, or 503 with Retry-After) holds the vendor's rate gate and halves its limit; only
a successful answer (not 5xx, not throttled) at steady latency grows it. Request counts and durations are
recorded here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from email.utils import parsedate_to_datetime
from typing import Any

from processor.admission import Admission
from processor.errors import RequestTimeout, TlsVerificationFailed, TransportError, UnmappedError
from processor.logs import where_failed
from processor.metrics import Metrics, status_class
from processor.transport import HttpSender, Reply
from processor.vendors.base import UNRECOGNISED, Adapter, Outcome, Response, VendorRequest, Verdict, retryable

logger = logging.getLogger(__name__)

CIRCUIT_OPEN = "circuit open"
UNRECOGNISED_LOG_EVERY_S = 60.0


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


class Answer:
    """What one request came back with: one outcome per event (``outcomes``: None when the adapter failed
    on the answer: ``internal``), its HTTP status (None: no answer), and whether it counts as an attempt
    (not throttled, not refused by the open breaker)."""

    __slots__ = ("counted", "internal", "outcomes", "status")

    def __init__(self, status: int | None, outcomes: list[Outcome] | None, counted: bool = True,
                 internal: str = "") -> None:
        self.status = status
        self.outcomes = outcomes
        self.counted = counted
        self.internal = internal


class RequestService:
    def __init__(self, adapter: Adapter[Any, Any], sender: HttpSender, admission: Admission, metrics: Metrics,
                 sleep: Any = asyncio.sleep) -> None:
        self.adapter = adapter
        self.name = adapter.name
        self.admission = admission
        self.total_timeout = adapter.settings.timeout.total_s
        self.client = sender
        self.metrics = metrics
        self.sleep = sleep  # replaceable in tests, with the clock
        self._duration = metrics.request_duration.labels(self.name)
        self._requests: dict[int | None, Any] = {}  # HTTP status (None: no answer) -> its status class's counter
        self._tls_logged = False  # a TLS verification failure is an ERROR once per vendor
        self._unrecognised_logged_at = -math.inf
        self._unrecognised_seen = 0

    @property
    def client(self) -> HttpSender:
        return self._client

    @client.setter
    def client(self, sender: HttpSender) -> None:
        """The sender; the service bounds each request with ``asyncio.timeout`` unless the sender enforces a
        total timeout of its own no longer than the vendor's (one timer a request, not two)."""
        self._client = sender
        own = getattr(sender, "total_s", None)
        self._timer = own is None or own > self.total_timeout

    async def send(self, req: VendorRequest) -> Answer:
        """The request's answer; never raises but ``CancelledError``."""
        try:
            n = len(req.events)
            a = self.admission
            if a.gate.wait_s() > 0:
                await a.gate.wait(self.sleep)
            if not a.breaker.allow():
                return Answer(None, [retryable(CIRCUIT_OPEN)] * n, counted=False)
            if not a.limit.try_acquire():
                await a.limit.acquire()
            t0 = time.perf_counter()
            try:
                if self._timer:
                    async with asyncio.timeout(self.total_timeout):
                        r = await self._client.request(req.method, req.url, req.content, req.headers)
                else:  # the sender bounds the whole request itself
                    r = await self._client.request(req.method, req.url, req.content, req.headers)
            except TransportError as exc:  # what the sender's one table named
                self._no_answer(t0, exc, n)
                return Answer(None, [retryable(exc.label)] * n)
            except TimeoutError:  # the service's own timer (asyncio.timeout above)
                self._no_answer(t0, RequestTimeout(), n)
                return Answer(None, [retryable(RequestTimeout.label)] * n)
            except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):  # give the limit and any probe back
                a.limit.release(ok=False)
                a.breaker.abandon()
                raise
            return self._answered(req, r, time.perf_counter() - t0)
        except Exception as exc:  # an error of ours around the request: retryable, this request alone
            logger.error("%s: a request of %d events failed inside the relay: %s; retried", self.name,
                         len(req.events), where_failed(exc))
            return Answer(None, [retryable(f"internal error: {type(exc).__name__}")] * len(req.events))

    def _answered(self, req: VendorRequest, r: Reply, latency: float) -> Answer:
        """An HTTP answer: admission told, counted, read by the adapter."""
        a = self.admission
        n = len(req.events)
        self._duration.observe(latency)
        status = r.status_code
        after = parse_retry_after(r.headers.get("retry-after")) if status >= 400 else None
        throttled = status == 429 or (status == 503 and after is not None)
        resp = Response(status, r.headers, r.content)
        outcomes, internal = self._read(req, resp, getattr(r, "oversize", False))
        unrecognised = outcomes is not None and self._unrecognised(resp, outcomes, n)
        healthy = (status < 500 or status == 501) and not unrecognised
        a.breaker.record(throttled or healthy)
        a.limit.release(ok=healthy and not throttled, backpressure=throttled, latency_s=latency)
        if throttled:
            a.gate.hold(after if after is not None else 1.0)
        self._count(status)
        if outcomes is None:
            return Answer(status, None, internal=internal)
        if len(outcomes) != n:
            logger.error("%s adapter returned %d outcomes for %d events", self.name, len(outcomes), n)
            return Answer(status, None, internal="wrong number of outcomes")
        if after:
            outcomes = [Outcome(o.verdict, o.reason, o.retry_after_s or after, o.note)
                        if o.verdict is Verdict.RETRYABLE else o for o in outcomes]
        return Answer(status, outcomes, counted=not throttled)

    def _read(self, req: VendorRequest, resp: Response, oversize: bool) -> tuple[list[Outcome] | None, str]:
        """The adapter's outcomes (a body over the vendor's limit is an unrecognised answer, unread by the
        adapter), or None and why (an adapter bug: these events are dead-lettered as internal, never lost)."""
        if oversize:
            limit = self.adapter.settings.max_answer_bytes
            return [self.adapter.unrecognised(resp, size=f"body over {limit} bytes")] * len(req.events), ""
        try:
            return self.adapter.interpret(req, resp), ""
        except Exception as exc:
            logger.error("%s adapter failed to interpret an HTTP %d answer: %s", self.name, resp.status,
                         where_failed(exc))
            return None, type(exc).__name__

    def _unrecognised(self, resp: Response, outcomes: list[Outcome], n: int) -> bool:
        """Whether the adapter found the answer unrecognised (not its vendor's success answer): counted, and
        logged at most once a minute per vendor with how many such answers the minute saw."""
        if not outcomes or not outcomes[0].reason.startswith(UNRECOGNISED):
            return False
        self.metrics.unrecognised_answers.labels(self.name).inc()
        self._unrecognised_seen += 1
        now = time.monotonic()
        if now - self._unrecognised_logged_at >= UNRECOGNISED_LOG_EVERY_S:
            logger.warning("%s: an answer that is not %s's success answer, %d events retried (%d such answers "
                           "since the last line, logged at most once a minute): %s", self.name, self.name, n,
                           self._unrecognised_seen, outcomes[0].reason)
            self._unrecognised_logged_at = now
            self._unrecognised_seen = 0
        return True

    def _count(self, status: int | None) -> None:
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = self.metrics.vendor_requests.labels(self.name, status_class(status))
        child.inc()

    def _no_answer(self, t0: float, exc: TransportError, n: int) -> None:
        """No answer: counted by what happened, a failure for the breaker, back-pressure only if a timeout."""
        self._duration.observe(time.perf_counter() - t0)
        self._count(None)
        self.metrics.transport_errors.labels(self.name, exc.metric).inc()
        a = self.admission
        a.breaker.record(False)
        a.limit.release(ok=False, backpressure=exc.backpressure)
        if isinstance(exc, TlsVerificationFailed) and not self._tls_logged:
            self._tls_logged = True
            logger.error("%s: TLS verification failed for host %s: %s; the vendor's requests are retried, "
                         "and this is logged once", self.name, exc.host, exc.detail)
        elif isinstance(exc, UnmappedError):
            logger.warning("%s: a request of %d events failed without a usable answer: %s; retried", self.name,
                           n, exc.detail)
