"""Throttling: Retry-After read as a bounded number (finite seconds or an HTTP date, clamped to the
vendor's ``retry.max_retry_after_s``), a 429 never failing an event, accepted requests settling whatever
their siblings wait for, and consecutive 429s without a usable Retry-After slowing the vendor down."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from processor.service import parse_retry_after
from tests.unit.test_delivery import Harness, PerEventAdapter, answer

NOW = 1_800_000_000.0  # a fixed "now" (epoch seconds) for the date cases


def _date(offset_s: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset_s, UTC), usegmt=True)


@pytest.mark.parametrize(("value", "expected"), [
    # the confirmed failures first: these reached the rate gate and the parking path as they were
    ("inf", None), ("1e400", None), ("nan", None), ("-1", None), ("Infinity", None), ("-inf", None),
    ("86400", 86400.0),  # a finite day: usable, clamped by the caller
    # numbers
    ("0", 0.0), ("3", 3.0), (" 7 ", 7.0), ("1.5", 1.5), ("120", 120.0),
    ("99999999999999999999999999", 1e26),  # finite: the caller's clamp bounds it
    # garbage
    (None, None), ("", None), ("   ", None), ("garbage", None), ("3s", None), ("0x10", None), ("1_000", None),
    ("+5", None), ("5 5", None), ("\u0665", None),  # an Arabic-Indic five: int() takes it, HTTP does not
    # HTTP dates
    (_date(30), 30.0), (_date(-30), 0.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    (_date(10 * 365 * 86400), 10 * 365 * 86400.0),  # far in the future: finite, clamped by the caller
    ("Fri, 31 Dec 9999 23:59:59 GMT", 253402300799.0 - NOW),
    ("Sun, 31 Dec 10000 23:59:59 GMT", None), ("Mon, 99 Foo 2026 99:99:99 GMT", None),
])
def test_parse_retry_after_table(value, expected):
    got = parse_retry_after(value, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isfinite(got) and got == pytest.approx(expected, abs=1)


def test_parse_retry_after_reads_a_date_against_the_clock():
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    got = parse_retry_after(future)
    assert got is not None and 50 < got <= 60


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-1", "garbage", "86400",
                                   "Fri, 31 Dec 9999 23:59:59 GMT"])
@pytest.mark.parametrize("parking", [False, True])
async def test_a_429_with_any_retry_after_never_dead_letters_and_waits_at_most_the_clamp(value, parking):
    """``inf`` raised OverflowError in the parking path (dead letters as ``internal``), ``86400`` was
    dead-lettered as ``exhausted`` after 0 attempts: every event is delivered, nothing waits past the clamp."""

    def script(call, offsets):
        if call <= 3:
            return answer([], status=429, headers={"Retry-After": value})
        return answer(["ok"] * len(offsets))

    h = Harness(script, parking=parking,
                retry={"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 100, "max_elapsed_s": 60,
                       "park_after_s": 600, "max_retry_after_s": 20})
    await h.run(3)
    assert not h.dead
    assert sorted(h.settled) == [0, 1, 2]
    assert h.sleeps and max(h.sleeps) <= 20
    assert all(math.isfinite(s) for s in h.sleeps)


async def test_a_long_throttle_parks_and_never_exhausts_the_retry_budget():
    """A 429 whose wait passes ``retry.max_elapsed_s`` from the first failure: parked, not exhausted."""
    h = Harness(lambda call, offsets: answer([], status=429, headers={"Retry-After": "86400"}), parking=True,
                retry={"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 100, "max_elapsed_s": 5,
                       "park_after_s": 1, "max_retry_after_s": 30})
    await h.run(2)
    assert not h.dead and sorted(p[0] for p in h.parked) == [0, 1]
    now_ms = time.time() * 1000
    assert all(now_ms < p[4] <= now_ms + 31_000 for p in h.parked)  # due within the clamp


async def test_a_throttle_in_block_mode_waits_past_the_elapsed_budget_without_a_dead_letter():
    def script(call, offsets):
        if call <= 4:
            return answer([], status=429, headers={"Retry-After": "50"})
        return answer(["ok"] * len(offsets))

    h = Harness(script, parking=False,
                retry={"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 100, "max_elapsed_s": 40})
    await h.run(2)
    assert not h.dead and sorted(h.settled) == [0, 1]


async def test_a_clamped_retry_after_is_logged_once_per_vendor(caplog):
    def script(call, offsets):
        if call <= 3:
            return answer([], status=429, headers={"Retry-After": "86400"})
        return answer(["ok"] * len(offsets))

    h = Harness(script, retry={"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 100,
                               "max_elapsed_s": 600, "max_retry_after_s": 20})
    with caplog.at_level(logging.WARNING, logger="processor.service"):
        await h.run(1)
    clamped = [r for r in caplog.records if "clamped" in r.getMessage()]
    assert len(clamped) == 1 and "86400" in clamped[0].getMessage() and "fake" in clamped[0].getMessage()


async def test_the_accepted_requests_of_a_batch_settle_while_their_siblings_wait_at_the_gate():
    """One request accepted, its sibling throttled for long: the accepted events settle at once, not when
    the throttled sibling is finally answered."""
    release = asyncio.Event()

    def script(call, offsets):
        if offsets == [1] and call <= 2:
            return answer([], status=429, headers={"Retry-After": "100"})
        return answer(["ok"] * len(offsets))

    h = Harness(script, concurrency=1, batch={"max_events": 3},
                retry={"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 100, "max_elapsed_s": 600})
    h.adapter = h.pipe.adapter = h.pipe.service.adapter = PerEventAdapter(h.adapter.settings)

    async def blocked_sleep(d: float) -> None:
        h.sleeps.append(d)
        await release.wait()

    h.pipe.sleep = blocked_sleep
    h.pipe.submit_many(h.events(3))
    h.pipe.flush()
    async with asyncio.timeout(5):
        while len(h.sleeps) < 1:
            await asyncio.sleep(0.01)
    assert h.settled == [0]  # request 0 accepted; request 1 throttled; request 2 waits at the gate
    release.set()
    assert await h.pipe.drain(5)
    assert sorted(h.settled) == [0, 1, 2] and not h.dead
    await h.pipe.close()


@pytest.mark.parametrize("value", [None, "0", "Wed, 21 Oct 2015 07:28:00 GMT", "garbage"])
async def test_consecutive_429s_without_a_usable_retry_after_back_off_growing(value):
    """Without a usable Retry-After (absent, 0, a past date), each 429 in a row holds the vendor longer:
    the throttling vendor sees a few requests a second, not thousands."""
    headers = {"Retry-After": value} if value is not None else {}

    def script(call, offsets):
        if call <= 8:
            return answer([], status=429, headers=headers)
        return answer(["ok"] * len(offsets))

    h = Harness(script, retry={"max_attempts": 2, "base_delay_ms": 100, "max_delay_ms": 5000,
                               "max_elapsed_s": 600})
    await h.run(2)
    assert sorted(h.settled) == [0, 1] and not h.dead and len(h.calls) == 9
    # 8 requests throttled in a row: the vendor waited at least 0.1 + 0.2 + ... + 12.8 (capped at 5) between them
    assert sum(h.sleeps) >= 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 + 5 - 0.01
    assert max(h.sleeps) <= 5


async def test_the_throttle_backoff_resets_on_an_accepted_answer():
    def script(call, offsets):
        if call in (1, 2, 3):
            return answer([], status=429)
        return answer(["ok"] * len(offsets))

    h = Harness(script, retry={"max_attempts": 2, "base_delay_ms": 100, "max_delay_ms": 5000,
                               "max_elapsed_s": 600})
    await h.run(1)
    assert h.settled == [0] and len(h.calls) == 4
    assert h.pipe.service.throttled_in_a_row == 0


@pytest.mark.parametrize("parking", [False, True])
def test_events_waiting_on_the_vendor_are_never_exhausted(parking):
    from processor.retry import Step, decide
    from processor.vendors.base import RetrySettings

    s = RetrySettings(max_attempts=3, max_elapsed_s=60, park_after_s=10)
    late = decide(1, 5000, 0, 10_000_000, 300, parking=parking, breaker_open=False, settings=s, on_vendor=True)
    assert late.step is (Step.PARK if parking else Step.RETRY)
    failed = decide(1, 5000, 0, 10_000_000, 300, parking=parking, breaker_open=False, settings=s)
    assert failed.step is (Step.PARK if parking else Step.EXHAUSTED)


async def test_each_throttle_step_halves_the_concurrency_limit_at_once():
    """Consecutive holds of the gate halve the limit each time (not once a second at most): a vendor that
    keeps throttling is asked by one request at a time within a few answers."""

    limits: list[int] = []

    def script(call, offsets):
        limits.append(h.pipe.admission.limit.current)
        if call <= 4:
            return answer([], status=429, headers={"Retry-After": "0"})
        return answer(["ok"] * len(offsets))

    h = Harness(script, concurrency=16, retry={"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 100,
                                               "max_elapsed_s": 600})
    h.pipe.admission.limit.clock = lambda: 5.0  # the clock stands still: only the steps halve it
    await h.run(1)
    assert limits == [16, 8, 4, 2, 1]
