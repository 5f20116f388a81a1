"""The one consumer loop (``processor.consumer``): poll, hand-over, commit timing, stop and close, with a
scripted feed and a recording handler; the fenced member and the dead-letter feed with their real
classes over fake librdkafka consumers."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from processor.consumer import ConsumerLoop, Fetch, Stop
from processor.source import COMMIT_TIMEOUT_S, Poll
from tests.unit.test_source import in_worker, recording_source, tps

Positions = dict[tuple[str, int], int]


class ScriptedFeed:
    """Hands out the scripted batches one poll at a time (then empty polls); records every call. The polls
    after the first ``answered`` wait for ``release`` (a broker that does not answer)."""

    def __init__(self, batches: list[list[Any]], commit_ok: bool = True) -> None:
        self.batches = list(batches)
        self.commit_ok = commit_ok
        self.polls: list[tuple[int, float, bool | None, Positions | None, set[tuple[str, int]] | None]] = []
        self.commits: list[Positions] = []
        self.answered: int | None = None
        self.release = asyncio.Event()
        self.closed = False

    async def poll(self, max_messages: int, timeout: float, pause: bool | None = None,
                   commit: Positions | None = None, hold: set[tuple[str, int]] | None = None) -> Poll:
        self.polls.append((max_messages, timeout, pause, commit, hold))
        if self.answered is not None and len(self.polls) > self.answered:
            await self.release.wait()
        out = Poll()
        if commit:
            if self.commit_ok:
                out.committed = dict(commit)
            else:
                out.commit_failed = True
        out.raw = self.batches.pop(0) if self.batches else []
        out.lag = {("t", 0): len(self.batches)}
        return out

    async def commit(self, positions: Positions, timeout_s: float = COMMIT_TIMEOUT_S) -> bool:
        self.commits.append(dict(positions))
        return self.commit_ok

    async def close(self, timeout_s: float = 5.0) -> bool:
        self.closed = True
        return True


EVERY_TURN = Fetch(10, 0.0)


class Recorder:
    """A handler that records what the loop gives it; ``settle`` is what becomes committable."""

    def __init__(self, fetch: Fetch | None = EVERY_TURN, turns: int | None = None) -> None:
        self.fetch = fetch
        self.turns_left = turns  # finished after this many turns (None: never)
        self.batches: list[list[Any]] = []
        self.settled: Positions = {}
        self.done: Positions = {}
        self.results: list[tuple[Positions, Positions, bool]] = []

    def turn(self, now: float) -> Fetch | None:
        if self.turns_left is not None:
            self.turns_left -= 1
        return self.fetch

    def committable(self) -> Positions:
        return {k: v for k, v in self.settled.items() if self.done.get(k) != v}

    def committed(self, positions: Positions, lag: Positions, failed: bool) -> None:
        self.done.update(positions)
        self.results.append((dict(positions), dict(lag), failed))

    async def hand_over(self, raw: list[Any], stopping: asyncio.Event) -> None:
        self.batches.append(list(raw))
        if raw:
            self.settled[("t", 0)] = raw[-1] + 1

    def finished(self) -> bool:
        return self.turns_left is not None and self.turns_left <= 0


async def test_each_polled_batch_is_handed_over_in_order_with_what_the_handler_asked_for():
    feed = ScriptedFeed([[0, 1], [2], [3, 4, 5]])
    handler = Recorder(Fetch(7, 0.05, pause=False, hold={("t", 1)}), turns=4)
    await ConsumerLoop(feed, handler, commit_every_s=3600).run(asyncio.Event())
    assert handler.batches == [[0, 1], [2], [3, 4, 5], []]
    assert [p[:3] for p in feed.polls] == [(7, 0.05, False)] * 4 and all(p[4] == {("t", 1)} for p in feed.polls)
    assert [lag for _c, lag, _f in handler.results] == [{("t", 0): n} for n in (2, 1, 0, 0)]


async def test_the_commit_rides_on_the_poll_once_per_interval_and_only_what_settled():
    feed = ScriptedFeed([[0, 1], [2], [3]])
    handler = Recorder(turns=4)
    await ConsumerLoop(feed, handler, commit_every_s=0).run(asyncio.Event())
    # turn 1: nothing settled yet; then each turn commits what the previous hand-over settled
    assert [p[3] for p in feed.polls] == [None, {("t", 0): 2}, {("t", 0): 3}, {("t", 0): 4}]
    assert handler.done == {("t", 0): 4}

    feed = ScriptedFeed([[0, 1], [2], [3]])
    handler = Recorder(turns=4)
    await ConsumerLoop(feed, handler, commit_every_s=3600).run(asyncio.Event())
    assert [p[3] for p in feed.polls] == [None, None, None, None]  # the next one is an hour away
    assert handler.committable() == {("t", 0): 4}  # left for the last commit


async def test_a_refused_commit_is_reported_and_offered_again():
    feed = ScriptedFeed([[0], [1]], commit_ok=False)
    handler = Recorder(turns=3)
    await ConsumerLoop(feed, handler, commit_every_s=0).run(asyncio.Event())
    assert [p[3] for p in feed.polls] == [None, {("t", 0): 1}, {("t", 0): 2}]
    assert [f for _c, _l, f in handler.results] == [False, True, True]
    assert handler.done == {}


async def test_a_turn_without_a_poll_still_commits_in_time_and_hears_the_stop():
    feed = ScriptedFeed([])
    handler = Recorder(fetch=None)
    handler.settled = {("t", 0): 9}
    stopping = asyncio.Event()
    loop = ConsumerLoop(feed, handler, commit_every_s=0, idle_s=30)
    task = asyncio.create_task(loop.run(stopping))
    for _ in range(200):
        if feed.commits:
            break
        await asyncio.sleep(0.01)
    assert feed.commits == [{("t", 0): 9}] and feed.polls == []
    started = time.monotonic()
    stopping.set()  # heard within the idle wait (30 s)
    await asyncio.wait_for(task, 2)
    assert time.monotonic() - started < 1


async def test_a_stop_while_a_poll_is_out_leaves_it_and_never_hands_its_batch_over():
    feed = ScriptedFeed([[0], [1, 2]])
    feed.answered = 1  # the second poll waits on a broker that does not answer
    handler = Recorder()
    stopping = asyncio.Event()
    task = asyncio.create_task(ConsumerLoop(feed, handler, commit_every_s=3600).run(stopping))
    for _ in range(200):
        if len(feed.polls) >= 2:
            break
        await asyncio.sleep(0.01)
    assert handler.batches == [[0]] and len(feed.polls) == 2
    stopping.set()
    await asyncio.wait_for(task, 2)  # out at the stop, the poll still waiting
    feed.release.set()  # the poll comes back later: nothing of it is handed over
    for _ in range(3):
        await asyncio.sleep(0)
    assert handler.batches == [[0]] and feed.batches == []


async def test_the_last_commit_is_tried_as_often_as_asked_then_said_not_committed(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="processor.consumer")
    feed = ScriptedFeed([], commit_ok=False)
    handler = Recorder()
    handler.settled = {("t", 0): 5}
    loop = ConsumerLoop(feed, handler, commit_every_s=3600)
    assert not await loop.commit_settled(tries=3)
    assert feed.commits == [{("t", 0): 5}] * 3 and handler.results == [({}, {}, True)]
    assert any("not committed: t[0]@5" in m for m in caplog.messages)
    feed.commit_ok = True
    assert await loop.commit_settled() and handler.done == {("t", 0): 5}
    assert any(m == "committed t[0]@5" for m in caplog.messages)
    feed.commits.clear()
    assert await loop.commit_settled() and feed.commits == []  # nothing new settled: not asked
    assert await loop.close() and feed.closed


async def test_a_fenced_member_commits_nothing_more_from_the_loop_nor_at_its_close(caplog):
    from confluent_kafka import KafkaError

    source, fake = await recording_source(None, {})
    await in_worker(source._assign_cb, fake, tps(0))
    fake.refuse = KafkaError.UNKNOWN_MEMBER_ID
    handler = Recorder(fetch=Fetch(10, 0), turns=3)
    handler.settled = {("t", 0): 3}
    loop = ConsumerLoop(source, handler, commit_every_s=0)
    await loop.run(asyncio.Event())
    assert source.fenced
    handler.settled = {("t", 0): 4}
    assert not await loop.commit_settled(tries=3)
    assert fake.calls == ["commit 0@3"]  # the first refusal only: never asked again
    assert [f for _c, _l, f in handler.results] == [True, True, True, True]
    source.executor.shutdown()


async def test_the_dead_letter_feed_commits_with_its_poll_and_closes_within_its_bound(caplog):
    from concurrent.futures import ThreadPoolExecutor

    from processor.dlq.topic import DlqFeed

    class Reader:
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.hang = threading.Event()

        def commit(self, positions: Positions) -> bool:
            self.calls.append(f"commit {positions}")
            return True

        def consume(self, n: int, timeout_s: float) -> list[int]:
            self.calls.append(f"consume {n}")
            return [1, 2]

        def close(self) -> None:
            self.hang.wait(10)  # librdkafka's close waiting on a broker that does not answer

    reader = Reader()
    feed = DlqFeed(reader, ThreadPoolExecutor(1))  # type: ignore[arg-type]
    poll = await feed.poll(5, 0.1, commit={("dlq", 0): 7})
    assert reader.calls == ["commit {('dlq', 0): 7}", "consume 5"]
    assert poll.committed == {("dlq", 0): 7} and poll.raw == [1, 2]
    started = time.monotonic()
    assert not await feed.close(timeout_s=0.2)
    assert time.monotonic() - started < 1
    assert any("did not close within" in m for m in caplog.messages)
    reader.hang.set()


def test_the_first_stop_arms_the_watchdog_once_and_a_second_gives_up_waiting(monkeypatch):
    import faulthandler

    armed: list[float] = []
    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda after, exit, file: armed.append(after))
    cancelled: list[bool] = []
    monkeypatch.setattr(faulthandler, "cancel_dump_traceback_later", lambda: cancelled.append(True))
    gave_up: list[bool] = []
    stop = Stop(5.0, on_abandon=lambda: gave_up.append(True), margin_s=12.0)
    stop.request()
    assert stop.event.is_set() and not stop.abandon and armed == [17.0]
    stop.arm_watchdog()  # armed once
    stop.request()
    assert stop.abandon and gave_up == [True] and armed == [17.0]
    stop.disarm()
    assert cancelled == [True] and not stop.armed


@pytest.mark.parametrize("which", ["SIGTERM", "SIGINT"])
async def test_a_signal_stops_through_the_plain_handler_and_the_old_handler_comes_back(which, monkeypatch):
    import faulthandler
    import os
    import signal

    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda after, exit, file: None)
    sig = getattr(signal, which)
    before = signal.getsignal(sig)
    stop = Stop(1.0)
    stop.install(asyncio.get_running_loop())
    try:
        os.kill(os.getpid(), sig)
        await asyncio.wait_for(stop.event.wait(), 2)
        assert stop.armed
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) is before
