"""``processor dlq replay``: one bounded run to one vendor, from its replay group's position (or the
start) to the dead-letter topic's end as of the start.

A run is the consumer loop (``processor.consumer``) with ``_Replay`` as its handler: the reader
(``processor.dlq.topic``) works on its own thread; the redrive (``processor.redrive``), the vendor's
pipeline and the write-back producer in the event loop. Reading stops at the in-flight bound
(``relay.max_inflight_events``) and resumes as records settle; settled positions are committed every
0.2 s and at the end (each commit bounded), never past an unsettled record. SIGINT/SIGTERM stop the
reading, wait up to ``relay.shutdown_grace_s`` for in-flight deliveries and commit what settled; a
second signal stops waiting. The stop arms the relay's watchdog: a run still not ended
``consumer.CLOSE_MARGIN_S`` after the grace writes every thread's stack and exits 1. A run stopped
any other way (kill -9, an evicted Job) repeats at most what was in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from processor.codec import SchemaResolver, build_decoder, registry_name
from processor.config import Config
from processor.consumer import ConsumerLoop, Fetch, Stop
from processor.deadletter import DeadLetterWriter
from processor.delivery import VendorPipeline
from processor.dlq.topic import DlqFeed, DlqTopic, check_vendor, replay_group
from processor.dlq.view import masked_request
from processor.metrics import Metrics
from processor.offsets import OffsetTracker
from processor.redrive import Filters, Redrive, Report, Triage
from processor.transport import make_sender
from processor.vendors import Adapter, adapter_class
from processor.vendors.base import VendorRequest

logger = logging.getLogger(__name__)
REPLAY_COMMIT_EVERY_S = 0.2  # settled positions committed this often (and at the end)


class RateCap:
    """At most ``rate`` events a second handed to the vendor (None: no cap)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.next = 0.0

    async def take(self, n: int) -> None:
        if not self.rate or n <= 0:
            return
        now = time.monotonic()
        start = max(self.next, now)
        self.next = start + n / self.rate
        if start > now:
            await asyncio.sleep(start - now)


@dataclass
class ReplayOptions:
    vendor: str
    filters: Filters = field(default_factory=Filters)
    dry_run: bool = False
    rate: float | None = None
    max_replays: int = 3
    timeout_s: float = 15.0
    samples: int = 3
    from_start: bool = False  # ignore the group's position (records an earlier filtered run skipped)


@dataclass
class ReplayResult:
    vendor: str
    group: str
    dry_run: bool
    total: int  # records between the start position and the end as of the start
    summary: dict[str, Any]
    reports: list[Report]
    committed: dict[int, int]
    interrupted: bool = False
    pending: int = 0  # records not settled when the run ended
    plan: dict[str, Any] = field(default_factory=dict)  # dry run: requests, would-be rejects, samples
    elapsed_s: float = 0.0
    commit_failed: bool = False  # the final position could not be committed: the next run repeats

    @property
    def complete(self) -> bool:
        """Every record settled and the position committed (a stop that came after that changes nothing)."""
        return self.pending == 0 and not self.commit_failed


Progress = Callable[[dict[str, Any]], None]


def run_replay(config: Config, options: ReplayOptions, progress: Progress | None = None) -> ReplayResult:
    check_vendor(config, options.vendor)
    return asyncio.run(_Replay(config, options, progress).run())


class _Replay:
    """One bounded replay run: the consumer loop (``processor.consumer``) on the dead-letter topic with
    this class as its handler; the redrive, the vendor's pipeline and the write-back producer in the
    event loop, the reader on its own thread."""

    def __init__(self, config: Config, options: ReplayOptions, progress: Progress | None) -> None:
        self.config = config
        self.options = options
        self.progress = progress
        self.group = replay_group(config, options.vendor)
        self.stop = Stop(config.relay.shutdown_grace_s, on_abandon=self._abandon)
        self.stopping = self.stop.event
        self.tracker = OffsetTracker()
        self.cap = RateCap(options.rate)
        rate, batch = options.rate, config.kafka.consume_batch
        self.chunk = batch if not rate else max(1, min(batch, int(rate / 5)))
        self.pipeline: VendorPipeline | None = None  # the vendor's (none in a dry run)
        self.flushed = False
        self.undecided = 0  # read, but the run stopped while it waited for the registry
        self.next_report = 0.0
        self.started = time.monotonic()
        self.total = 0

    async def run(self) -> ReplayResult:
        cfg, opt = self.config, self.options
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="dlq-replay")
        try:
            reader: DlqTopic = await loop.run_in_executor(executor, DlqTopic, cfg, self.group, opt.timeout_s)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self.reader = reader
        feed = DlqFeed(reader, executor)
        self.stop.install(loop)
        try:
            committed = {} if opt.from_start else await loop.run_in_executor(executor, reader.committed)
            starts = reader.starts(committed)
            self.total = await loop.run_in_executor(executor, reader.assign, starts)
            logger.info("replaying %s[%s] to %s from %s (group %s): %d records", reader.topic,
                        ",".join(map(str, reader.partitions)), opt.vendor,
                        ", ".join(f"{p}@{o}" for p, o in sorted(starts.items())), self.group, self.total)
            for p in reader.partitions:
                self.tracker.assign(reader.topic, p)
            adapter = adapter_class(opt.vendor)(cfg.enabled_vendors()[opt.vendor])
            self.writer = None
            metrics = Metrics()
            if not opt.dry_run:
                self.writer = DeadLetterWriter(reader.topic, cfg.producer_settings(), metrics,
                                               cfg.deadletter.retry_delay_s)
            decoder = build_decoder(cfg.schema_registry)
            self.resolver = SchemaResolver(decoder, f"replay to {opt.vendor}",
                                           registry=registry_name(cfg.schema_registry.url))
            self.redrive = Redrive(adapter, decoder, self.tracker, opt.filters, opt.max_replays, self.writer)
            self.planner = _DryRun(adapter, opt.samples) if opt.dry_run else None
            if not opt.dry_run:
                sender = make_sender(adapter, cfg.relay.http_transport, cfg.relay.egress())
                self.pipeline = self.redrive.attach(sender, metrics)
            result = await self._run(ConsumerLoop(feed, self, REPLAY_COMMIT_EVERY_S))
            positions = self.tracker.commit_positions(only_changed=False) if not opt.dry_run else {}
            result.committed = {**starts, **{p: o for (_t, p), o in positions.items()}}
            return result
        finally:
            self.stop.uninstall()
            if await feed.close():
                self.stop.disarm()  # a stuck reader thread would hold the exit: the watchdog stays armed

    def _abandon(self) -> None:
        """A second stop signal: the deliveries in flight are given up (the next run repeats them)."""
        if self.pipeline is not None:
            for t in list(self.pipeline.tasks):
                t.cancel()

    async def _run(self, consumer: ConsumerLoop) -> ReplayResult:
        opt = self.options
        pipeline, writer = self.pipeline, self.writer
        stop_writer = asyncio.Event()
        writer_task = asyncio.create_task(writer.run(stop_writer)) if writer is not None else None
        try:
            await consumer.run(self.stopping)
            if self.stopping.is_set():
                await self._drain()
            commit_failed = not await consumer.commit_settled(tries=3)
        finally:
            if pipeline is not None:
                await pipeline.cancel()
                await pipeline.close()
            if writer is not None and writer_task is not None:
                await writer.drain(1.0)
                stop_writer.set()
                await writer_task
        snapshot = self._snapshot()
        if self.progress is not None:
            self.progress(snapshot)
        tracker, reader = self.tracker, self.reader
        return ReplayResult(opt.vendor, self.group, opt.dry_run, self.total, self.redrive.summary(),
                            self.redrive.reports, {}, interrupted=self.stopping.is_set(),
                            pending=tracker.inflight + self.undecided + (
                                0 if reader.done else self.total - self.redrive.counts["scanned"] - self.undecided),
                            plan=self.planner.result() if self.planner is not None else {},
                            elapsed_s=round(time.monotonic() - self.started, 3), commit_failed=commit_failed)

    async def _drain(self) -> None:
        """Stopped: wait up to ``relay.shutdown_grace_s`` for what is in flight to settle; a second signal
        stops waiting."""
        pipeline = self.pipeline
        if pipeline is not None:
            pipeline.flush()
        deadline = time.monotonic() + self.config.relay.shutdown_grace_s
        while self.tracker.inflight and not self.stop.abandon and (now := time.monotonic()) < deadline:
            if pipeline is not None:
                pipeline.tick(now)
            self._report(now)
            await asyncio.sleep(0.02)

    # -- the consumer loop's handler (processor.consumer) --------------------------------------
    def turn(self, now: float) -> Fetch | None:
        """Read while below the in-flight bound and not at the end; the pipeline's batch timers run."""
        pipeline = self.pipeline
        if pipeline is not None:
            pipeline.tick(now)
        self._report(now)
        if not self.reader.done and self.tracker.inflight < self.config.relay.max_inflight_events:
            return Fetch(self.chunk, 0.1)
        if pipeline is not None and not self.flushed and self.reader.done:
            pipeline.flush()
            self.flushed = True
        return None

    def committable(self) -> dict[tuple[str, int], int]:
        return self.tracker.commit_positions() if not self.options.dry_run else {}

    def committed(self, positions: dict[tuple[str, int], int], lag: dict[tuple[str, int], int],
                  failed: bool) -> None:
        if positions:
            self.tracker.mark_committed(positions)

    async def hand_over(self, raw: list[Any], stopping: asyncio.Event) -> None:
        """Triage and dispatch (or plan, in a dry run) once the registry knows the records' schema ids;
        records read when the stop came before the registry answered are not decided, not committed: the
        next run reads them again."""
        if not raw:
            return
        if not await self.resolver.wait((r.source.value for r in raw), stopping):
            self.undecided += len(raw)
            return
        t: Triage = self.redrive.triage(raw)
        await self.cap.take(len(t.events))
        if self.planner is not None:
            self.planner.plan(t)
        else:
            self.redrive.dispatch(t)

    def finished(self) -> bool:
        return self.reader.done and self.tracker.inflight == 0

    def _report(self, now: float) -> None:
        if self.progress is not None and now >= self.next_report:
            self.next_report = now + 0.25
            self.progress(self._snapshot())

    def _snapshot(self) -> dict[str, Any]:
        s = self.redrive.summary()
        elapsed = max(1e-6, time.monotonic() - self.started)
        return {**s, "total": self.total, "inflight": self.tracker.inflight, "elapsed_s": elapsed,
                "rate": s["scanned"] / elapsed}


class _DryRun:
    """Plans what a replay would send (the adapter's ``plan``, batch by batch), sends nothing."""

    def __init__(self, adapter: Adapter[Any, Any], samples: int) -> None:
        self.adapter = adapter
        self.samples = samples
        self.requests = 0
        self.would_reject = 0
        self.would_filter = 0
        self.events = 0
        self.sample_requests: list[VendorRequest] = []
        self.rejects: Counter[str] = Counter()

    def plan(self, t: Triage) -> None:
        size = self.adapter.settings.batch.max_events
        for i in range(0, len(t.events), size):
            batch = t.events[i:i + size]
            plan = self.adapter.plan(batch)
            self.events += len(batch)
            self.requests += len(plan.requests)
            self.would_filter += len(plan.filtered)
            self.would_reject += len(plan.rejected)
            for _ev, reason in plan.rejected:
                self.rejects[reason] += 1
            for req in plan.requests[:max(0, self.samples - len(self.sample_requests))]:
                self.sample_requests.append(req)

    def result(self) -> dict[str, Any]:
        return {"events": self.events, "requests": self.requests, "would_reject": self.would_reject,
                "would_filter": self.would_filter,
                "reject_reasons": [{"reason": r, "count": n} for r, n in self.rejects.most_common(10)],
                "samples": [masked_request(self.adapter, req) for req in self.sample_requests]}
