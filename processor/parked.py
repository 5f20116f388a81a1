"""The relay's redrive of parked events: a consumer of the vendors' retry topics.

Each vendor that parks (``on_outage: park``) has its own retry topic; the relay
reads them all in its own consumer group (``parking.group_id``, default
``<kafka.group_id>.redrive``) and hands each record back to its one vendor's
live pipeline (adapter, batching, concurrency, breaker, retries), through the
same record-to-event path as ``dlq replay`` (``processor.redrive``). It is the consumer loop
(``processor.consumer``) with this class as its handler: the loop polls, commits every
``relay.commit_interval_s`` and stops with the relay; the handler keeps the reservoir and hands
records over.

A partition's records are taken in order, and only as many as the vendor's admission
policy (``processor.admission``) has room for within half its budget (the other half stays
for live events), no more than its budget in records not yet settled (a record parked again
stays unsettled until Kafka acknowledged the write), and only once the head record is due
(``relay.next_attempt_ms``). The redrive's unsettled records count in
``relay.max_inflight_events`` and in the stall detector, as the input's messages do; a
consumer error is logged, a fatal one stops the relay. A
partition is paused while its vendor takes nothing for a while (breaker open, throttled), its
head record is not due, or the records kept in memory for it reach a reservoir (half its
vendor's budget, what it may hand over at once; at least one fetch; resumed at half): a
vendor's backlog waits in Kafka. A vendor that is only busy keeps its partition fetching up
to the reservoir, because librdkafka drops a paused partition's prefetched records and
fetches them again on resume (bench/README.md measures what pausing on every wait cost).
One topic per vendor: one vendor's backlog never sits in front of another's.

A record that waited past its vendor's ``retry.max_elapsed_s`` since its first
failure (``processor.retry.expired``, the one rule) goes to the dead-letter topic as
``exhausted``, with its history; one
that fails again is parked again (a new record, its history carried on). The
retry topics' offsets are committed only past settled records: a crash loses
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from processor.codec import SchemaResolver
from processor.config import Config
from processor.consumer import ConsumerLoop, Fetch
from processor.delivery import VendorPipeline
from processor.events import Event
from processor.metrics import Metrics
from processor.offsets import OffsetTracker, RelaySettlement
from processor.redrive import Decision, Redrive, RelayRecord, undecodable_class
from processor.retry import expired
from processor.source import KafkaSource, Partitions, is_error

logger = logging.getLogger(__name__)


class ParkedRedrive:
    def __init__(self, config: Config, resolver: SchemaResolver, pipelines: dict[str, VendorPipeline],
                 settlement: RelaySettlement, metrics: Metrics, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.topics = config.retry_topics()  # vendor -> its retry topic
        self.vendor_of = {t: v for v, t in self.topics.items()}
        self.pipelines = pipelines
        self.settlement = settlement
        self.metrics = metrics
        self.tracker = OffsetTracker(retry_topics=True)  # its outcomes are counted as redriven too
        self.resolver = resolver  # the relay's: its registry ids are resolved as the live consumer's are
        decoder = resolver.decoder
        self._unresolved: set[int] = set()  # registry ids the reservoir's records name, not answered yet
        # one record-to-event decider per vendor: no filters, no replay maximum (parking is not a replay)
        self.deciders = {v: Redrive(pipelines[v].adapter, decoder, self.tracker, max_replays=None)
                         for v in self.topics}
        k = config.kafka
        group = config.parking.group_id or f"{k.group_id}.redrive"
        # the reservoir is the redrive's buffer: librdkafka's own prefetch (32 MB for the input topics) need
        # only cover a fetch or two
        kafka = k.model_copy(update={"topics": list(self.topics.values()), "group_id": group,
                                     "client": {"queued.max.messages.kbytes": 8192, **k.client,
                                                "auto.offset.reset": "earliest"}})
        self.source = KafkaSource(kafka, decoder, loop, self._on_assign, self._on_revoke)
        self.reservoir: dict[tuple[str, int], deque[RelayRecord]] = {}
        self.fetch_batch = k.consume_batch
        self._full: set[tuple[str, int]] = set()  # partitions paused at their reservoir, until down to half
        self.loop = ConsumerLoop(self.source, self, config.relay.commit_interval_s)
        for v in self.topics:
            metrics.parked_backlog.labels(v).set(0)

    # -- rebalance --------------------------------------------------------------------
    async def _on_assign(self, parts: Partitions) -> None:
        for t, p in parts:
            self.tracker.assign(t, p)

    async def _on_revoke(self, parts: Partitions, lost: bool) -> dict[tuple[str, int], int]:
        """No drain: what is in flight for these partitions is dropped by the pipelines (the new owner
        redelivers it); what settled is committed."""
        mine = set(parts)
        positions = {k: v for k, v in self.tracker.commit_positions(only_changed=False).items() if k in mine}
        for t, p in parts:
            self.tracker.revoke(t, p)
            self.reservoir.pop((t, p), None)
            self._full.discard((t, p))
        return positions

    # -- the loop's handler (processor.consumer) ---------------------------------------------
    async def run(self, stopping: asyncio.Event) -> None:
        await self.source.start()
        await self.loop.run(stopping)

    def turn(self, now: float) -> Fetch:
        return Fetch(self.fetch_batch, 0.2, None, self._holds())

    def committable(self) -> dict[tuple[str, int], int]:
        return self.tracker.commit_positions()

    async def hand_over(self, raw: list[Any], stopping: asyncio.Event) -> None:
        """Into the reservoir; once the registry knows every id it names, the due heads to their vendors."""
        self._take(raw)
        self._unresolved |= self.resolver.decoder.unknown_ids(m.value() for m in raw if m.error() is None)
        if await self._schemas_known(stopping):
            self._release()

    def finished(self) -> bool:
        return False

    def _take(self, raw: list[Any]) -> None:
        """A poll's records into the held queues; a consumer error is logged, a fatal one stops the redrive
        (and so the relay: ``Relay._redrive_ended``)."""
        for msg in raw:
            if is_error(msg, "redrive consumer"):
                continue
            self.reservoir.setdefault((msg.topic(), msg.partition()), deque()).append(RelayRecord.from_message(msg))

    async def _schemas_known(self, stopping: asyncio.Event) -> bool:
        """Whether the registry answered for every id the reservoir's records name (the relay's resolver:
        fetched off the loop, retried with backoff while it cannot be reached). Until it has, nothing is
        handed over: the partitions fill to their reservoir and pause, nothing settles, nothing is
        dead-lettered for the registry."""
        if self._unresolved and await self.resolver.ready_ids(self._unresolved, stopping, wait_s=0.5):
            self._unresolved.clear()
        return not self._unresolved

    def committed(self, committed: dict[tuple[str, int], int], lag: dict[tuple[str, int], int],
                  failed: bool) -> None:
        if committed:
            self.tracker.mark_committed(committed)
        if lag:
            backlog = dict.fromkeys(self.topics, 0)
            for (t, _p), n in lag.items():
                backlog[self.vendor_of[t]] += n
            for v, n in backlog.items():
                self.metrics.parked_backlog.labels(v).set(n)

    def _holds(self) -> set[tuple[str, int]]:
        """The partitions to pause now (see the module's docstring)."""
        now_ms = int(time.time() * 1000)
        hold = set()
        for key, q in self.reservoir.items():
            if not q:
                self._full.discard(key)
                continue
            pipe = self.pipelines[self.vendor_of[key[0]]]
            if pipe.admission.takes_nothing() or not q[0].due(now_ms):
                hold.add(key)
                continue
            high = max(self.fetch_batch, pipe.admission.budget // 2)  # what it may hand over at once
            if len(q) >= high or (key in self._full and len(q) > high // 2):
                self._full.add(key)
                hold.add(key)
            else:
                self._full.discard(key)
        return hold

    def unsettled(self, topic: str) -> int:
        """Records of a vendor's retry topic taken and not yet settled: being delivered, or parked again or
        dead-lettered and not yet acknowledged by Kafka."""
        n = 0
        for (t, _p), track in self.tracker.tracks.items():
            if t == topic:
                track.position()  # drops the settled head
                n += sum(1 for slot in track.slots if slot[1] > 0)
        return n

    def _release(self) -> None:
        """Hand each vendor the due head of its held partitions, as much as it can take now: what its
        admission has room for within half its budget, and no more than its budget in unsettled records
        (a record it parks again leaves its admission count at once, but stays unsettled here until Kafka
        acknowledged the write)."""
        now_ms = int(time.time() * 1000)
        window: dict[str, int] = {}
        for (topic, _p), q in self.reservoir.items():
            if not q:
                continue
            pipe = self.pipelines[self.vendor_of[topic]]
            most = pipe.batcher.max_events
            if topic not in window:
                window[topic] = pipe.admission.budget - self.unsettled(topic)
            # batch after batch while it has room: one batch per poll (up to 0.2 s) would cap a vendor with
            # small batches at a few batches a poll, whatever its capacity
            room = min(pipe.admission.room(share=0.5), window[topic])
            while q and q[0].due(now_ms) and room > 0:
                take: list[RelayRecord] = []
                while q and len(take) < min(most, room) and q[0].due(now_ms):
                    take.append(q.popleft())
                self._redrive(pipe, take, now_ms)
                window[topic] -= len(take)
                room = min(pipe.admission.room(share=0.5), window[topic])

    def _redrive(self, pipe: VendorPipeline, records: list[RelayRecord], now_ms: int) -> None:
        decider = self.deciders[pipe.name]
        max_elapsed_s = pipe.retry.max_elapsed_s
        items: list[Any] = []
        pending: list[int] = []
        events: list[Event] = []
        late: list[tuple[Event, RelayRecord]] = []
        failed: list[tuple[RelayRecord, str]] = []
        for r in records:
            decision, event, reason = decider.decide(r)
            if decision is Decision.DELIVER:
                assert event is not None
                first = r.first_failure_ms
                items.append(event)
                pending.append(1)
                if not r.waiting_on and expired(first, now_ms, max_elapsed_s):
                    late.append((event, r))
                else:
                    events.append(event)
            elif decision is Decision.UNDECODABLE:  # it decoded when it was parked: the schemas changed since
                items.append(r)
                pending.append(1)
                failed.append((r, reason))
            else:  # another vendor's record on this topic (written by hand): not this vendor's to deliver
                items.append(r)
                pending.append(0)
                logger.warning("%s: a record for %s on %s's retry topic; skipped", r.source.where(), r.vendor,
                               pipe.name)
        self.tracker.register_many(items, pending)
        s = self.settlement  # counts these outcomes, as redriven too (the records of a retry topic)
        for event, r in late:
            s.dead_letter(event, pipe.name, "exhausted", r.http_status,
                          f"{r.reason}; waited past retry.max_elapsed_s", 0, r.first_failure_ms, redriven_as="expired")
        for r, reason in failed:
            s.dead_letter(r, pipe.name, undecodable_class(reason), None, reason, 0, r.first_failure_ms)
        if events:
            pipe.submit_redriven(events)

    # -- the end ------------------------------------------------------------------------------
    async def commit_and_close(self) -> bool:
        """After the relay drained its pipelines: commit what settled, leave the group (False: the
        consumer did not close in time)."""
        await self.loop.commit_settled()
        return await self.loop.close()
