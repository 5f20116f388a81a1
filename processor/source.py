"""The Kafka side: a confluent-kafka consumer in a consumer group, used from one worker thread.

Every consumer call (consume, pause/resume, commit, close) happens on that
one thread; the event loop hands it requests (pause, resume, offsets to
commit) and gets back raw messages, which it decodes itself: decoding in the
worker thread only made the two threads fight over the GIL (bench/README.md).
Rebalance callbacks run inside
``consume()`` on that thread and hop to the event loop to drain, then commit
what is settled before the partitions go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from processor.codec import Decoder
from processor.config import KafkaConfig
from processor.errors import DecodeError
from processor.events import Event, EventKind, FromSource, Source
from processor.kafka_access import AccessWatch

logger = logging.getLogger(__name__)

Partitions = list[tuple[str, int]]
# commit errors saying the group no longer counts this member: a commit now would be refused (or, during
# close, never answered); nothing is committed until a new assignment
FENCED = frozenset({KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.FENCED_INSTANCE_ID})
COMMIT_TIMEOUT_S = 3.0  # a synchronous commit's own bound (librdkafka's is socket.timeout.ms, 60 s)
CLOSE_TIMEOUT_S = 5.0  # leaving the group


@dataclass(slots=True)
class Decoded(FromSource):
    """A message that is not an event to route: undecodable (``error``) or of a schema the relay does
    not route (``kind`` None). Routable records come out of ``decode_all`` as Events directly."""

    source: Source
    kind: EventKind | None = None
    record: dict[str, Any] | None = None
    error: DecodeError | None = None
    slot: Any = None  # its offset tracker slot, as an Event's (settled once the dead-letter topic has it)


@dataclass
class Poll:
    """What one trip to the worker thread brought back."""

    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    commit_failed: bool = False
    raw: list[Any] = field(default_factory=list)  # confluent_kafka.Message objects, decoded in the loop


def is_error(msg: Any, who: str, access: AccessWatch | None = None) -> bool:
    """Whether a consumed message is an error: logged (``who``: which consumer); a fatal one raises; one
    that keeps the consumer out of the cluster (a permission, a refused login) goes to ``access``."""
    err = msg.error()
    if err is None:
        return False
    if err.fatal():
        raise KafkaException(err)
    if access is not None and access.report(err):
        return True
    logger.warning("%s error: %s", who, err.str())
    return True


class KafkaSource:
    access: AccessWatch | None = None  # where errors that keep the consumer out of the cluster go

    def __init__(self, cfg: KafkaConfig, decoder: Decoder, loop: asyncio.AbstractEventLoop,
                 on_assign: Callable[[Partitions], Coroutine[Any, Any, None]],
                 on_revoke: Callable[[Partitions, bool], Coroutine[Any, Any, dict[tuple[str, int], int]]],
                 access: AccessWatch | None = None) -> None:
        self.cfg = cfg
        self.access = access
        self.decoder = decoder
        self.loop = loop
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        conf = {
            "auto.offset.reset": "earliest",
            # librdkafka prefetches up to 64 MB by default, on top of the relay's own in-flight bound;
            # 32 MB still keeps a decode-bound relay fed, 16 MB starves it (bench/README.md)
            "queued.max.messages.kbytes": 32768,
            **cfg.client,
            "bootstrap.servers": cfg.bootstrap_servers,
            "group.id": cfg.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
        self.consumer = Consumer(conf, logger=logging.getLogger("librdkafka"))
        # cooperative assignors and the KIP-848 protocol hand over partitions incrementally
        self.incremental = ("cooperative" in str(conf.get("partition.assignment.strategy", ""))
                            or str(conf.get("group.protocol", "")).lower() == "consumer")
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="kafka-source")
        self.paused = False  # every assigned partition paused (back-pressure)
        self.held: set[tuple[str, int]] = set()  # partitions paused one by one (``poll(hold=...)``)
        self.assigned: Partitions = []
        self.had_assignment = False
        self.fenced = False  # a commit was refused for a fenced member: no commits until assigned anew
        self.positions: dict[tuple[str, int], int] = {}  # last committed (by the group, read at assignment), for lag
        self.position_timeout_s = 5.0
        self.lag_every_s = 2.0
        self._lag_due = 0.0

    async def start(self) -> None:
        await self.loop.run_in_executor(self.executor, self._subscribe)

    def _subscribe(self) -> None:
        self.consumer.subscribe(self.cfg.topics, on_assign=self._assign_cb, on_revoke=self._revoke_cb,
                                on_lost=self._lost_cb)

    # -- rebalance callbacks (worker thread) --------------------------------
    def _assign_cb(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Eager protocols hand over the whole assignment, cooperative ones only the added partitions
        (the others keep fetching, or stay paused). Either way the new partitions take the source's pause
        state, so one flag describes every assigned partition."""
        parts = [(tp.topic, tp.partition) for tp in partitions]
        logger.info("assigned %s", ", ".join(f"{t}[{p}]" for t, p in parts) or "nothing")
        self.fenced = False  # a member of the new generation
        asyncio.run_coroutine_threadsafe(self._on_assign(parts), self.loop).result()
        if self.incremental:
            consumer.incremental_assign(partitions)
            self.assigned = sorted(set(self.assigned) | set(parts))
        else:
            consumer.assign(partitions)
            self.assigned = sorted(parts)
            self.held.clear()
        if self.paused and partitions:
            consumer.pause(partitions)
        self._read_positions(consumer, partitions)
        self.had_assignment = True

    def _read_positions(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """The group's committed offsets of newly assigned partitions (the start of what is not yet done,
        for the lag), so lag is exported before this process commits: a relay that cannot commit yet (the
        registry away, a vendor blocking) still shows what waits. Where the group has committed nothing,
        the partition's low watermark (``auto.offset.reset: earliest``). Best effort: a partition whose
        position cannot be read now shows its lag after the first commit."""
        if not partitions:
            return
        try:
            tps = consumer.committed([TopicPartition(tp.topic, tp.partition) for tp in partitions],
                                     timeout=self.position_timeout_s)
        except KafkaException as exc:
            logger.warning("committed offsets of the assigned partitions not read (%s): lag shown after the "
                           "first commit", exc)
            return
        for tp in tps:
            key = (tp.topic, tp.partition)
            if tp.error is not None:
                continue
            offset = tp.offset
            if offset < 0:
                try:
                    offset, _hi = consumer.get_watermark_offsets(tp, timeout=self.position_timeout_s, cached=False)
                except KafkaException:
                    continue
            if offset >= 0:
                self.positions[key] = offset

    def _revoke_cb(self, consumer: Consumer, partitions: list[TopicPartition], lost: bool = False) -> None:
        """Drain (the relay's ``on_revoke``), commit what settled unless the partitions are lost or the
        member fenced, and unassign: here, not in confluent-kafka's fallback after the callback, so the
        order is ours and a fenced member never commits on its way out."""
        parts = [(tp.topic, tp.partition) for tp in partitions]
        logger.info("%s %s", "lost" if lost else "revoking", ", ".join(f"{t}[{p}]" for t, p in parts))
        try:
            positions = asyncio.run_coroutine_threadsafe(self._on_revoke(parts, lost), self.loop).result()
            if positions and not lost:
                self._commit(positions, only_new=True)
        finally:
            self.assigned = [tp for tp in self.assigned if tp not in set(parts)]
            self.held -= set(parts)
            if self.incremental:
                consumer.incremental_unassign(partitions)
            else:
                consumer.unassign()

    def _lost_cb(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke_cb(consumer, partitions, lost=True)

    # -- worker-thread operations ---------------------------------------
    def _commit(self, positions: dict[tuple[str, int], int], only_new: bool = False) -> bool:
        """Commit these positions of assigned partitions (``only_new``: those not committed already);
        True when the broker took them. Never for a fenced member."""
        mine = set(self.assigned)
        tps = [TopicPartition(t, p, off) for (t, p), off in positions.items()
               if (t, p) in mine and not (only_new and self.positions.get((t, p)) == off)]
        if not tps:
            return True
        if self.fenced:
            return False
        try:
            self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if err is not None and err.code() in FENCED:
                self.fenced = True
                logger.warning("commit refused: the group fenced this member (%s); nothing more is committed "
                               "until it is assigned partitions anew (their next owner redelivers what settled "
                               "since the last commit)", err.name())
            else:
                logger.warning("commit failed: %s", exc)
            return False
        for tp in tps:
            self.positions[(tp.topic, tp.partition)] = tp.offset
        return True

    def _poll(self, max_messages: int, timeout: float, pause: bool | None,
              commit: dict[tuple[str, int], int] | None, hold: set[tuple[str, int]] | None = None) -> Poll:
        out = Poll()
        c = self.consumer
        if pause is not None and pause != self.paused and self.assigned:
            tps = [TopicPartition(t, p) for t, p in self.assigned]
            (c.pause if pause else c.resume)(tps)
            self.paused = pause
            self.held.clear()
            logger.info("%s fetching on %d partitions", "paused" if pause else "resumed", len(tps))
        if hold is not None and not self.paused:
            hold = hold & set(self.assigned)
            if hold - self.held:
                c.pause([TopicPartition(t, p) for t, p in hold - self.held])
            if self.held - hold:
                c.resume([TopicPartition(t, p) for t, p in self.held - hold if (t, p) in set(self.assigned)])
            self.held = hold
        if commit:
            if self._commit(commit):
                out.committed = {k: v for k, v in commit.items() if k in set(self.assigned)}
            else:
                out.commit_failed = True
        now = time.monotonic()
        if now >= self._lag_due:
            self._lag_due = now + self.lag_every_s
            out.lag = self._lag()
        msgs = c.consume(max_messages, timeout)
        out.raw = msgs
        return out

    def _lag(self) -> dict[tuple[str, int], int]:
        """High watermark minus the committed position, per assigned partition. librdkafka's cached
        watermark moves with every fetch; for a paused partition (no fetches) it would stop, so for those
        the broker is asked (a round trip each, on this thread: only while paused)."""
        lag = {}
        paused = self.paused
        for t, p in self.assigned:
            pos = self.positions.get((t, p))
            if pos is None:
                continue
            ask = paused or (t, p) in self.held
            try:
                _lo, hi = self.consumer.get_watermark_offsets(TopicPartition(t, p), timeout=2.0, cached=not ask)
            except KafkaException:
                continue
            if hi >= 0:
                lag[(t, p)] = max(0, hi - pos)
        return lag

    def decode_all(self, msgs: list[Any]) -> list[Event | Decoded]:
        """In consume order: an Event per routable record, a Decoded (error, or kind None) otherwise."""
        out: list[Event | Decoded] = []
        decode = self.decoder.decode
        append = out.append
        from_message = Source.from_message
        for msg in msgs:
            if msg.error() is not None and is_error(msg, "consumer", self.access):
                continue
            value = msg.value() or b""
            try:
                kind, record = decode(value)
            except DecodeError as exc:
                append(Decoded(from_message(msg), error=exc))
                continue
            if kind is None:
                append(Decoded(from_message(msg), None, record))
                continue
            ts_type, ts = msg.timestamp()
            append(Event(kind, record, msg.topic(), msg.partition(), msg.offset(), ts if ts_type else None,
                         msg.key(), value, msg.headers()))
        return out

    async def poll(self, max_messages: int, timeout: float, pause: bool | None = None,
                   commit: dict[tuple[str, int], int] | None = None,
                   hold: set[tuple[str, int]] | None = None) -> Poll:
        """Fetch up to ``max_messages``; ``pause`` all partitions or none (None: as they are), or ``hold``
        exactly these partitions paused; ``commit`` these positions first."""
        return await self.loop.run_in_executor(self.executor, self._poll, max_messages, timeout, pause, commit,
                                               hold)

    async def commit(self, positions: dict[tuple[str, int], int], timeout_s: float = COMMIT_TIMEOUT_S) -> bool:
        """Commit on the worker thread; False when it failed or was not confirmed within ``timeout_s``
        (the broker may still take it: nothing is lost either way, at most redelivered)."""
        fut = self.loop.run_in_executor(self.executor, self._commit, positions)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            logger.error("commit of %s not confirmed within %gs", ", ".join(
                f"{t}[{p}]@{o}" for (t, p), o in sorted(positions.items())), timeout_s)
            return False

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Leave the group (what settled is committed before this). False when librdkafka did not finish
        closing in time: the process may then exit without waiting for it (the group coordinator drops
        the member after its session timeout; nothing uncommitted is lost)."""
        try:
            await asyncio.wait_for(self.loop.run_in_executor(self.executor, self.consumer.close), timeout_s)
        except TimeoutError:
            logger.error("consumer of %s did not close within %.0fs", ", ".join(self.cfg.topics), timeout_s)
            self.executor.shutdown(wait=False)
            return False
        self.executor.shutdown(wait=True)
        return True
