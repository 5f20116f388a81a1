"""``processor dlq inspect`` and ``processor dlq replay``: the dead-letter topic read from a position to
its end as of the call.

Inspect reads every partition from the start and commits nothing. Replay reads from the vendor's own
replay group (``<kafka.group_id>.replay.<vendor>``; its committed position, or the start), hands the
records to ``processor.redrive`` and commits as they settle, never past an unsettled one, so a run
stopped at any instant resumes where it stopped. Both use the config's ``kafka.client`` settings for
the consumer (and its connection and auth settings for the write-back producer, as the relay does).
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from processor.config import Config
from processor.errors import ConfigError, FatalError
from processor.redrive import NO_VENDOR, Decision, Filters, RelayRecord, Triage
from processor.vendors import REGISTRY

logger = logging.getLogger(__name__)

_NO_OFFSET = -1001  # librdkafka's OFFSET_INVALID: the group has committed nothing for the partition


def replay_group(config: Config, vendor: str) -> str:
    """The consumer group holding ``vendor``'s replay position on the dead-letter topic."""
    return f"{config.kafka.group_id}.replay.{vendor}"


def check_vendor(config: Config, vendor: str) -> None:
    if vendor not in REGISTRY:
        raise ConfigError(f"unknown vendor {vendor!r}; known: {', '.join(sorted(REGISTRY))}")
    if vendor not in config.enabled_vendors():
        raise ConfigError(f"vendor {vendor!r} is not configured and enabled in this config (replay needs its "
                          f"settings); configured: {', '.join(config.enabled_vendors()) or 'none'}")


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now_ms: int) -> int:
    """Epoch ms of ``2h`` (that long before now: s, m, h, d, w) or an ISO 8601 time (UTC unless it says)."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now_ms - int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1000)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither a relative time (30m, 2h, 1d) nor an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def parse_offsets(text: str) -> tuple[int, int]:
    """``A-B`` (inclusive) or a single offset ``A``."""
    first, sep, last = text.partition("-")
    try:
        lo, hi = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ValueError(f"{text!r} is not an offset range A-B") from None
    if lo < 0 or hi < lo:
        raise ValueError(f"{text!r}: want 0 <= A <= B")
    return lo, hi


class DlqTopic:
    """The dead-letter topic for one bounded read: an assign()ed consumer (no group membership) whose
    group, when given, is the one whose committed position it reads and commits. Blocking: call from
    one thread."""

    def __init__(self, config: Config, group: str, timeout_s: float = 15.0) -> None:
        self.topic = config.deadletter.topic
        self.timeout_s = timeout_s
        self.bootstrap = config.kafka.bootstrap_servers
        conf = {
            "auto.offset.reset": "earliest",
            **config.kafka.client,
            "bootstrap.servers": self.bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
        }
        self.consumer = Consumer(conf, logger=logging.getLogger("librdkafka"))
        self.ends: dict[int, int] = {}
        self.lows: dict[int, int] = {}
        try:
            self.partitions = self._partitions()
            for p in self.partitions:  # the end as of now: what a run reads
                self.lows[p], self.ends[p] = self._call(self.consumer.get_watermark_offsets,
                                                        TopicPartition(self.topic, p), timeout=timeout_s,
                                                        cached=False)
        except FatalError:
            self.consumer.close()
            raise
        self.open: set[int] = set()
        self.next: dict[int, int] = {}

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KafkaException as exc:
            raise FatalError(f"Kafka at {self.bootstrap} did not answer: {exc.args[0].str()}") from exc

    def _partitions(self) -> list[int]:
        try:
            md = self.consumer.list_topics(self.topic, timeout=self.timeout_s)
        except KafkaException as exc:
            raise FatalError(f"cannot reach Kafka at {self.bootstrap} within {self.timeout_s:g}s: "
                             f"{exc.args[0].str()}") from exc
        meta = md.topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            why = meta.error.str() if meta is not None and meta.error is not None else "no partitions"
            raise FatalError(f"dead-letter topic {self.topic!r} does not exist on {self.bootstrap} ({why})")
        return sorted(meta.partitions)

    def committed(self) -> dict[int, int | None]:
        """The group's committed position per partition (None: nothing committed)."""
        tps = self._call(self.consumer.committed, [TopicPartition(self.topic, p) for p in self.partitions],
                         timeout=self.timeout_s)
        return {tp.partition: None if tp.offset == _NO_OFFSET or tp.offset < 0 else tp.offset for tp in tps}

    def starts(self, positions: dict[int, int | None]) -> dict[int, int]:
        """Where a read from ``positions`` begins: the position, or the start of what the topic still holds."""
        return {p: max(self.lows[p], positions.get(p) or 0) for p in self.partitions}

    def assign(self, starts: dict[int, int]) -> int:
        """Read each partition from ``starts`` to its end as of construction; how many records that is."""
        self.open = {p for p in self.partitions if starts[p] < self.ends[p]}
        self.next = dict(starts)
        self.consumer.assign([TopicPartition(self.topic, p, starts[p]) for p in sorted(self.open)])
        return sum(self.ends[p] - starts[p] for p in self.open)

    @property
    def done(self) -> bool:
        return not self.open

    def consume(self, n: int, timeout_s: float) -> list[RelayRecord]:
        """Up to ``n`` records before the end offsets, in order; a partition closes at its end."""
        out: list[RelayRecord] = []
        if not self.open:
            return out
        for msg in self.consumer.consume(n, timeout_s):
            p = msg.partition()
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if msg.offset() >= self.ends.get(p, 0):
                        self._close(p)
                    continue
                if err.fatal():
                    raise FatalError(f"consumer failed: {err.str()}")
                logger.warning("consumer error: %s", err.str())
                continue
            if p not in self.open or msg.offset() >= self.ends[p]:
                continue  # written after the run started: the next run reads it
            out.append(RelayRecord.from_message(msg))
            self.next[p] = msg.offset() + 1
            if msg.offset() + 1 >= self.ends[p]:
                self._close(p)
        return out

    def _close(self, p: int) -> None:
        if p in self.open:
            self.open.discard(p)
            self.consumer.pause([TopicPartition(self.topic, p)])  # what follows is the next run's

    def commit(self, positions: dict[tuple[str, int], int]) -> bool:
        tps = [TopicPartition(t, p, off) for (t, p), off in positions.items()]
        try:
            self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            logger.warning("commit of the replay position failed: %s", exc)
            return False
        return True

    def close(self) -> None:
        self.consumer.close()


# -- inspect ------------------------------------------------------------------------------------------
@dataclass
class Inspection:
    """What ``dlq inspect`` found (``dlqview`` renders it as text or JSON)."""

    topic: str
    filters: Filters
    scanned: int = 0
    matched: int = 0
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # vendor, error class, status
    reasons: Counter[str] = field(default_factory=Counter)
    replay_counts: Counter[int] = field(default_factory=Counter)
    oldest_ms: int | None = None
    newest_ms: int | None = None
    positions: dict[str, dict[int, int | None]] = field(default_factory=dict)  # vendor -> partition -> committed
    pending: Counter[str] = field(default_factory=Counter)
    replayed: Counter[str] = field(default_factory=Counter)
    unassigned_pending: Counter[str] = field(default_factory=Counter)  # vendor -> records of no vendor pending
    samples: list[RelayRecord] = field(default_factory=list)

    def add(self, r: RelayRecord, show: int) -> None:
        self.matched += 1
        self.counts[(r.vendor, r.error_class, str(r.http_status or ""))] += 1
        self.reasons[r.reason] += 1
        self.replay_counts[r.replay_count] += 1
        t = r.failed_ms
        if t is not None:
            self.oldest_ms = t if self.oldest_ms is None else min(self.oldest_ms, t)
            self.newest_ms = t if self.newest_ms is None else max(self.newest_ms, t)
        for vendor, committed in self.positions.items():
            pending = committed.get(r.partition) is None or r.offset >= committed[r.partition]  # type: ignore[operator]
            if r.vendor == vendor:
                (self.pending if pending else self.replayed)[vendor] += 1
            elif r.vendor == NO_VENDOR and pending:
                self.unassigned_pending[vendor] += 1
        if len(self.samples) < show:
            self.samples.append(r)


def inspect(config: Config, filters: Filters, show: int = 0, timeout_s: float = 15.0) -> Inspection:
    """Read the dead-letter topic from the start to its end as of the call; commit nothing."""
    reader = DlqTopic(config, f"{config.kafka.group_id}.inspect", timeout_s)
    try:
        found = Inspection(reader.topic, filters)
        vendors = sorted(set(config.enabled_vendors()) | (set(filters.vendors) & set(REGISTRY)))
        for vendor in vendors:
            found.positions[vendor] = _committed(config, vendor, timeout_s)
        reader.assign(reader.starts({}))
        while not reader.done:
            records = reader.consume(1000, 0.5)
            found.scanned += len(records)
            for r in records:
                if r.vendor not in found.positions and r.vendor != NO_VENDOR and r.vendor in REGISTRY:
                    found.positions[r.vendor] = _committed(config, r.vendor, timeout_s)
                if filters.matches(r):
                    found.add(r, show)
        return found
    finally:
        reader.close()


def _committed(config: Config, vendor: str, timeout_s: float) -> dict[int, int | None]:
    group = DlqTopic(config, replay_group(config, vendor), timeout_s)
    try:
        return group.committed()
    finally:
        group.close()


# -- replay ---------------------------------------------------------------------------------------------
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
    reports: list[Any]
    committed: dict[int, int]
    interrupted: bool = False
    pending: int = 0  # records not settled when the run ended
    plan: dict[str, Any] = field(default_factory=dict)  # dry run: requests, would-be rejects, samples
    elapsed_s: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.interrupted and self.pending == 0


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
        from processor.app import _is_shared_client_key, build_decoder
        from processor.deadletter import DeadLetterWriter
        from processor.delivery import make_sender
        from processor.metrics import Metrics
        from processor.offsets import OffsetTracker
        from processor.redrive import Redrive
        from processor.vendors import adapter_class

        cfg, opt = self.config, self.options
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="dlq-replay")
        started = time.monotonic()
        reader: DlqTopic = await loop.run_in_executor(executor, DlqTopic, cfg, self.group, opt.timeout_s)
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
                producer_conf = {k: v for k, v in cfg.kafka.client.items() if _is_shared_client_key(k)}
                producer_conf.update(cfg.deadletter.producer)
                producer_conf["bootstrap.servers"] = cfg.kafka.bootstrap_servers
                writer = DeadLetterWriter(reader.topic, producer_conf, metrics, cfg.deadletter.retry_delay_s)
            redrive = Redrive(adapter, build_decoder(cfg), tracker, opt.filters, opt.max_replays, writer)
            planner = _DryRun(adapter, opt.samples) if opt.dry_run else None
            if not opt.dry_run:
                redrive.attach(make_sender(adapter, cfg.relay.http_transport), metrics)
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
                    tracker: Any, redrive: Any, writer: Any, planner: _DryRun | None, total: int,
                    started: float) -> ReplayResult:
        cfg, opt = self.config, self.options
        cap = RateCap(opt.rate)
        limit = cfg.relay.max_inflight_events
        chunk = cfg.kafka.consume_batch if not opt.rate else max(1, min(cfg.kafka.consume_batch, int(opt.rate / 5)))
        pipeline = redrive.pipeline
        stop_writer = asyncio.Event()
        writer_task = asyncio.create_task(writer.run(stop_writer)) if writer is not None else None
        flushed = False
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
            if not opt.dry_run:
                await self._commit(loop, executor, reader, tracker)
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
                            pending=tracker.inflight + (0 if reader.done else total - redrive.counts["scanned"]),
                            plan=planner.result() if planner is not None else {},
                            elapsed_s=round(time.monotonic() - started, 3))

    async def _commit(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, reader: DlqTopic,
                      tracker: Any) -> None:
        positions = tracker.commit_positions()
        if positions and await loop.run_in_executor(executor, reader.commit, positions):
            tracker.mark_committed(positions)

    def _snapshot(self, redrive: Any, total: int, started: float, tracker: Any) -> dict[str, Any]:
        s = redrive.summary()
        elapsed = max(1e-6, time.monotonic() - started)
        return {**s, "total": total, "inflight": tracker.inflight, "elapsed_s": elapsed,
                "rate": s["scanned"] / elapsed}


class _DryRun:
    """Plans what a replay would send (the adapter's ``plan``, batch by batch), sends nothing."""

    def __init__(self, adapter: Any, samples: int) -> None:
        self.adapter = adapter
        self.samples = samples
        self.requests = 0
        self.would_reject = 0
        self.would_filter = 0
        self.events = 0
        self.sample_requests: list[Any] = []
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
        from processor.dlqview import masked_request

        return {"events": self.events, "requests": self.requests, "would_reject": self.would_reject,
                "would_filter": self.would_filter,
                "reject_reasons": [{"reason": r, "count": n} for r, n in self.rejects.most_common(10)],
                "samples": [masked_request(self.adapter, req) for req in self.sample_requests]}


__all__ = ["Decision", "DlqTopic", "Inspection", "ReplayOptions", "ReplayResult", "check_vendor", "inspect",
           "parse_offsets", "parse_when", "replay_group", "run_replay"]
