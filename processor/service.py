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
* an answer: the adapter's per-event outcomes, Retry-After applied to the retryable ones.

A throttled answer (429, or 503 with Retry-After) holds the vendor's rate gate and halves its limit; only
a successful answer (not 5xx, not throttled) at steady latency grows it. Request counts and durations are
recorded here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import parsedate_to_datetime
from typing import Any

from processor.admission import Admission
from processor.errors import RequestTimeout, TlsVerificationFailed, TransportError, UnmappedError
from processor.logs import where_failed
from processor.metrics import Metrics, status_class
from processor.transport import HttpSender, Reply
from processor.vendors.base import Adapter, Outcome, Response, VendorRequest, Verdict, retryable

logger = logging.getLogger(__name__)

CIRCUIT_OPEN = "circuit open"


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
        healthy = status < 500 or status == 501
        a.breaker.record(throttled or healthy)
        a.limit.release(ok=healthy and not throttled, backpressure=throttled, latency_s=latency)
        if throttled:
            a.gate.hold(after if after is not None else 1.0)
        self._count(status)
        resp = Response(status, r.headers, r.content)
        try:
            outcomes = self.adapter.interpret(req, resp)
        except Exception as exc:  # an adapter bug: these events are dead-lettered as internal, never lost
            logger.error("%s adapter failed to interpret an HTTP %d answer: %s", self.name, status,
                         where_failed(exc))
            return Answer(status, None, internal=type(exc).__name__)
        if len(outcomes) != n:
            logger.error("%s adapter returned %d outcomes for %d events", self.name, len(outcomes), n)
            return Answer(status, None, internal="wrong number of outcomes")
        if after:
            outcomes = [Outcome(o.verdict, o.reason, o.retry_after_s or after, o.note)
                        if o.verdict is Verdict.RETRYABLE else o for o in outcomes]
        return Answer(status, outcomes, counted=not throttled)

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
