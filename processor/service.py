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
* an answer of the status table's setup row (3xx, 401, 403, 404, 407: ``Adapter.setup_error``): the
  relay's setup is wrong for the request's site: every event retryable, not a counted attempt, the site
  held (its requests answered here without being sent) until a probe every ``retry.setup_retry_s`` gets
  another answer; an ERROR names the vendor, site, status and Location;
* an answer: the adapter's per-event outcomes, Retry-After applied to the retryable ones;
* an answer that is not the vendor's success answer (the adapter says ``unrecognised answer``, or the body is
  over the vendor's ``max_answer_bytes``): retryable, counted per vendor, logged at most once a minute, and
  a failure for the breaker, never a success for the breaker or the limit.

A throttled answer (429, or 503 with Retry-After) holds the vendor's rate gate and halves its limit; only
a successful answer (not 5xx, not throttled) at steady latency grows it. The gate's hold is the answer's
Retry-After, bounded (``parse_retry_after``: finite seconds or an HTTP date; clamped to the vendor's
``retry.max_retry_after_s``), or without a usable one a backoff growing with each throttled answer in a row.
A request waits for the gate again once it has its place in the limit. Request counts and durations are
recorded here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from datetime import UTC
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


_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?\Z")  # ASCII digits only (RFC 9110 delay-seconds)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """The seconds a Retry-After value asks to wait: delay-seconds (ASCII digits, a decimal fraction
    tolerated) or an HTTP date (a past date: 0), always finite and never negative; ``now`` is epoch seconds
    (default: the clock). None when the value is neither (absent, ``inf``, ``nan``, ``-1``, ``1e400``,
    garbage, a date that does not parse or cannot be represented): the caller backs off on its own. Not
    clamped here: the vendor's ``retry.max_retry_after_s`` is applied by the caller."""
    if not value:
        return None
    text = value.strip()
    if not text or len(text) > 64:
        return None
    if _DELAY_SECONDS.match(text):
        return float(text)  # at most 64 characters: finite
    if text[0].isdigit():  # an HTTP date starts with the day's name
        return None
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:  # "-0000": UTC without a claim to be local
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


class Answer:
    """What one request came back with: one outcome per event (``outcomes``: None when the adapter failed
    on the answer: ``internal``), its HTTP status (None: no answer), whether it counts as an attempt
    (not throttled, not refused by the open breaker, not a setup error), and whether the vendor throttled
    (``throttled``) or refused the relay's setup (``setup``): the events then wait on the vendor, never
    exhausted."""

    __slots__ = ("counted", "internal", "outcomes", "setup", "status", "throttled")

    def __init__(self, status: int | None, outcomes: list[Outcome] | None, counted: bool = True,
                 internal: str = "", throttled: bool = False, setup: bool = False) -> None:
        self.status = status
        self.outcomes = outcomes
        self.counted = counted
        self.internal = internal
        self.throttled = throttled
        self.setup = setup


class SetupHold:
    """A site whose requests the vendor refused for the relay's setup: its status, Location (redacted) and
    when the next request may go (the probe)."""

    __slots__ = ("detail", "location", "probe_at", "status")

    def __init__(self, status: int, location: str, probe_at: float, detail: str = "") -> None:
        self.status = status
        self.location = location
        self.probe_at = probe_at
        self.detail = detail  # the adapter's reading of the answer, when it has one

    def reason(self) -> str:
        said = self.detail if self.detail.startswith(f"HTTP {self.status}") else f"HTTP {self.status}"
        return f"setup error: {said}" + (f" to {self.location}" if self.location else "")


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
        self.max_retry_after_s = adapter.settings.retry.max_retry_after_s
        self._clamp_logged = False
        self.throttled_in_a_row = 0  # throttled answers in a row (the backoff without a usable Retry-After)
        self._holds = 0  # throttle holds so far: a request sent before the last one is not a step of its own
        self.setup_retry_s = adapter.settings.retry.setup_retry_s
        self.setup_holds: dict[str, SetupHold] = {}  # site_id -> its setup error (held sites only)
        self.clock = time.monotonic  # replaceable in tests, with ``sleep``
        self._held_sites = metrics.setup_held_sites.labels(self.name)
        self._held_sites.set(0)
        # the series exist from the start (a first setup error is then a visible increase)
        self._setup_errors = {c: metrics.setup_errors.labels(self.name, c) for c in ("3xx", "4xx")}
        metrics.unrecognised_answers.labels(self.name)
        for kind in {TransportError.metric, *(c.metric for c in TransportError.__subclasses__())}:
            metrics.transport_errors.labels(self.name, kind)

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
            if self.setup_holds:
                held = self._setup_held(req)
                if held is not None:
                    return held
            if a.gate.wait_s() > 0:
                await a.gate.wait(self.sleep)
            if not a.breaker.allow():
                return Answer(None, [retryable(CIRCUIT_OPEN)] * n, counted=False)
            if not a.limit.try_acquire():
                await a.limit.acquire()
            t0 = time.perf_counter()
            try:
                if a.gate.wait_s() > 0:  # throttled while this waited for a place: it waits for the gate too
                    await a.gate.wait(self.sleep)
                    t0 = time.perf_counter()
                holds = self._holds
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
            return self._answered(req, r, time.perf_counter() - t0, holds)
        except Exception as exc:  # an error of ours around the request: retryable, this request alone
            logger.error("%s: a request of %d events failed inside the relay: %s; retried", self.name,
                         len(req.events), where_failed(exc))
            return Answer(None, [retryable(f"internal error: {type(exc).__name__}")] * len(req.events))

    def _answered(self, req: VendorRequest, r: Reply, latency: float, holds: int = 0) -> Answer:
        """An HTTP answer: admission told, counted, read by the adapter. ``holds``: the throttle holds
        counted when the request was sent."""
        a = self.admission
        n = len(req.events)
        self._duration.observe(latency)
        status = r.status_code
        if status >= 300 and self.adapter.setup_error(status):  # a 2xx asks nothing more
            return self._setup_error(req, r, status, latency)
        if self.setup_holds:
            self._setup_ended(req, status)
        after = parse_retry_after(r.headers.get("retry-after")) if status >= 400 else None
        throttled = status == 429 or (status == 503 and after is not None)
        resp = Response(status, r.headers, r.content)
        outcomes, internal = self._read(req, resp, getattr(r, "oversize", False))
        unrecognised = outcomes is not None and self._unrecognised(resp, outcomes, n)
        healthy = (status < 500 or status == 501) and not unrecognised
        a.breaker.record(throttled or healthy)
        new_step = throttled and holds == self._holds  # not an answer to a request sent before the last hold
        if new_step:  # halved with each hold of the gate, not once a second at most
            a.limit.throttled()
        a.limit.release(ok=healthy and not throttled, backpressure=throttled and not new_step, latency_s=latency)
        if throttled:
            after = self._throttle_hold(after, holds)
            a.gate.hold(after)
        else:
            self.throttled_in_a_row = 0
            if after is not None:
                after = self._clamp(after)
        self._count(status)
        if outcomes is None:
            return Answer(status, None, internal=internal)
        if len(outcomes) != n:
            logger.error("%s adapter returned %d outcomes for %d events", self.name, len(outcomes), n)
            return Answer(status, None, internal="wrong number of outcomes")
        if after or any(o.retry_after_s for o in outcomes):
            outcomes = [Outcome(o.verdict, o.reason, self._clamp(o.retry_after_s or after or 0.0), o.note)
                        if o.verdict is Verdict.RETRYABLE else o for o in outcomes]
        return Answer(status, outcomes, counted=not throttled, throttled=throttled)

    # -- setup errors: per site, held and retried slowly, never the events' fault --------------------------
    @staticmethod
    def _sites(req: VendorRequest) -> list[str]:
        """The sites of a request's events, in order, each once (one, unless the vendor's requests mix sites
        sharing an endpoint: the vendor's answer is then the answer for all of them)."""
        return list(dict.fromkeys(str(ev.record.get("site_id")) for ev in req.events))

    def _setup_held(self, req: VendorRequest) -> Answer | None:
        """The answer for a request of a held site, without sending it; None when it may go (no hold, or
        it is the sites' probe: the holds then wait ``retry.setup_retry_s`` for the next one)."""
        holds = [h for h in map(self.setup_holds.get, self._sites(req)) if h is not None]
        if not holds:
            return None
        now = self.clock()
        hold = max(holds, key=lambda h: h.probe_at)
        if now >= hold.probe_at:
            for h in holds:
                h.probe_at = now + self.setup_retry_s
            return None
        outcome = retryable(hold.reason(), hold.probe_at - now)
        return Answer(hold.status, [outcome] * len(req.events), counted=False, setup=True)

    def _setup_error(self, req: VendorRequest, r: Reply, status: int, latency: float) -> Answer:
        """An answer that says the relay's setup is wrong for the request's site (the status table's setup
        row): its events wait (held or parked, never dead-lettered), the site is held until a probe every
        ``retry.setup_retry_s`` gets another answer; an ERROR when the site's answer first is or changes."""
        a = self.admission
        a.breaker.record(True)  # the vendor answered: not an outage
        a.limit.release(ok=False, latency_s=latency)
        self._count(status)
        location = r.headers.get("location") or ""
        location = self.adapter.vendor_text(location) if location else ""
        probe_at = self.clock() + self.setup_retry_s
        detail, note = self._setup_detail(req, r, status)
        hold = SetupHold(status, location, probe_at, detail)
        for site in self._sites(req):
            before = self.setup_holds.get(site)
            if before is None or before.status != status or before.location != location:
                logger.error("%s: site %s answered HTTP %d (Location: %s): the relay's setup for this site is "
                             "wrong (endpoint, credentials or proxy)%s; its events are held or parked, never "
                             "dead-lettered, and a request is tried every %.0f s", self.name, site, status,
                             location or "none", f" ({detail})" if detail else "", self.setup_retry_s)
            hold = self.setup_holds[site] = SetupHold(status, location, probe_at, detail)
        self._held_sites.set(len(self.setup_holds))
        cls = status_class(status)
        (self._setup_errors.get(cls) or self.metrics.setup_errors.labels(self.name, cls)).inc()
        outcome = retryable(hold.reason(), self.setup_retry_s, note)
        return Answer(status, [outcome] * len(req.events), counted=False, setup=True)

    def _setup_detail(self, req: VendorRequest, r: Reply, status: int) -> tuple[str, str | None]:
        """What the adapter makes of a setup answer (Tracardi's unknown source, Convert's firewall): its
        first outcome's reason and note; its verdict is not used (the setup row decides)."""
        try:
            outcomes = self.adapter.interpret(req, Response(status, r.headers, r.content))
        except Exception:  # its reading is a nicety here: the status says enough
            return "", None
        if not outcomes:
            return "", None
        first = outcomes[0]
        return first.reason[:300], first.note

    def _setup_ended(self, req: VendorRequest, status: int) -> None:
        """Another answer for a held site: the hold ends, its events flow again."""
        for site in self._sites(req):
            hold = self.setup_holds.pop(site, None)
            if hold is not None:
                self._held_sites.set(len(self.setup_holds))
                logger.warning("%s: site %s answers HTTP %d now (was HTTP %d): delivery resumes", self.name, site,
                               status, hold.status)

    def _clamp(self, seconds: float) -> float:
        """A wait a vendor asked for, bounded: finite, at most ``retry.max_retry_after_s`` (logged once)."""
        most = self.max_retry_after_s
        if seconds <= most:  # NaN fails this test too
            return seconds if seconds >= 0 else 0.0
        if not self._clamp_logged:
            self._clamp_logged = True
            logger.warning("%s asked to wait %.0f s (Retry-After); clamped to retry.max_retry_after_s = %.0f s "
                           "(logged once)", self.name, seconds, most)
        return most

    def _throttle_hold(self, after: float | None, holds: int) -> float:
        """How long a throttled answer holds the vendor's rate gate: its Retry-After (clamped) when usable
        (a positive number of seconds or a future date); else a backoff growing with each throttled answer in
        a row (``retry.base_delay_ms`` doubling up to ``retry.max_delay_ms``), counted once per hold (the
        answers to requests sent before the last hold are the same step), so a vendor answering 429 without a usable
        Retry-After sees a few requests a second, not as many as it can answer."""
        if holds == self._holds:  # a new step (the limit halved with it in ``_answered``)
            self._holds += 1
            self.throttled_in_a_row += 1
        if after:
            return self._clamp(after)
        r = self.adapter.settings.retry
        step = min(self.throttled_in_a_row, 32) - 1
        return min(r.base_delay_ms / 1000 * 2 ** max(0, step), r.max_delay_ms / 1000, self.max_retry_after_s)

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
