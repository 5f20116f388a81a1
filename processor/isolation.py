"""Vendor isolation: what keeps one vendor's outage, slowness or throttling its own problem.

Per vendor, three small state machines behind the vendor's admission policy (``processor.admission``)
and used by its request service (``processor.service``):

* ``CircuitBreaker``: closed -> open on sustained failure (consecutive failed requests, or a failure
  ratio over a window with a minimum volume); open -> half-open after a cooldown that doubles while
  failures continue (bounded); half-open lets a few probe requests through and closes when they all
  succeed, re-opens on the first that fails. A failure is a request with no answer (timeout, connect
  error) or a 5xx other than 501; a throttling answer (429, 503 with Retry-After) is not a failure,
  it is back-pressure (below), and a 4xx is the vendor working.
* ``AdaptiveLimit``: the number of concurrent requests, AIMD as in Vector's adaptive request
  concurrency: +1 per window of successful answers (not 5xx, not throttled) at steady latency, halved on back-pressure
  (429, 503 with Retry-After, timeouts) or a latency spike, at most once per ``decrease_every_s``;
  bounded by the vendor's configured ``concurrency``.
* ``RateGate``: after a 429 (or a 503 with Retry-After) no request goes to the vendor until the time
  it gave (bounded by the request service: finite, clamped to ``retry.max_retry_after_s``; without a usable
  Retry-After a backoff growing with each throttled answer in a row): the whole vendor slows down, not one
  batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import IntEnum

from processor.vendors.base import BreakerSettings

logger = logging.getLogger(__name__)


class BreakerState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Event loop only. ``on_change(state)`` is called on every transition."""

    def __init__(self, settings: BreakerSettings, on_change: Callable[[BreakerState], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self.clock = clock
        self.on_change = on_change
        self._state = BreakerState.CLOSED
        self.consecutive = 0
        self.window: deque[list[float]] = deque()  # [second, requests, failures]
        self.cooldown = settings.cooldown_s
        self.opened_at = 0.0
        self.probes_out = 0
        self.probes_ok = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    def tick(self, now: float) -> None:
        """Open -> half-open once the cooldown has passed (the relay's ticker calls this)."""
        if self._state is BreakerState.OPEN and now >= self.opened_at + self.cooldown:
            self._set(BreakerState.HALF_OPEN)

    def is_open(self) -> bool:
        return self._state is BreakerState.OPEN

    def reopens_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        return max(0.0, self.opened_at + self.cooldown - self.clock()) if self.is_open() else 0.0

    def allow(self) -> bool:
        """May a request go now? Half-open: only while fewer than ``probes`` probes are out."""
        if self._state is BreakerState.CLOSED:  # tick moves only an open breaker
            return True
        self.tick(self.clock())
        state = self._state
        if state is BreakerState.HALF_OPEN and self.probes_out + self.probes_ok < self.s.probes:
            self.probes_out += 1
            return True
        return False

    def record(self, ok: bool) -> None:
        """The answer (or its absence) of a request ``allow`` let through."""
        state = self._state
        if state is BreakerState.HALF_OPEN:
            self.probes_out = max(0, self.probes_out - 1)
            if not ok:
                self._open(self.cooldown * 2)
            else:
                self.probes_ok += 1
                if self.probes_ok >= self.s.probes:
                    self._close()
            return
        if state is BreakerState.OPEN:  # an answer to a request sent before it opened
            return
        self.consecutive = 0 if ok else self.consecutive + 1
        now = self.clock()
        sec = float(int(now))
        w = self.window
        if not w or w[-1][0] != sec:
            w.append([sec, 0, 0])
        w[-1][1] += 1
        if not ok:
            w[-1][2] += 1
        while w and w[0][0] <= now - self.s.window_s:
            w.popleft()
        if ok:
            return
        if self.consecutive >= self.s.consecutive_failures:
            self._open(self.s.cooldown_s)
            return
        total = sum(b[1] for b in w)
        if total >= self.s.min_requests and sum(b[2] for b in w) >= self.s.failure_ratio * total:
            self._open(self.s.cooldown_s)

    def abandon(self) -> None:
        """A request ``allow`` let through ended without an answer of the vendor's (cancelled)."""
        if self._state is BreakerState.HALF_OPEN:
            self.probes_out = max(0, self.probes_out - 1)

    def _open(self, cooldown: float) -> None:
        self.cooldown = min(self.s.max_cooldown_s, cooldown)
        self.opened_at = self.clock()
        self.probes_out = self.probes_ok = 0
        self._set(BreakerState.OPEN)

    def _close(self) -> None:
        self.cooldown = self.s.cooldown_s
        self.consecutive = 0
        self.window.clear()
        self._set(BreakerState.CLOSED)

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if state is BreakerState.HALF_OPEN:
                self.probes_out = self.probes_ok = 0
            if self.on_change is not None:
                self.on_change(state)


class AdaptiveLimit:
    """A concurrency limit that moves (AIMD). ``acquire`` before a request, ``release`` after it with
    what its answer says. Event loop only."""

    def __init__(self, maximum: int, on_change: Callable[[int], None] | None = None,
                 decrease_every_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = maximum
        self.limit = float(maximum)
        self.in_use = 0  # requests holding a place now
        self.on_change = on_change
        self.decrease_every_s = decrease_every_s
        self.clock = clock
        self.rtt: float | None = None  # EWMA of successful requests' latency
        self._last_decrease = -1e18
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    def try_acquire(self) -> bool:
        """A place now if one is free and nobody waits for one (``acquire`` without the await)."""
        if self.in_use < self.current and not self._waiters:
            self.in_use += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its place over: inflight was counted for us
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release_one()  # it was handed a place just before the cancel: give it on
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self, *, ok: bool, backpressure: bool = False, latency_s: float | None = None) -> None:
        """``backpressure``: 429, 503 with Retry-After, a timeout. ``ok``: a successful answer (not a 5xx,
        not throttled): only those, at steady latency, grow the limit."""
        if backpressure:
            self._decrease()
        elif ok and latency_s is not None:
            rtt = self.rtt
            if rtt is not None and latency_s > max(3 * rtt, rtt + 0.5):
                self._decrease()
            else:
                self.rtt = latency_s if rtt is None else 0.9 * rtt + 0.1 * latency_s
                if self.limit < self.maximum:
                    before = self.current
                    self.limit = min(float(self.maximum), self.limit + 1 / self.limit)
                    if self.current != before and self.on_change is not None:
                        self.on_change(self.current)
        self._release_one()

    def _release_one(self) -> None:
        self.in_use -= 1
        while self._waiters and self.in_use < self.current:
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_use += 1
                fut.set_result(None)

    def throttled(self) -> None:
        """A vendor's new throttle (not one answer among a burst's): halved now, whenever the last cut was:
        a vendor that keeps answering 429 is asked by fewer requests at once with each hold of its gate."""
        self._last_decrease = -1e18
        self._decrease()

    def _decrease(self) -> None:
        now = self.clock()
        if now - self._last_decrease < self.decrease_every_s:
            return
        self._last_decrease = now
        before = self.current
        self.limit = max(1.0, self.limit / 2)
        if self.current != before and self.on_change is not None:
            self.on_change(self.current)


class RateGate:
    """No request to the vendor before ``not_before`` (monotonic seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.not_before = 0.0

    def hold(self, seconds: float) -> None:
        self.not_before = max(self.not_before, self.clock() + seconds)

    def wait_s(self) -> float:
        return max(0.0, self.not_before - self.clock())

    async def wait(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Until ``not_before``; again if a later answer moved it while this waited."""
        while True:
            target = self.not_before
            left = target - self.clock()
            if left <= 0:
                return
            await sleep(left)
            if self.not_before == target:
                return
