"""Admission: per vendor, the one answer to "can it take more": take now, hold, or park.

Behind it: the vendor's budget (``max_inflight_events``: the events it may hold without an outcome), its
circuit breaker, adaptive concurrency limit and rate gate (``processor.isolation``). Its three callers ask
it one question each:

* intake (``VendorPipeline.submit_many``): ``intake(n)`` says how many of ``n`` live events to take and
  why the rest are parked (park mode only): all of them while the breaker is open; what is beyond the
  budget while the vendor is impaired (breaker not closed, throttled, or its concurrency cut by
  back-pressure);
* the main loop's back-pressure: ``holds_source``, true while the vendor is at its budget and may not park
  (``on_outage: block``) or is healthy and merely busy (waiting costs nothing there, parking would write and
  read back every event); once true, until it is down to half its budget;
* the redrive of parked records: ``takes_nothing`` (breaker open or throttled: pause its retry partitions)
  and ``room(share)`` (how many redriven events it may take now within ``share`` of its budget; while
  half-open, one batch when it holds nothing: its probes).

Reading any of these changes nothing: the state they read moves on ``admit``/``release`` and ``tick(now)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from processor.isolation import AdaptiveLimit, BreakerState, CircuitBreaker, RateGate
from processor.vendors.base import BreakerSettings


class Admission:
    """Event loop only. ``unsettled``: the events admitted and not yet given an outcome."""

    def __init__(self, budget: int, parking: bool, max_batch: int, breaker: BreakerSettings, concurrency: int,
                 on_breaker: Callable[[BreakerState], None] | None = None,
                 on_limit: Callable[[int], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.parking = parking
        self.max_batch = max_batch
        self.clock = clock
        self.breaker = CircuitBreaker(breaker, on_breaker, clock)
        self.limit = AdaptiveLimit(concurrency, on_limit, clock=clock)
        self.gate = RateGate(clock)
        self.unsettled = 0
        self.holds_source = False

    # -- state changes ---------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self.breaker.tick(now)
        self._update_hold()

    def admit(self, n: int) -> None:
        self.unsettled += n
        self._update_hold()

    def release(self, n: int) -> None:
        self.unsettled -= n
        self._update_hold()

    def _update_hold(self) -> None:
        held = self.unsettled > self.budget // 2 if self.holds_source else self.unsettled >= self.budget
        self.holds_source = held and not (self.parking and self.impaired())

    # -- answers ---------------------------------------------------------------------------------------
    def impaired(self) -> bool:
        """Down, throttled or slowed: its breaker is not closed, its rate gate holds, or back-pressure cut its
        concurrency limit. Only an impaired vendor parks what overflows its budget."""
        return (self.breaker.state is not BreakerState.CLOSED or self.gate.wait_s() > 0
                or self.limit.current < self.limit.maximum)

    def intake(self, n: int) -> tuple[int, str]:
        """Of ``n`` live events, how many to take now; the rest are parked for the reason returned
        (``breaker_open`` or ``budget_full``; "" when all are taken)."""
        if not self.parking or not n:
            return n, ""
        self.breaker.tick(self.clock())
        if self.breaker.is_open():
            return 0, "breaker_open"
        room = self.budget - self.unsettled
        if room < n and self.impaired():  # a healthy vendor at its budget holds the source instead
            return max(0, room), "budget_full"
        return n, ""

    def takes_nothing(self) -> bool:
        """It takes nothing for a while: its breaker is open or its rate gate holds."""
        return self.gate.wait_s() > 0 or self.breaker.is_open()

    def room(self, share: float = 1.0) -> int:
        """How many more events it can take now, within ``share`` of its budget, without parking them (the
        redrive asks before it hands over). None while its breaker is open or its rate gate holds; while
        half-open, one batch when it holds nothing (its probes: more would only be parked again)."""
        if self.takes_nothing():
            return 0
        state = self.breaker.state
        if state is BreakerState.CLOSED:
            return max(0, max(1, int(self.budget * share)) - self.unsettled)  # a budget of 1 has room for 1
        return self.max_batch if state is BreakerState.HALF_OPEN and self.unsettled == 0 else 0


class InflightBound:
    """The relay-wide bound on unsettled messages (``relay.max_inflight_events``), with hysteresis: over
    it from the moment the count reaches the limit until it is down to ``resume_ratio`` of it, so the
    source does not pause and resume on every settled message."""

    def __init__(self, limit: int, resume_ratio: float) -> None:
        self.limit = limit
        self.resume_at = int(limit * resume_ratio)
        self.over = False

    def check(self, inflight: int) -> bool:
        """Whether fetching waits at this count."""
        if not self.over and inflight >= self.limit:
            self.over = True
        elif self.over and inflight <= self.resume_at:
            self.over = False
        return self.over
