"""The relay: wires source -> codec -> routing -> per-vendor pipelines -> vendors / dead letters,
and commits each partition up to the first event some vendor has not settled."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections import Counter
from operator import attrgetter
from typing import Any

from processor.codec import Decoder
from processor.config import Config
from processor.deadletter import DeadLetterWriter
from processor.delivery import VendorPipeline, make_sender
from processor.events import Event, EventKind
from processor.health import HealthServer
from processor.metrics import Metrics
from processor.offsets import OffsetTracker
from processor.source import Decoded, KafkaSource, Partitions
from processor.vendors import adapter_class

logger = logging.getLogger(__name__)
_topic = attrgetter("topic")
_kind = attrgetter("kind")


def build_decoder(config: Config) -> Decoder:
    sr = config.schema_registry
    registry = None
    if sr.url:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        registry = SchemaRegistryClient({"url": sr.url, **sr.client})
    return Decoder(sr.schemas_dir, sr.local_ids, registry)


class Relay:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.tracker = OffsetTracker()
        self.stopping = asyncio.Event()
        self.pipelines: dict[str, VendorPipeline] = {}
        self.routes: list[tuple[VendorPipeline, frozenset[EventKind] | None]] = []  # None: every kind
        # how many must settle a message of each kind: its vendors; the dead-letter topic for no kind
        self.targets: dict[EventKind | None, int] = {None: 1, **dict.fromkeys(EventKind, 0)}
        self.filtered_by: dict[EventKind, list[VendorPipeline]] = {k: [] for k in EventKind}
        self.source: KafkaSource | None = None
        self.health: HealthServer | None = None
        self._pause = False
        self._commit_due = 0.0
        self._draining = False

    # -- wiring -------------------------------------------------------------
    def _build_pipelines(self) -> None:
        producer_conf = {k: v for k, v in self.config.kafka.client.items() if _is_shared_client_key(k)}
        producer_conf.update(self.config.deadletter.producer)
        producer_conf["bootstrap.servers"] = self.config.kafka.bootstrap_servers
        self.dlq = DeadLetterWriter(self.config.deadletter.topic, producer_conf, self.metrics,
                                    self.config.deadletter.retry_delay_s)
        for name, settings in self.config.enabled_vendors().items():
            adapter = adapter_class(name)(settings)
            client = make_sender(adapter, self.config.relay.http_transport)
            pipe = VendorPipeline(adapter, client, self.metrics, self._settle, self._dead_letter,
                                  self.tracker.settle_items)
            self.pipelines[name] = pipe
            kinds = frozenset(k for k in EventKind if adapter.takes(k))
            self.routes.append((pipe, None if len(kinds) == len(EventKind) else kinds))
            for kind in EventKind:
                if kind in kinds:
                    self.targets[kind] += 1
                else:
                    self.filtered_by[kind].append(pipe)

    def _settle(self, event: Event) -> None:
        self.tracker.settle(event.slot)

    def _dead_letter(self, event: Event, vendor: str, error_class: str, status: int | None, reason: str,
                     attempts: int, first_ms: int | None) -> None:
        logger.info("dead-lettering %s for %s: %s (%s)", event.source.where(), vendor, error_class, reason)
        self.dlq.write(event.source, vendor, error_class, status, reason, attempts, first_ms,
                       lambda: self.tracker.settle(event.slot))

    # -- intake ---------------------------------------------------------------
    def _route(self, batch: list[Event | Decoded]) -> None:
        """Register a poll's messages with the tracker in consume order, then hand each vendor its
        events as one list (per poll, not per event)."""
        kinds = list(map(_kind, batch))  # None: undecodable or unroutable
        self.tracker.register_many(batch, map(self.targets.__getitem__, kinds))
        for topic, n in Counter(map(_topic, batch)).items():
            self.metrics.events_consumed.labels(topic).inc(n)
        events: list[Event] = batch  # type: ignore[assignment]
        if None in kinds:
            for d in batch:
                if d.kind is None:
                    self._undeliverable(d)  # type: ignore[arg-type]
            events = [d for d in batch if d.kind is not None]  # type: ignore[misc]
        for pipe, only in self.routes:
            pipe.submit_many(events if only is None else [ev for ev in events if ev.kind in only])
        if any(self.filtered_by.values()):
            for kind, n in Counter(kinds).items():
                for pipe in self.filtered_by.get(kind, ()):  # type: ignore[call-overload]
                    self.metrics.vendor_events.labels(pipe.name, kind.value, "filtered").inc(n)

    def _undeliverable(self, d: Decoded) -> None:
        """Undecodable or unroutable: straight to the dead-letter topic, settled when Kafka acknowledges it."""
        src = d.source
        tracker = self.tracker
        if d.error is not None:
            self.metrics.decode_failures.labels(src.topic, d.error.reason).inc()
            error_class, reason = "undecodable", str(d.error)
        else:
            error_class, reason = "unroutable", "a valid Avro record of a schema the relay does not route"
        logger.warning("dead-lettering %s: %s (%s)", src.where(), error_class, reason)
        self.dlq.write(src, None, error_class, None, reason, 0, None, lambda: tracker.settle(d.slot))

    # -- rebalance ------------------------------------------------------------
    async def _on_assign(self, parts: Partitions) -> None:
        for t, p in parts:
            self.tracker.assign(t, p)
        self.metrics.rebalances.labels("assign").inc()

    async def _on_revoke(self, parts: Partitions, lost: bool) -> dict[tuple[str, int], int]:
        self.metrics.rebalances.labels("lost" if lost else "revoke").inc()
        if not lost:
            await self._drain(self.config.relay.shutdown_grace_s)
        positions = {k: v for k, v in self.tracker.commit_positions(only_changed=False).items() if k in set(parts)}
        for t, p in parts:
            self.tracker.revoke(t, p)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(t, str(p))
        return positions

    async def _drain(self, grace_s: float) -> None:
        """Flush every batch and wait (bounded) until what is in flight settles."""
        deadline = time.monotonic() + grace_s
        await asyncio.gather(*(p.drain(grace_s) for p in self.pipelines.values()))
        await self.dlq.drain(max(0.0, deadline - time.monotonic()))
        if self.tracker.inflight:
            logger.warning("%d messages not settled after the grace time; they will be redelivered",
                           self.tracker.inflight)

    # -- main loop ------------------------------------------------------------
    def ready(self) -> bool:
        return bool(self.source and self.source.had_assignment and not self.stopping.is_set())

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self._build_pipelines()
        tune_gc()
        self.health = HealthServer(self.metrics.registry, self.config.metrics.host, self.config.metrics.port,
                                   self.ready)
        await self.health.start()
        logger.info("metrics on http://%s:%d/metrics, vendors: %s", self.config.metrics.host, self.health.port,
                    ", ".join(self.pipelines) or "none")
        self.source = KafkaSource(self.config.kafka, build_decoder(self.config), loop, self._on_assign,
                                  self._on_revoke)
        await self.source.start()
        dlq_task = asyncio.create_task(self.dlq.run(self.stopping))
        tick_task = asyncio.create_task(self._ticker())
        try:
            await self._consume_loop()
        finally:
            await self._shutdown(dlq_task, tick_task)
        return 0

    def request_stop(self) -> None:
        if self.stopping.is_set():
            logger.warning("second stop signal: not waiting for in-flight work")
            self._draining = True
            for p in self.pipelines.values():
                for t in list(p.tasks):
                    t.cancel()
            return
        logger.info("stopping: no more fetching; draining in-flight work (grace %.0fs)",
                    self.config.relay.shutdown_grace_s)
        self.stopping.set()

    async def _consume_loop(self) -> None:
        cfg = self.config
        limit = cfg.relay.max_inflight_events
        resume_at = int(limit * cfg.relay.resume_ratio)
        assert self.source is not None
        while not self.stopping.is_set():
            inflight = self.tracker.inflight
            if not self._pause and inflight >= limit:
                self._pause = True
            elif self._pause and inflight <= resume_at:
                self._pause = False
            if self.source.paused and not self._pause and not self.source.assigned:
                self.source.paused = False
            commit = None
            now = time.monotonic()
            if now >= self._commit_due:
                self._commit_due = now + cfg.relay.commit_interval_s
                commit = self.tracker.commit_positions() or None
            poll = await self.source.poll(cfg.kafka.consume_batch, 0.05 if self._pause else 0.2,
                                          self._pause, commit)
            self._after_commit(poll.committed, poll.lag, poll.commit_failed)
            self.metrics.paused.set(1 if self.source.paused else 0)
            self.metrics.inflight_messages.set(self.tracker.inflight)
            if poll.raw:
                self._route(self.source.decode_all(poll.raw))

    def _after_commit(self, committed: dict[tuple[str, int], int], lag: dict[tuple[str, int], int],
                      failed: bool) -> None:
        if failed:
            self.metrics.commit_failures.inc()
        if committed:
            self.tracker.mark_committed(committed)
            for (t, p), off in committed.items():
                self.metrics.committed_offset.labels(t, str(p)).set(off)
        for (t, p), n in lag.items():
            self.metrics.consumer_lag.labels(t, str(p)).set(n)

    async def _ticker(self) -> None:
        waits = [p.batcher.max_wait for p in self.pipelines.values()]
        step = min([0.05, *(w / 4 for w in waits)])
        while True:
            now = time.monotonic()
            for p in self.pipelines.values():
                p.tick(now)
            if self.health is not None:
                self.health.beat()
            await asyncio.sleep(step)

    async def _shutdown(self, dlq_task: asyncio.Task[Any], tick_task: asyncio.Task[Any]) -> None:
        self.stopping.set()
        if not self._draining:
            await self._drain(self.config.relay.shutdown_grace_s)
        assert self.source is not None
        positions = self.tracker.commit_positions()
        if positions:
            committed = positions if await self.source.commit(positions) else {}
            self._after_commit(committed, {}, not committed)
            logger.info("committed %s", ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(positions.items())))
        for p in self.pipelines.values():
            await p.cancel()
        # settled work is committed; close leaves the group at once (its revoke callback finds nothing left)
        self._draining = True
        await self.source.close()
        tick_task.cancel()
        await self.dlq.drain(1.0)
        dlq_task.cancel()
        await asyncio.gather(dlq_task, tick_task, return_exceptions=True)
        for p in self.pipelines.values():
            await p.close()
        if self.health is not None:
            await self.health.stop()
        logger.info("stopped")


def tune_gc() -> None:
    """Decoded events are acyclic dicts freed by reference counting, made by the hundred thousand:
    the default cyclic-GC thresholds would scan them over and over. Freeze what start-up built and
    collect young objects less often (measured with ``make bench``; see the README)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


_PRODUCER_SHARED_PREFIXES = ("security.", "sasl.", "ssl.", "client.id", "socket.", "broker.", "api.version")


def _is_shared_client_key(key: str) -> bool:
    """Kafka client settings that apply to the dead-letter producer as well (connection and auth)."""
    return key.startswith(_PRODUCER_SHARED_PREFIXES)
