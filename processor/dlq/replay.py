"""``processor dlq replay``: one bounded run to one vendor, from its replay group's position (or the
start) to the dead-letter topic's end as of the start.

The consumer works on its own thread; the redrive (``processor.redrive``), the vendor's pipeline and
the write-back producer in the event loop. Reading stops at the in-flight bound
(``relay.max_inflight_events``) and resumes as records settle; settled positions are committed every
0.2 s and at the end, never past an unsettled record. SIGINT/SIGTERM stop the reading, wait up to
``relay.shutdown_grace_s`` for in-flight deliveries and commit what settled; a second signal stops
waiting. A run stopped any other way (kill -9, an evicted Job) repeats at most what was in flight.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from processor.codec import SchemaResolver, build_decoder, registry_name
from processor.config import Config
from processor.deadletter import DeadLetterWriter
from processor.dlq.topic import DlqTopic, check_vendor, replay_group
from processor.dlq.view import masked_request
from processor.metrics import Metrics
from processor.offsets import OffsetTracker
from processor.redrive import Filters, Redrive, Report, Triage
from processor.transport import make_sender
from processor.vendors import Adapter, adapter_class
from processor.vendors.base import VendorRequest

logger = logging.getLogger(__name__)

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
    """One bounded replay run: the consumer on its own thread, the redrive and pipeline in the loop."""

    def __init__(self, config: Config, options: ReplayOptions, progress: Progress | None) -> None:
        self.config = config
        self.options = options
        self.progress = progress
        self.group = replay_group(config, options.vendor)
        self.stopping = asyncio.Event()
        self.abandon = False

    async def run(self) -> ReplayResult:
        cfg, opt = self.config, self.options
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="dlq-replay")
        started = time.monotonic()
        try:
            reader: DlqTopic = await loop.run_in_executor(executor, DlqTopic, cfg, self.group, opt.timeout_s)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        try:
            committed = {} if opt.from_start else await loop.run_in_executor(executor, reader.committed)
            starts = reader.starts(committed)
            total = await loop.run_in_executor(executor, reader.assign, starts)
            logger.info("replaying %s[%s] to %s from %s (group %s): %d records", reader.topic,
                        ",".join(map(str, reader.partitions)), opt.vendor,
                        ", ".join(f"{p}@{o}" for p, o in sorted(starts.items())), self.group, total)
            tracker = OffsetTracker()
            for p in reader.partitions:
                tracker.assign(reader.topic, p)
            adapter = adapter_class(opt.vendor)(cfg.enabled_vendors()[opt.vendor])
            writer = None
            metrics = Metrics()
            if not opt.dry_run:
                writer = DeadLetterWriter(reader.topic, cfg.producer_settings(), metrics, cfg.deadletter.retry_delay_s)
            decoder = build_decoder(cfg.schema_registry)
            self.resolver = SchemaResolver(decoder, f"replay to {opt.vendor}",
                                           registry=registry_name(cfg.schema_registry.url))
            redrive = Redrive(adapter, decoder, tracker, opt.filters, opt.max_replays, writer)
            planner = _DryRun(adapter, opt.samples) if opt.dry_run else None
            if not opt.dry_run:
                redrive.attach(make_sender(adapter, cfg.relay.http_transport, cfg.relay.egress()), metrics)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._request_stop)
            result = await self._loop(loop, executor, reader, tracker, redrive, writer, planner, total, started)
            positions = tracker.commit_positions(only_changed=False) if not opt.dry_run else {}
            result.committed = {**starts, **{p: o for (_t, p), o in positions.items()}}
            return result
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await loop.run_in_executor(executor, reader.close)
            executor.shutdown(wait=True)

    def _request_stop(self) -> None:
        if self.stopping.is_set():
            logger.warning("second stop signal: not waiting for in-flight deliveries")
            self.abandon = True
            return
        logger.info("stopping: no more reading; waiting for in-flight deliveries (grace %.0fs)",
                    self.config.relay.shutdown_grace_s)
        self.stopping.set()

    async def _loop(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, reader: DlqTopic,
                    tracker: OffsetTracker, redrive: Redrive, writer: DeadLetterWriter | None,
                    planner: _DryRun | None, total: int, started: float) -> ReplayResult:
        cfg, opt = self.config, self.options
        cap = RateCap(opt.rate)
        limit = cfg.relay.max_inflight_events
        chunk = cfg.kafka.consume_batch if not opt.rate else max(1, min(cfg.kafka.consume_batch, int(opt.rate / 5)))
        pipeline = redrive.pipeline
        stop_writer = asyncio.Event()
        writer_task = asyncio.create_task(writer.run(stop_writer)) if writer is not None else None
        flushed = False
        undecided = 0  # read, but the run stopped while it waited for the registry
        grace_until: float | None = None
        next_commit = next_report = 0.0
        try:
            while True:
                now = time.monotonic()
                reading = not reader.done and not self.stopping.is_set()
                if pipeline is not None:
                    pipeline.tick(now)
                if reading and tracker.inflight < limit:
                    records = await loop.run_in_executor(executor, reader.consume, chunk, 0.1)
                    # read but stopped before the registry answered: not decided, not committed; the next
                    # run reads them again
                    if records and not await self.resolver.wait((r.source.value for r in records), self.stopping):
                        undecided += len(records)
                        continue
                    if records:
                        t: Triage = redrive.triage(records)
                        await cap.take(len(t.events))
                        if planner is not None:
                            planner.plan(t)
                        else:
                            redrive.dispatch(t)
                else:
                    if pipeline is not None and not flushed and not reading:
                        pipeline.flush()
                        flushed = True
                    if not reading and tracker.inflight == 0:
                        break
                    if self.stopping.is_set():
                        grace_until = grace_until or now + cfg.relay.shutdown_grace_s
                        if self.abandon or now > grace_until:
                            break
                    await asyncio.sleep(0.02)
                if not opt.dry_run and now >= next_commit:
                    next_commit = now + 0.2
                    await self._commit(loop, executor, reader, tracker)
                if self.progress is not None and now >= next_report:
                    next_report = now + 0.25
                    self.progress(self._snapshot(redrive, total, started, tracker))
            commit_failed = False
            if not opt.dry_run:
                for _ in range(3):
                    if await self._commit(loop, executor, reader, tracker):
                        break
                else:
                    commit_failed = True
        finally:
            if pipeline is not None:
                await pipeline.cancel()
                await pipeline.close()
            if writer is not None and writer_task is not None:
                await writer.drain(1.0)
                stop_writer.set()
                await writer_task
        snapshot = self._snapshot(redrive, total, started, tracker)
        if self.progress is not None:
            self.progress(snapshot)
        return ReplayResult(opt.vendor, self.group, opt.dry_run, total, redrive.summary(), redrive.reports, {},
                            interrupted=self.stopping.is_set(),
                            pending=tracker.inflight + undecided + (
                                0 if reader.done else total - redrive.counts["scanned"] - undecided),
                            plan=planner.result() if planner is not None else {},
                            elapsed_s=round(time.monotonic() - started, 3), commit_failed=commit_failed)

    async def _commit(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, reader: DlqTopic,
                      tracker: OffsetTracker) -> bool:
        """Commit what settled since the last commit; whether the tracker's positions are all committed."""
        positions = tracker.commit_positions()
        if not positions:
            return True
        if await loop.run_in_executor(executor, reader.commit, positions):
            tracker.mark_committed(positions)
            return True
        return False

    def _snapshot(self, redrive: Redrive, total: int, started: float, tracker: OffsetTracker) -> dict[str, Any]:
        s = redrive.summary()
        elapsed = max(1e-6, time.monotonic() - started)
        return {**s, "total": total, "inflight": tracker.inflight, "elapsed_s": elapsed,
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
