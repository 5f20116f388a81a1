"""The one consumer loop: poll, hand-over, commit timing, stop and close, for every reader of Kafka.

Three things read Kafka, and each is this loop with its own handler:

=============  ====================================  ==================================  ==========================
               the live relay (``app.Relay``)        the parked redrive                  ``dlq replay``
                                                     (``parked.ParkedRedrive``)          (``dlq.replay._Replay``)
=============  ====================================  ==================================  ==========================
feed           ``source.KafkaSource``: the input     ``KafkaSource``: the retry topics,  ``dlq.topic.DlqFeed``: the
               topics, in the relay's group          in the redrive group                dead-letter topic, assigned
                                                                                         up to its end as of the start
poll           up to ``kafka.consume_batch``; all    up to ``kafka.consume_batch``; the  up to a chunk (the rate cap's
               partitions paused past the in-flight  partitions whose reservoir is full  fifth of a second); not at
               bound or while a vendor holds the     or whose head is not due held       all at the in-flight bound or
               source; those waiting for the         (paused one by one)                 once read to the end
               registry held
hand-over      decode (waiting, bounded, for the     the reservoir takes the records;    wait for the registry; the
               registry), route to the vendors'      once the registry knows their ids,  redrive's triage, then the
               pipelines                             the due heads go to their vendors'  vendor's pipeline (or the
                                                     pipelines                           dry run's plan)
commit         every ``relay.commit_interval_s``,    every ``relay.commit_interval_s``,  every 0.2 s; the last one
               with the poll; nothing after a fatal  with the poll                       tried 3 times
               consumer error
stop           SIGTERM/SIGINT (``Stop``), a fatal    the relay's stop                    SIGTERM/SIGINT (``Stop``)
               error (``Relay.fail``)
close          drain (grace), last commit, leave     last commit, leave the group, at    drain (grace), last commit,
               the group (bounded)                   once with the relay's               close the reader (bounded)
=============  ====================================  ==================================  ==========================

What the loop owns: the turn (the handler's timers, then a poll asking what the handler wants), the
commit's timing (every ``commit_every_s``, carried by the poll, or on its own while nothing is polled),
the stop (a poll still out when it comes is left: what it brings back is never handed over, so it is
redelivered), and the close: the last commit, bounded and never for a member the group fenced
(``KafkaSource`` refuses), then the feed's bounded close. What the handler owns: what a poll asks for
(``Fetch``), what a polled batch becomes (``hand_over``), what is committable, what a commit's result
means to it, and when a bounded run is done.

``Stop`` is the stop of a run: the first SIGTERM/SIGINT arms the watchdog and asks the loop to stop;
a second one gives up waiting for in-flight work.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from processor.source import CLOSE_TIMEOUT_S, COMMIT_TIMEOUT_S, Poll

logger = logging.getLogger(__name__)

Positions = dict[tuple[str, int], int]
# SIGTERM: the drain takes up to relay.shutdown_grace_s; what follows (the last commits, leaving the
# consumer groups, the producer's last acknowledgements) fits in this margin, each step bounded
CLOSE_MARGIN_S = 12.0


@dataclass(frozen=True, slots=True)
class Fetch:
    """What the next poll asks for: up to ``max_messages`` within ``timeout_s``; ``pause`` every assigned
    partition or none (None: as they are); ``hold`` exactly these partitions paused (None: as they are)."""

    max_messages: int
    timeout_s: float
    pause: bool | None = None
    hold: set[tuple[str, int]] | None = None


class Feed(Protocol):
    """A consumer the loop drives (``source.KafkaSource``, ``dlq.topic.DlqFeed``). Each call is bounded."""

    async def poll(self, max_messages: int, timeout: float, pause: bool | None = None,
                   commit: Positions | None = None, hold: set[tuple[str, int]] | None = None) -> Poll: ...

    async def commit(self, positions: Positions, timeout_s: float = COMMIT_TIMEOUT_S) -> bool: ...

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool: ...


class Handler(Protocol):
    """What one reader of Kafka does with the loop's polls."""

    def turn(self, now: float) -> Fetch | None:
        """Once a turn, before its poll: the handler's own timers run; what the poll asks for (None: no
        poll this turn, the loop waits a moment: at a bound, or read to the end)."""
        ...

    def committable(self) -> Positions:
        """The positions settled since the last commit (empty: nothing to commit)."""
        ...

    def committed(self, positions: Positions, lag: Positions, failed: bool) -> None:
        """After a poll or a commit: what the broker took, the lag it read, whether a commit failed."""
        ...

    async def hand_over(self, raw: list[Any], stopping: asyncio.Event) -> None:
        """A polled batch (possibly empty), in consume order; waits in it are bounded and hear the stop."""
        ...

    def finished(self) -> bool:
        """A bounded run is done (the live relay and the redrive never are)."""
        ...


class ConsumerLoop:
    """Poll, hand over, commit in time, stop, close: one feed, one handler (see the module's docstring)."""

    def __init__(self, feed: Feed, handler: Handler, commit_every_s: float, idle_s: float = 0.02) -> None:
        self.feed = feed
        self.handler = handler
        self.commit_every_s = commit_every_s
        self.idle_s = idle_s  # a turn without a poll waits this long (or for the stop)
        self._commit_due = 0.0

    async def run(self, stopping: asyncio.Event) -> None:
        """Turn until ``stopping`` is set or the handler is finished."""
        handler = self.handler
        while not stopping.is_set() and not handler.finished():
            now = time.monotonic()
            commit = None
            if now >= self._commit_due:
                self._commit_due = now + self.commit_every_s
                commit = handler.committable() or None
            fetch = handler.turn(now)
            if fetch is None:
                if commit:
                    ok = await self.feed.commit(commit)
                    handler.committed(commit if ok else {}, {}, not ok)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self.idle_s)
                continue
            poll = await self._poll_until(stopping, fetch, commit)
            if poll is None:
                break
            handler.committed(poll.committed, poll.lag, poll.commit_failed)
            await handler.hand_over(poll.raw, stopping)

    async def _poll_until(self, stopping: asyncio.Event, fetch: Fetch, commit: Positions | None) -> Poll | None:
        """The poll, or None as soon as ``stopping`` is set while it is still out (a commit in it waiting
        for a broker that does not answer): the loop goes to its close, whose steps are bounded; what the
        abandoned poll brings back is never handed over, so it is redelivered."""
        fut = asyncio.ensure_future(self.feed.poll(fetch.max_messages, fetch.timeout_s, fetch.pause, commit,
                                                   fetch.hold))
        if not stopping.is_set():
            stop = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait([fut, stop], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
        if fut.done():
            return fut.result()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: nothing logged for it
        return None

    async def commit_settled(self, tries: int = 1) -> bool:
        """The last commit: what settled (nothing when the handler says so, e.g. after a fatal consumer
        error), each try bounded by ``COMMIT_TIMEOUT_S``; a fenced member's feed refuses at once. Logged
        as committed only when the broker took it."""
        positions = self.handler.committable()
        if not positions:
            return True
        where = ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(positions.items()))
        for _ in range(max(1, tries)):
            if await self.feed.commit(positions):
                self.handler.committed(positions, {}, False)
                logger.info("committed %s", where)
                return True
        self.handler.committed({}, {}, True)
        logger.warning("not committed: %s (what settled since the last commit is read again)", where)
        return False

    async def close(self) -> bool:
        """Leave (bounded by the feed: ``CLOSE_TIMEOUT_S``); False when it did not finish in time."""
        return await self.feed.close()


class Stop:
    """The stop of a run. ``install`` takes SIGTERM and SIGINT with plain handlers, not the event loop's:
    they run (and arm the watchdog) even while the loop is blocked. The first stop (a signal, or
    ``request`` from a fatal error) arms the watchdog (``grace_s`` plus ``CLOSE_MARGIN_S``) and sets
    ``event``; a second one sets ``abandon`` and calls ``on_abandon``: in-flight work is given up (it is
    read again later)."""

    def __init__(self, grace_s: float, on_abandon: Callable[[], None] | None = None,
                 margin_s: float = CLOSE_MARGIN_S) -> None:
        self.grace_s = grace_s
        self.margin_s = margin_s
        self.on_abandon = on_abandon
        self.event = asyncio.Event()
        self.abandon = False
        self.armed = False
        self._previous: dict[int, Any] = {}

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        def signalled(_sig: int, _frame: FrameType | None) -> None:
            self.arm_watchdog()
            with contextlib.suppress(RuntimeError):  # the event loop closed: the process is on its way out
                loop.call_soon_threadsafe(self.request)

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, signalled)

    def uninstall(self) -> None:
        """The handlers as they were before ``install``."""
        for sig, previous in self._previous.items():
            if previous is not None:  # None: set outside Python, not restorable from here
                signal.signal(sig, previous)
        self._previous.clear()

    def request(self) -> None:
        if self.event.is_set():
            logger.warning("second stop signal: not waiting for in-flight work")
            self.abandon = True
            if self.on_abandon is not None:
                self.on_abandon()
            return
        logger.info("stopping: no more fetching; draining in-flight work (grace %.0fs)", self.grace_s)
        self.arm_watchdog()  # whatever asked for the stop (a signal, a fatal error): the exit is bounded
        self.event.set()

    def arm_watchdog(self) -> None:
        if not self.armed:
            self.armed = True
            arm_watchdog(self.grace_s + self.margin_s)

    def disarm(self) -> None:
        """The run ended in time: no stack dump, no exit (a run inside a longer process)."""
        if self.armed:
            faulthandler.cancel_dump_traceback_later()
            self.armed = False


def arm_watchdog(after_s: float) -> None:
    """If the process has not exited ``after_s`` from now, write every thread's stack to stderr (the log)
    and exit 1: faulthandler's own thread does it, in C, without the GIL, so a hang anywhere (the event
    loop blocked, a library call holding the GIL) becomes a restart with a stack trace. Frames only (file,
    line, function): no values, so nothing to mask. Armed once, at the first stop."""
    logger.info("watchdog: exiting with every thread's stack if not stopped within %.0fs", after_s)
    faulthandler.dump_traceback_later(after_s, exit=True, file=sys.stderr)
