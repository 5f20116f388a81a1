"""The relay: wires source -> codec -> routing -> per-vendor pipelines -> vendors, parking and dead
letters, and commits each partition up to the first event some vendor has not settled."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any

from confluent_kafka import KafkaException

from processor.admission import InflightBound
from processor.codec import SchemaResolver, build_decoder, registry_name
from processor.config import Config
from processor.consumer import ConsumerLoop, Fetch, Stop
from processor.deadletter import DeadLetterWriter
from processor.delivery import VendorPipeline
from processor.health import HealthRules, HealthServer
from processor.kafka_access import AccessWatch, reach
from processor.metrics import Metrics
from processor.offsets import OffsetTracker, RelaySettlement
from processor.parked import ParkedRedrive
from processor.routing import Router
from processor.source import KafkaSource, Partitions
from processor.transport import make_sender
from processor.vendors import adapter_class

logger = logging.getLogger(__name__)
SUMMARY_EVERY_S = 5.0


class Relay:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.tracker = OffsetTracker()
        # SIGTERM/SIGINT or a fatal error; a second signal cancels the deliveries in flight
        self.stop = Stop(config.relay.shutdown_grace_s, on_abandon=self._abandon)
        self.stopping = self.stop.event
        self.pipelines: dict[str, VendorPipeline] = {}
        self.source: KafkaSource | None = None
        self.consumer: ConsumerLoop | None = None  # the source's loop, with this relay as its handler
        self.parked: ParkedRedrive | None = None
        self.health: HealthServer | None = None
        self.bound = InflightBound(config.relay.max_inflight_events, config.relay.resume_ratio)
        self._drained = False  # the stop's drain is done: a revoke while closing does not wait again
        self.exit_code = 0
        self.consumer_failed = False  # a fatal consumer error: it commits nothing any more
        self.unclean_exit = False  # a consumer did not close in time: its thread must not hold the exit
        # per partition, the messages from the first one whose schema id the registry has not answered
        # for: that partition is paused, the others go on
        self._held: dict[tuple[str, int], list[Any]] = {}
        self.resolver: SchemaResolver | None = None
        self.access = AccessWatch("the relay")  # Kafka refusing the relay's clients: named once, not ready
        self.rules = HealthRules(config.relay.stall_after_s,
                                 [self._kafka_access, self._not_assigned, self._stopping, self._topic_writes,
                                  self._registry],
                                 self._oldest_unsettled, self._owners)

    # -- wiring -------------------------------------------------------------
    def _build_pipelines(self) -> None:
        cfg = self.config
        self.dlq = DeadLetterWriter(cfg.deadletter.topic, {**cfg.producer_settings(), "error_cb": self.access},
                                    self.metrics, cfg.deadletter.retry_delay_s, cfg.retry_topic_prefix(),
                                    on_fatal=lambda _why: self.fail(None))  # it logged the ERROR itself
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
        self.access.clear()  # the group coordinator took the relay in
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
        for key in mine:  # waiting for the registry, never registered: the new owner redelivers them
            self._held.pop(key, None)
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

    # -- health: the facts (the rules are processor.health.HealthRules) ----------------------------
    def _kafka_access(self) -> str | None:
        return f"Kafka refuses the relay: {self.access.problem}" if self.access.problem is not None else None

    def _not_assigned(self) -> str | None:
        return "not assigned any partition yet" if self.source is None or not self.source.had_assignment else None

    def _stopping(self) -> str | None:
        return "stopping" if self.stopping.is_set() else None

    def _topic_writes(self) -> str | None:
        if self.dlq.failing:
            return self.dlq.failing_why or "dead-letter or retry-topic writes are not acknowledged"
        return None

    def _registry(self) -> str | None:
        return self.resolver.waiting() if self.resolver is not None else None

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

    # -- main loop ------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop.install(loop)
        self._build_pipelines()
        tune_gc()
        self.health = HealthServer(self.metrics.registry, self.config.metrics.host, self.config.metrics.port,
                                   self.rules.not_ready, self.rules.stalled, self.config.relay.loop_stall_s)
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
            logger.error("the dead-letter or retry topics would refuse or lose records: %s", "; ".join(problems))
            await self.health.stop()
            return 2
        if self.stopping.is_set():
            await self.health.stop()
            return 0
        decoder = build_decoder(self.config.schema_registry)
        self.metrics.schema_registry_up.set(1)  # until a fetch fails (always, with the embedded id map)
        self.resolver = SchemaResolver(decoder, "the relay",
                                       lambda up: self.metrics.schema_registry_up.set(1 if up else 0),
                                       registry=registry_name(self.config.schema_registry.url))
        self.source = KafkaSource(self.config.kafka, decoder, loop, self._on_assign, self._on_revoke, self.access)
        self.consumer = ConsumerLoop(self.source, self, self.config.relay.commit_interval_s)
        await self.source.start()
        tasks = [asyncio.create_task(self.dlq.run(self.stopping)), asyncio.create_task(self._ticker())]
        if self.config.retry_topics():
            self.parked = ParkedRedrive(self.config, self.resolver, self.pipelines, self.settlement, self.metrics,
                                        loop)
            redrive = asyncio.create_task(self.parked.run(self.stopping), name="redrive")
            redrive.add_done_callback(self._redrive_ended)
            tasks.append(redrive)
        try:
            await self.consumer.run(self.stopping)
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
                md = await loop.run_in_executor(None, reach, self.dlq.producer, self.access, 5.0)
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
            self.fail(f"the redrive of parked events failed ({task.exception()!r})")

    def request_stop(self) -> None:
        self.stop.request()

    def _abandon(self) -> None:
        """A second stop signal: in-flight work is given up (redelivered later)."""
        for p in self.pipelines.values():
            for t in list(p.tasks):
                t.cancel()

    def _want_pause(self) -> bool:
        """Fetching waits while the relay holds too many unsettled messages (the redrive's records
        included), or a vendor holds the source (``processor.admission``)."""
        inflight = self.tracker.inflight + (self.parked.tracker.inflight if self.parked is not None else 0)
        over = self.bound.check(inflight)
        return over or any(p.admission.holds_source for p in self.pipelines.values())

    # -- the consumer loop's handler (processor.consumer) --------------------------------------
    def turn(self, now: float) -> Fetch:
        """Pause all while over the bound; hold the partitions waiting for the registry."""
        pause = self._want_pause()
        return Fetch(self.config.kafka.consume_batch, 0.05 if pause else 0.2, pause, set(self._held))

    def committable(self) -> dict[tuple[str, int], int]:
        """What settled since the last commit; nothing once the consumer failed for good."""
        return self.tracker.commit_positions() if not self.consumer_failed else {}

    def committed(self, positions: dict[tuple[str, int], int], lag: dict[tuple[str, int], int],
                  failed: bool) -> None:
        self._after_commit(positions, lag, failed)
        if self.source is not None:
            self.metrics.paused.set(1 if self.source.paused else 0)
        self.metrics.inflight_messages.set(self.tracker.inflight)

    async def hand_over(self, raw: list[Any], stopping: asyncio.Event) -> None:
        """Decode and route, partition by partition up to the first message whose schema id the registry
        has not answered for (``_release_held``)."""
        resolver = self.resolver
        assert resolver is not None
        unknown = resolver.decoder.unknown_ids(m.value() for m in raw) if raw else set()
        if not unknown and not self._held:  # the common case: every id known, nothing waits
            if raw:
                self._route(raw)
            return
        unknown |= resolver.decoder.unknown_ids(m.value() for q in self._held.values() for m in q)
        if unknown:  # bounded, hears the stop; a slow fetch goes on while the loop polls
            await resolver.ready_ids(unknown, stopping, wait_s=0.5)
        ready = self._release_held(raw)
        if ready:
            self._route(ready)

    def finished(self) -> bool:
        return False

    def _route(self, raw: list[Any]) -> None:
        """Decode and route a poll's messages; a fatal consumer error among them stops the relay (exit 1)
        with nothing of that poll registered, so nothing is committed past it."""
        assert self.source is not None
        try:
            decoded = self.source.decode_all(raw)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else exc
            self.consumer_failed = True
            self.fail(f"the Kafka consumer failed for good ({err.name() if hasattr(err, 'name') else err}: "
                      f"{err.str() if hasattr(err, 'str') else err})")
            return
        self.router.route(decoded)

    def fail(self, why: str | None) -> None:
        """A fatal error of a Kafka client: one ERROR naming it (None: its owner logged it), then the stop
        with exit 1 (the restart makes new clients; offsets past what settled were never committed)."""
        if self.exit_code == 0 and why is not None:
            logger.error("%s; stopping (exit 1): a restart cures it, nothing is committed past it", why)
        self.exit_code = 1
        self.request_stop()

    def _release_held(self, raw: list[Any]) -> list[Any]:
        """What may be decoded now, in consume order: each partition's messages up to the first one
        whose schema id the registry has not answered for; that one and the partition's later messages
        are held (the partition paused) until it has. Partition order is kept, and nothing past a held
        message is registered, so nothing is committed past it."""
        waits = self.resolver.decoder.waits if self.resolver is not None else (lambda _v: False)
        held, self._held = self._held, {}
        ready: list[Any] = []
        for msgs in (*held.values(), raw):
            for m in msgs:
                key = (m.topic(), m.partition())
                q = self._held.get(key)
                if q is not None:
                    q.append(m)
                elif m.error() is None and waits(m.value()):
                    self._held[key] = [m]
                else:
                    ready.append(m)
        return ready

    def _after_commit(self, committed: dict[tuple[str, int], int], lag: dict[tuple[str, int], int],
                      failed: bool) -> None:
        if failed:
            self.metrics.commit_failures.inc()
        if committed:
            self.access.clear()  # the broker took a commit: the relay is let in (a permission granted meanwhile)
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
                self.rules.watch()
            if now >= summary_due:
                summary_due = now + SUMMARY_EVERY_S
                self.settlement.log_summary()
            await asyncio.sleep(step)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        dlq_task, tick_task, *redrive = tasks
        self.stop.arm_watchdog()
        self.stopping.set()
        if redrive:  # no more parked records taken in (it hears the stop in its poll and registry waits)
            await asyncio.wait(redrive, timeout=1.0)
        if not self.stop.abandon:
            await self._drain(self.config.relay.shutdown_grace_s)
        self._drained = True  # once: closing the consumer revokes, and that revoke must not wait again
        # from here on each step has its own bound, together within consumer.CLOSE_MARGIN_S
        assert self.consumer is not None
        await self.consumer.commit_settled()
        for p in self.pipelines.values():
            await p.cancel()
        closes = [self.consumer.close()]
        if self.parked is not None:
            closes.append(self.parked.commit_and_close())
        if not all(await asyncio.gather(*closes)):  # the live and the redrive consumer leave their groups at once
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

