"""The relay: wires source -> codec -> routing -> per-vendor pipelines -> vendors, parking and dead
letters, and commits each partition up to the first event some vendor has not settled."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from typing import Any

from confluent_kafka import KafkaException

from processor.codec import Decoder, SchemaResolver
from processor.config import SHARED_CLIENT_PREFIXES, Config
from processor.deadletter import DeadLetterWriter
from processor.delivery import VendorPipeline
from processor.health import HealthServer
from processor.metrics import Metrics
from processor.offsets import OffsetTracker, RelaySettlement
from processor.parked import ParkedRedrive
from processor.routing import Router
from processor.source import KafkaSource, Partitions
from processor.transport import make_sender
from processor.vendors import adapter_class

logger = logging.getLogger(__name__)
SUMMARY_EVERY_S = 5.0


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
        self.source: KafkaSource | None = None
        self.parked: ParkedRedrive | None = None
        self.health: HealthServer | None = None
        self._over_limit = False  # back-pressure hysteresis: above the limit until below resume_ratio of it
        self._commit_due = 0.0
        self._drained = False  # the stop's drain is done: a revoke while closing does not wait again
        self.abandon = False  # a second stop signal: in-flight work is given up (redelivered later)
        self.exit_code = 0
        self.unclean_exit = False  # a consumer did not close in time: its thread must not hold the exit
        self._held: list[Any] = []  # a poll's messages waiting for the schema registry
        self.resolver: SchemaResolver | None = None
        self._stall_logged: str | None = None  # the stall last logged (``_watch_stall``)

    # -- wiring -------------------------------------------------------------
    def _build_pipelines(self) -> None:
        cfg = self.config
        self.dlq = DeadLetterWriter(cfg.deadletter.topic, cfg.producer_settings(), self.metrics,
                                    cfg.deadletter.retry_delay_s, cfg.retry_topic_prefix())
        self.settlement = RelaySettlement(self.tracker, self.dlq, self.metrics)
        self.router = Router(self.tracker, self.settlement, self.metrics)
        parks = cfg.retry_topics()
        for name, settings in cfg.enabled_vendors().items():
            adapter = adapter_class(name)(settings)
            sender = make_sender(adapter, cfg.relay.http_transport, cfg.relay.egress())
            pipe = VendorPipeline(adapter, sender, self.metrics,
                                  self.settlement, cfg.vendor_budget(name), name in parks)
            self.pipelines[name] = pipe
            self.router.add(pipe)

    # -- rebalance ------------------------------------------------------------
    async def _on_assign(self, parts: Partitions) -> None:
        for t, p in parts:
            self.tracker.assign(t, p)
        self.metrics.rebalances.labels("assign").inc()

    async def _on_revoke(self, parts: Partitions, lost: bool) -> dict[tuple[str, int], int]:
        """Drain (bounded), then hand back what is settled to commit. Work still holding the revoked
        partitions' events is dropped by the pipelines, never dead-lettered, and so are their messages held
        for the schema registry: the new owner redelivers them."""
        self.metrics.rebalances.labels("lost" if lost else "revoke").inc()
        if not lost and not self._drained:
            await self._drain(self.config.relay.shutdown_grace_s)
        mine = set(parts)
        positions = {k: v for k, v in self.tracker.commit_positions(only_changed=False).items() if k in mine}
        if self._held:  # waiting for the registry, never registered: the new owner redelivers them
            self._held = [m for m in self._held if (m.topic(), m.partition()) not in mine]
        for t, p in parts:
            self.tracker.revoke(t, p)
            for gauge in (self.metrics.consumer_lag, self.metrics.oldest_unsettled):
                with contextlib.suppress(KeyError):
                    gauge.remove(t, str(p))
        return positions

    async def _drain(self, grace_s: float) -> None:
        """Flush every batch and wait (bounded) until what is in flight settles."""
        deadline = time.monotonic() + grace_s
        await asyncio.gather(*(p.drain(grace_s) for p in self.pipelines.values()))
        await self.dlq.drain(max(0.0, deadline - time.monotonic()))
        if self.tracker.inflight:
            logger.warning("%d messages not settled after the grace time; they will be redelivered",
                           self.tracker.inflight)

    # -- health -----------------------------------------------------------------
    def not_ready(self) -> str | None:
        """Why the relay cannot do its work now (None: ready)."""
        if self.source is None or not self.source.had_assignment:
            return "not assigned any partition yet"
        if self.stopping.is_set():
            return "stopping"
        if self.dlq.failing:
            return self.dlq.failing_why or "dead-letter or retry-topic writes are not acknowledged"
        if self.resolver is not None and self.resolver.down is not None:
            return f"schema registry unreachable: {self.resolver.down}"
        return self.stalled() or self._waiting_past_stall()

    def stalled(self) -> str | None:
        """Why liveness should fail although the loop turns: a message (or a parked record being redriven)
        unsettled past ``relay.stall_after_s`` that nothing owns any more (no vendor pipeline holds an
        event, no dead-letter or retry-topic write is pending): only a restart, redelivering it, settles it."""
        oldest = self._oldest_unsettled()
        if oldest <= self.config.relay.stall_after_s or self._owners():
            return None
        return f"a message has been unsettled for {oldest:.0f}s (relay.stall_after_s) and nothing works on it"

    def _oldest_unsettled(self) -> float:
        oldest = max(self.tracker.oldest_unsettled().values(), default=0.0)
        if self.parked is not None:
            oldest = max([oldest, *self.parked.tracker.oldest_unsettled().values()])
        return oldest

    def _owners(self) -> list[str]:
        """What still works on unsettled messages: vendors holding events, pending topic writes."""
        owners = [f"{name} holds {p.admission.unsettled} events" for name, p in self.pipelines.items()
                  if p.admission.unsettled]
        if self.dlq.pending:
            owners.append(f"{self.dlq.pending} dead-letter or retry-topic writes pending")
        return owners

    def _waiting_past_stall(self) -> str | None:
        """Readiness: a message unsettled past ``relay.stall_after_s`` that something still works on (a
        vendor retrying in place through an outage, a topic write not acknowledged): an alert, not a
        restart."""
        oldest = self._oldest_unsettled()
        if oldest <= self.config.relay.stall_after_s:
            return None
        owners = self._owners()
        if not owners:
            return None  # nothing owns it: liveness (``stalled``)
        return f"a message has been unsettled for {oldest:.0f}s (past relay.stall_after_s): {'; '.join(owners)}"

    def _watch_stall(self) -> None:
        """Log when a message goes past ``relay.stall_after_s`` and when that ends (once each)."""
        why = self.stalled() or self._waiting_past_stall()
        if why is not None and self._stall_logged is None:
            logger.error("%s", why)
        elif why is None and self._stall_logged is not None:
            logger.info("no message unsettled past relay.stall_after_s any more")
        self._stall_logged = why

    # -- main loop ------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self._build_pipelines()
        tune_gc()
        self.health = HealthServer(self.metrics.registry, self.config.metrics.host, self.config.metrics.port,
                                   self.not_ready, self.stalled, self.config.relay.loop_stall_s)
        await self.health.start()
        logger.info("metrics on http://%s:%d/metrics, vendors: %s", self.config.metrics.host, self.health.port,
                    ", ".join(self.pipelines) or "none")
        missing = await self._missing_topics()
        if missing:
            logger.error("topics missing: %s. Create them (the dead-letter topic, and one retry topic per vendor "
                         "that parks) with `processor topics create --config FILE`, or set parking.enabled: false",
                         ", ".join(missing))
            await self.health.stop()
            return 2
        problems = await self._topic_problems()
        if problems:
            logger.error("the relay could not write to its dead-letter or retry topics: %s", "; ".join(problems))
            await self.health.stop()
            return 2
        if self.stopping.is_set():
            await self.health.stop()
            return 0
        decoder = build_decoder(self.config)
        self.metrics.schema_registry_up.set(1)  # until a fetch fails (always, with the embedded id map)
        self.resolver = SchemaResolver(decoder, "the relay",
                                       lambda up: self.metrics.schema_registry_up.set(1 if up else 0))
        self.source = KafkaSource(self.config.kafka, decoder, loop, self._on_assign, self._on_revoke)
        await self.source.start()
        tasks = [asyncio.create_task(self.dlq.run(self.stopping)), asyncio.create_task(self._ticker())]
        if self.config.retry_topics():
            self.parked = ParkedRedrive(self.config, self.resolver, self.pipelines, self.settlement, self.metrics,
                                        loop)
            redrive = asyncio.create_task(self.parked.run(self.stopping), name="redrive")
            redrive.add_done_callback(self._redrive_ended)
            tasks.append(redrive)
        try:
            await self._consume_loop()
        finally:
            await self._shutdown(tasks)
        return self.exit_code

    async def _topic_problems(self) -> list[str]:
        """``topics.start_problems`` off the loop: the problems (refuse to start); the warnings are logged.
        A broker that cannot answer these questions is logged, not refused: the run-time handling of a
        refused write still holds."""
        from processor.topics import start_problems

        try:
            problems, warnings = await asyncio.get_running_loop().run_in_executor(None, start_problems, self.config)
        except KafkaException as exc:
            logger.warning("could not check the dead-letter and retry topics' limits and permissions: %s", exc)
            return []
        for line in warnings:
            logger.error("%s", line)
        return problems

    async def _missing_topics(self) -> list[str]:
        """The dead-letter and retry topics the broker does not have; waits (not ready, logging) while
        the broker cannot be reached, until it answers or the relay is stopped."""
        want = [self.config.deadletter.topic, *self.config.retry_topics().values()]
        loop = asyncio.get_running_loop()
        delay = 1.0
        while not self.stopping.is_set():
            try:
                md = await loop.run_in_executor(None, lambda: self.dlq.producer.list_topics(timeout=5))
            except KafkaException as exc:
                logger.warning("broker %s not reachable (%s); retrying in %.0fs", self.config.kafka.bootstrap_servers,
                               exc.args[0].str() if exc.args else exc, delay)
            else:
                return [t for t in want if t not in md.topics]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            delay = min(delay * 2, 30.0)
        return []

    def _redrive_ended(self, task: asyncio.Task[None]) -> None:
        """The redrive loop ends with the relay; if it fails, the relay stops (exit 1, Kubernetes restarts
        it) rather than keep parking what it would never redrive."""
        if not task.cancelled() and task.exception() is not None:
            logger.critical("redrive of parked events failed: %r; stopping", task.exception())
            self.exit_code = 1
            self.request_stop()

    def request_stop(self) -> None:
        if self.stopping.is_set():
            logger.warning("second stop signal: not waiting for in-flight work")
            self.abandon = True
            for p in self.pipelines.values():
                for t in list(p.tasks):
                    t.cancel()
            return
        logger.info("stopping: no more fetching; draining in-flight work (grace %.0fs)",
                    self.config.relay.shutdown_grace_s)
        self.stopping.set()

    def _want_pause(self) -> bool:
        """Fetching waits while the relay holds too many unsettled messages (the redrive's records
        included), or a vendor holds the source (``processor.admission``)."""
        cfg = self.config.relay
        inflight = self.tracker.inflight + (self.parked.tracker.inflight if self.parked is not None else 0)
        if not self._over_limit and inflight >= cfg.max_inflight_events:
            self._over_limit = True
        elif self._over_limit and inflight <= int(cfg.max_inflight_events * cfg.resume_ratio):
            self._over_limit = False
        return self._over_limit or any(p.admission.holds_source for p in self.pipelines.values())

    async def _consume_loop(self) -> None:
        cfg = self.config
        assert self.source is not None and self.resolver is not None
        resolver = self.resolver
        while not self.stopping.is_set():
            pause = self._want_pause()
            commit = None
            now = time.monotonic()
            if now >= self._commit_due:
                self._commit_due = now + cfg.relay.commit_interval_s
                commit = self.tracker.commit_positions() or None
            poll = await self.source.poll(cfg.kafka.consume_batch, 0.05 if pause else 0.2,
                                          pause or bool(self._held), commit)
            self._after_commit(poll.committed, poll.lag, poll.commit_failed)
            self.metrics.paused.set(1 if self.source.paused else 0)
            self.metrics.inflight_messages.set(self.tracker.inflight)
            if poll.raw:
                self._held += poll.raw
            if self._held and await resolver.ready(m.value() for m in self._held):
                batch, self._held = self._held, []
                self.router.route(self.source.decode_all(batch))

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
        summary_due = second_due = 0.0
        while True:
            now = time.monotonic()
            for p in self.pipelines.values():
                p.tick(now)
            if now >= second_due:
                second_due = now + 1.0
                for (t, part), age in self.tracker.oldest_unsettled(now).items():
                    self.metrics.oldest_unsettled.labels(t, str(part)).set(age)
                self._watch_stall()
            if now >= summary_due:
                summary_due = now + SUMMARY_EVERY_S
                self.settlement.log_summary()
            await asyncio.sleep(step)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        dlq_task, tick_task, *redrive = tasks
        self.stopping.set()
        if redrive:  # no more parked records taken in (it sees the stop after its current poll)
            await asyncio.gather(*redrive, return_exceptions=True)
        if not self.abandon:
            await self._drain(self.config.relay.shutdown_grace_s)
        self._drained = True  # once: closing the consumer revokes, and that revoke must not wait again
        assert self.source is not None
        positions = self.tracker.commit_positions()
        if positions:
            committed = positions if await self.source.commit(positions) else {}
            self._after_commit(committed, {}, not committed)
            logger.info("committed %s", ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(positions.items())))
        for p in self.pipelines.values():
            await p.cancel()
        if self.parked is not None and not await self.parked.commit_and_close():
            self.unclean_exit = True
        if not await self.source.close():
            self.unclean_exit = True
        tick_task.cancel()
        await self.dlq.drain(1.0)
        self.settlement.log_summary()
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


def _is_shared_client_key(key: str) -> bool:
    """Kafka client settings that apply to the dead-letter producer as well (connection and auth)."""
    return key.startswith(SHARED_CLIENT_PREFIXES)
