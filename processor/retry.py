"""The retry decision: what becomes of events whose request failed, pure (no I/O, no clock of its own).

One function, ``decide``, from (attempts, how long they have been failing, the delay before the next try,
the vendor's state) to retry in place after the delay, park, or dead-letter as exhausted; and one rule for
the ``retry.max_elapsed_s`` expiry, ``expired``, used by every path that can let an event wait (the
in-place retries, parking, the redrive of parked records).

* ``on_outage: park``: an open breaker parks at once; what has used ``retry.max_attempts`` counted attempts,
  or would still be failing ``retry.park_after_s`` after its first failure in this delivery, is parked.
* ``on_outage: block``: the same limits dead-letter it as exhausted, as does the next attempt falling past
  ``retry.max_elapsed_s`` from the first failure.
* A throttled answer (429, 503 with Retry-After) or the open breaker's refusal is not a counted attempt:
  the caller counts attempts per request, so one request's 503 never costs another request's events.
* Events waiting on the vendor (their last answer a throttle or a setup error) are never exhausted: in
  park mode they are parked (past ``park_after_s``), in block mode they wait in place; the parking path
  skips the ``max_elapsed_s`` expiry for them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from processor.vendors.base import RetrySettings


class Step(Enum):
    RETRY = "retry"
    PARK = "park"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    delay_s: float = 0.0
    why: str = ""  # PARK: breaker_open or retry_budget (processor_parked_total's reason)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random = random._inst) -> float:  # type: ignore[attr-defined]
    """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
    return rng.uniform(0, min(max_s, base_s * (2 ** (attempt - 1))))


def expired(first_failure_ms: int | None, at_ms: float, max_elapsed_s: float) -> bool:
    """Whether an attempt at ``at_ms`` (epoch ms) falls past ``max_elapsed_s`` from the first failure."""
    return first_failure_ms is not None and at_ms - first_failure_ms > max_elapsed_s * 1000


def decide(attempts: int, failing_s: float, first_failure_ms: int, now_ms: float, delay_s: float, *,
           parking: bool, breaker_open: bool, settings: RetrySettings, on_vendor: bool = False) -> Decision:
    """What to do with events that failed ``attempts`` counted times, the first time ``failing_s`` ago
    (``first_failure_ms`` in epoch ms), when the next try could be ``delay_s`` from ``now_ms``.
    ``on_vendor``: their last answer was a throttle or a setup error: waiting is what they need, so they
    are never exhausted (parked past ``park_after_s``, or retried in place without parking)."""
    if parking:
        if breaker_open:
            return Decision(Step.PARK, delay_s, "breaker_open")
        if attempts >= settings.max_attempts or failing_s + delay_s > settings.park_after_s:
            return Decision(Step.PARK, delay_s, "retry_budget")
        return Decision(Step.RETRY, delay_s)
    if on_vendor:
        return Decision(Step.RETRY, delay_s)
    if attempts >= settings.max_attempts or expired(first_failure_ms, now_ms + delay_s * 1000,
                                                   settings.max_elapsed_s):
        return Decision(Step.EXHAUSTED, delay_s)
    return Decision(Step.RETRY, delay_s)
