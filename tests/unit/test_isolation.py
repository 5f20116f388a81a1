"""The vendor isolation state machines: breaker transitions, AIMD concurrency, the rate gate."""

from __future__ import annotations

import asyncio

from processor.isolation import AdaptiveLimit, BreakerState, CircuitBreaker, RateGate
from processor.vendors.base import BreakerSettings


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def breaker(**over) -> tuple[CircuitBreaker, Clock, list[BreakerState]]:
    clock, seen = Clock(), []
    b = CircuitBreaker(BreakerSettings(**{"consecutive_failures": 3, "cooldown_s": 5, "max_cooldown_s": 20,
                                          "probes": 2, **over}), seen.append, clock)
    return b, clock, seen


def test_consecutive_failures_open_then_cooldown_half_opens_and_probes_close():
    b, clock, seen = breaker()
    for ok in (False, False, True, False, False):  # a success resets the run
        assert b.allow()
        b.record(ok)
    assert b.state is BreakerState.CLOSED
    b.record(False)
    assert b.state is BreakerState.OPEN and not b.allow() and b.reopens_in() == 5
    clock.t += 5
    assert b.state is BreakerState.OPEN  # reading changes nothing: the ticker moves it
    b.tick(clock.t)
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and b.allow() and not b.allow()  # two probes, no more
    b.record(True)
    assert b.state is BreakerState.HALF_OPEN
    b.record(True)
    assert b.state is BreakerState.CLOSED and b.allow()
    assert seen == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_failed_probe_reopens_with_a_longer_cooldown_bounded():
    b, clock, _ = breaker()
    for _ in range(3):
        b.record(False)
    cooldowns = []
    for _ in range(4):
        cooldowns.append(b.reopens_in())
        clock.t += b.reopens_in()
        assert b.allow()
        b.record(False)
    assert cooldowns == [5, 10, 20, 20]
    clock.t += 20
    assert b.allow() and b.allow()
    b.record(True)
    b.record(True)
    assert b.state is BreakerState.CLOSED
    for _ in range(3):
        b.record(False)
    assert b.reopens_in() == 5  # closing reset the cooldown


def test_a_failure_ratio_over_the_window_opens_with_a_minimum_volume():
    b, _, _ = breaker(consecutive_failures=100, failure_ratio=0.5, min_requests=10, window_s=10)
    for _ in range(4):
        b.record(True)
        b.record(False)
    assert b.state is BreakerState.CLOSED  # 8 requests: below the minimum volume
    b.record(True)
    b.record(False)
    assert b.state is BreakerState.OPEN
    b2, clock2, _ = breaker(consecutive_failures=100, failure_ratio=0.5, min_requests=10, window_s=10)
    for _ in range(5):
        b2.record(False)
        clock2.t += 11  # old failures leave the window
        b2.record(True)
        b2.record(True)
    assert b2.state is BreakerState.CLOSED


def test_an_abandoned_probe_gives_its_place_back():
    b, clock, _ = breaker(probes=1)
    for _ in range(3):
        b.record(False)
    clock.t += 5
    assert b.allow() and not b.allow()
    b.abandon()
    assert b.allow()


async def test_aimd_halves_on_backpressure_once_a_window_and_grows_back_additively():
    clock, seen = Clock(), []
    lim = AdaptiveLimit(8, seen.append, decrease_every_s=1.0, clock=clock)
    await lim.acquire()
    lim.release(ok=True, backpressure=True)
    await lim.acquire()
    lim.release(ok=True, backpressure=True)  # within the same second: no second cut
    assert lim.current == 4 and seen == [4]
    clock.t += 1
    await lim.acquire()
    lim.release(ok=False, backpressure=True)
    assert lim.current == 2
    for _ in range(30):
        await lim.acquire()
        lim.release(ok=True, latency_s=0.05)
    assert 2 < lim.current <= 8
    for _ in range(200):
        await lim.acquire()
        lim.release(ok=True, latency_s=0.05)
    assert lim.current == 8  # bounded by the configured concurrency
    clock.t += 1
    await lim.acquire()
    lim.release(ok=True, latency_s=5.0)  # a latency spike counts as back-pressure
    assert lim.current == 4


async def test_the_limit_bounds_concurrent_holders_and_wakes_waiters_in_order():
    lim = AdaptiveLimit(2)
    order: list[int] = []

    async def worker(i: int) -> None:
        await lim.acquire()
        order.append(i)
        assert lim.in_use <= 2
        await asyncio.sleep(0)
        lim.release(ok=True, latency_s=0.01)

    await asyncio.gather(*(worker(i) for i in range(6)))
    assert order == list(range(6)) and lim.in_use == 0


async def test_try_acquire_takes_a_free_place_and_never_jumps_the_queue():
    lim = AdaptiveLimit(1)
    assert lim.try_acquire() and lim.in_use == 1
    assert not lim.try_acquire()  # full
    waiter = asyncio.ensure_future(lim.acquire())
    await asyncio.sleep(0)
    lim.limit = 2.0  # room again, but a waiter came first
    assert not lim.try_acquire() and lim.in_use == 1
    lim.release(ok=True, latency_s=0.01)  # its place goes to the waiter
    await waiter
    assert lim.in_use == 1 and lim.try_acquire() and lim.in_use == 2


def test_a_closed_breaker_allows_without_reading_the_clock_and_an_open_one_half_opens_when_asked():
    reads = 0
    b, clock, seen = breaker()

    def counting() -> float:
        nonlocal reads
        reads += 1
        return clock.t

    b.clock = counting
    assert b.allow() and reads == 0
    for _ in range(3):
        b.record(False)
    assert not b.allow()
    clock.t += 5
    assert b.allow() and seen == [BreakerState.OPEN, BreakerState.HALF_OPEN]


async def test_the_gate_holds_every_request_until_the_time_given():
    clock = Clock()
    gate = RateGate(clock)
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        clock.t += s

    await gate.wait(sleep)
    assert slept == []
    gate.hold(5)
    gate.hold(2)  # a shorter hold never shortens the wait
    await gate.wait(sleep)
    assert slept == [5]
    assert gate.wait_s() == 0
