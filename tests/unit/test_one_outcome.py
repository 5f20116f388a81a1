"""Exactly one outcome per (event, vendor): the findings of issue 17, each a scripted fake vendor or a fake
settlement that does what the reading of the old pipeline said would cost an event its outcome, or give it two."""

from __future__ import annotations

from collections import Counter

import httpx

from processor.isolation import AdaptiveLimit
from tests.unit.test_delivery import Harness, PerEventAdapter, answer


def per_event(h: Harness) -> None:
    h.adapter = h.pipe.adapter = h.pipe.service.adapter = PerEventAdapter(h.adapter.settings)


def outcomes(h: Harness) -> Counter[int]:
    """How many outcomes each offset got (delivered, dead-lettered or parked)."""
    return Counter([*h.settled, *(d[0] for d in h.dead), *(p[0] for p in h.parked)])


# -- finding 2: one exception fails its siblings ----------------------------------------------------


async def test_a_request_that_raises_costs_only_its_own_events_and_is_retried():
    garbled = {2}

    def script(call, offsets):
        if offsets[0] in garbled:
            garbled.clear()  # once: a proxy's bad gzip, then a good answer
            raise httpx.DecodingError("Error -3 while decompressing data")
        return answer(["ok"] * len(offsets))

    h = Harness(script, batch={"max_events": 5})
    per_event(h)
    await h.run(5)
    assert sorted(h.settled) == [0, 1, 2, 3, 4] and not h.dead  # 2xx siblings delivered once, 2 retried
    assert max(outcomes(h).values()) == 1
    assert h.pipe.admission.unsettled == 0


async def test_an_adapter_that_fails_on_one_answer_fails_only_that_request():
    h = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), batch={"max_events": 4})
    per_event(h)
    real = h.adapter.interpret

    def broken(request, response):
        if request.events[0].offset == 1:
            raise KeyError("results")
        return real(request, response)

    h.adapter.interpret = broken  # type: ignore[method-assign]
    await h.run(4)
    assert sorted(h.settled) == [0, 2, 3]
    assert [(d[0], d[1]) for d in h.dead] == [(1, "internal")]


# -- finding 1: double settlement on the last-resort path ------------------------------------------


async def test_an_exception_after_a_park_in_the_same_round_never_settles_the_parked_twice():
    h = Harness(lambda call, offsets: answer([], status=503), parking=True,
                retry={"max_attempts": 1, "base_delay_ms": 10, "max_delay_ms": 100},
                breaker={"consecutive_failures": 100})
    real_park = h.park

    def park_then_fail(source, *args, **kwargs):
        if h.parked:  # the second park of the round raises (a bug of ours below the pipeline)
            raise RuntimeError("bug")
        real_park(source, *args, **kwargs)

    h.park = park_then_fail  # type: ignore[method-assign]
    await h.run(3)
    assert [p[0] for p in h.parked] == [0]
    assert sorted(d[0] for d in h.dead) == [1, 2] and {d[1] for d in h.dead} == {"internal"}
    assert max(outcomes(h).values()) == 1  # 0 parked once, never dead-lettered as internal too
    assert h.pipe.admission.unsettled == 0


# -- finding 3: what the README promises ------------------------------------------------------------


async def test_429s_mixed_with_503s_count_no_attempt_for_the_throttled():
    """Block mode, two attempts: event 0 is throttled six times then taken; event 1 fails with 503. Event 1's
    attempts are not event 0's: event 0 is never exhausted."""

    def script(call, offsets):
        if offsets == [0]:
            throttled = sum(1 for c in h.calls if c == [0])
            if throttled <= 6:
                return answer([], status=429, headers={"Retry-After": "1"})
            return answer(["ok"])
        return answer([], status=503)

    h = Harness(script, batch={"max_events": 2}, breaker={"consecutive_failures": 100},
                retry={"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 100, "max_elapsed_s": 600})
    per_event(h)
    await h.run(2)
    assert h.settled == [0]
    assert [(d[0], d[1], d[4]) for d in h.dead] == [(1, "exhausted", 2)]


async def test_the_concurrency_limit_grows_on_successful_answers_only_never_on_5xx():
    h = Harness(lambda call, offsets: answer([], status=503), batch={"max_events": 1},
                breaker={"consecutive_failures": 100}, retry={"max_attempts": 3, "base_delay_ms": 10,
                                                               "max_delay_ms": 100})
    limit: AdaptiveLimit = h.pipe.admission.limit
    limit.limit = 2.0  # cut by earlier back-pressure
    await h.run(4)
    assert len(h.calls) == 12 and limit.current == 2
    ok = Harness(lambda call, offsets: answer(["ok"] * len(offsets)), batch={"max_events": 1})
    ok.pipe.admission.limit.limit = 2.0
    await ok.run(12)
    assert ok.pipe.admission.limit.current > 2  # 2xx answers at steady latency: +1 a window


async def test_a_revoke_between_response_and_settlement_never_dead_letters():
    def script(call, offsets):
        h.tracker.revoke("shop.events", 0)  # the rebalance lands while the vendor answers
        return answer(["reject"] * len(offsets))

    h = Harness(script)
    await h.run(3)
    assert not h.dead and not h.settled
    assert h.pipe.admission.unsettled == 0


async def test_park_after_s_counts_from_the_first_failure_not_from_queueing():
    """A batch that waited for room to be planned is not parked on its first failure for that wait."""
    h = Harness(lambda call, offsets: answer(["retry"] * len(offsets)) if call == 1 else answer(["ok"] * len(offsets)),
                parking=True, retry={"max_attempts": 4, "base_delay_ms": 10, "max_delay_ms": 100,
                                     "park_after_s": 5})
    real_room = h.pipe._room_to_plan

    async def slow_room() -> None:
        h.slept += 30  # queued 30 s behind other batches before it was planned
        await real_room()

    h.pipe._room_to_plan = slow_room  # type: ignore[method-assign]
    await h.run(2)
    assert sorted(h.settled) == [0, 1] and not h.parked


# -- finding 6: state that changes when read ----------------------------------------------------------


def test_reading_the_breaker_and_the_admission_changes_nothing():
    """The breaker turns half-open on an explicit ``tick(now)``; "does the vendor hold the source" moves with
    what the vendor holds, whether or not anyone looked in between."""
    h = Harness(lambda call, offsets: answer([]), parking=False, budget=10,
                breaker={"consecutive_failures": 1, "cooldown_s": 5})
    a = h.pipe.admission
    b = a.breaker
    b.record(False)
    assert b.is_open()
    b.clock = lambda: 1e12  # long past the cooldown
    seen = [b.state for _ in range(3)]
    assert len(set(seen)) == 1 and seen[0].name == "OPEN"  # looking does not move it
    b.tick(1e12)
    assert b.state.name == "HALF_OPEN"
    a.admit(10)  # at its budget (nobody looks), then down to 6: still above half, still holding
    a.release(4)
    assert a.holds_source and a.holds_source


def test_the_settlement_refuses_a_second_outcome_for_the_same_event_and_vendor_and_logs_it(caplog):
    import logging

    h = Harness(lambda call, offsets: answer([]))
    ev = h.events(1)[0]
    s = h.settlement
    with caplog.at_level(logging.ERROR, logger="processor.offsets"):
        assert s.park(ev, "fake", "retry_budget", "HTTP 503", 1, None, 0)
        assert not s.dead_letter(ev, "fake", "internal", None, "bug", 0, None)
        assert s.settle_many([ev], "fake") == 0
    assert [p[0] for p in h.parked] == [0] and not h.dead and not h.settled
    assert s.outcomes.refused == 2 and sum("BUG: a second outcome" in r.getMessage() for r in caplog.records) == 2
    assert s.settle_many([ev], "other") == 1  # another vendor's outcome for it is its own
