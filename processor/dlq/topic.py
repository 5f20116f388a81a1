"""The dead-letter topic for one bounded read, and what names and bounds it: the vendor's replay group,
the operator's time and offset arguments.

A read goes from a position to the partition's end as of the call: the high watermark Kafka reports
when the reader is built. Records written after that (a replay's own write-backs) are the next run's.
The reader is an assign()ed consumer with the config's ``kafka.client`` settings: it reads and commits
the offsets of its group but never joins it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from processor.config import Config
from processor.errors import ConfigError, FatalError
from processor.kafka_access import AccessWatch, reach
from processor.redrive import RelayRecord
from processor.source import CLOSE_TIMEOUT_S, COMMIT_TIMEOUT_S, Poll
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
        self.access = AccessWatch("the dead-letter reader")  # a refused login or TLS named at once
        self.consumer = Consumer({**conf, "error_cb": self.access}, logger=logging.getLogger("librdkafka"))
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

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KafkaException as exc:
            raise FatalError(f"Kafka at {self.bootstrap} did not answer: {exc.args[0].str()}") from exc

    def _partitions(self) -> list[int]:
        try:
            md = reach(self.consumer, self.access, self.timeout_s, self.topic)
        except KafkaException as exc:
            if self.access.problem is not None:
                raise FatalError(f"Kafka at {self.bootstrap} refuses the dead-letter reader: "
                                 f"{self.access.problem}") from exc
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
            err = msg.error()
            p, offset = msg.partition() or 0, msg.offset() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if offset >= self.ends.get(p, 0):
                        self._close(p)
                    continue
                if err.fatal():
                    raise FatalError(f"consumer failed: {err.str()}")
                logger.warning("consumer error: %s", err.str())
                continue
            if p not in self.open or offset >= self.ends[p]:
                continue  # written after the run started: the next run reads it
            out.append(RelayRecord.from_message(msg))
            if offset + 1 >= self.ends[p]:
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


class DlqFeed:
    """A ``DlqTopic`` as the consumer loop's feed (``processor.consumer.Feed``): each call on the reader's
    own thread, commits and the close bounded; ``pause`` and ``hold`` do not apply (the reader pauses a
    partition itself at its end)."""

    def __init__(self, reader: DlqTopic, executor: ThreadPoolExecutor) -> None:
        self.reader = reader
        self.executor = executor

    async def poll(self, max_messages: int, timeout: float, pause: bool | None = None,
                   commit: dict[tuple[str, int], int] | None = None,
                   hold: set[tuple[str, int]] | None = None) -> Poll:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._poll, max_messages, timeout,
                                                                commit)

    def _poll(self, max_messages: int, timeout: float, commit: dict[tuple[str, int], int] | None) -> Poll:
        out = Poll()
        if commit:
            if self.reader.commit(commit):
                out.committed = dict(commit)
            else:
                out.commit_failed = True
        out.raw = self.reader.consume(max_messages, timeout)
        return out

    async def commit(self, positions: dict[tuple[str, int], int], timeout_s: float = COMMIT_TIMEOUT_S) -> bool:
        fut = asyncio.get_running_loop().run_in_executor(self.executor, self.reader.commit, positions)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            logger.error("commit of the replay position not confirmed within %gs", timeout_s)
            return False

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.executor, self.reader.close),
                                   timeout_s)
        except TimeoutError:
            logger.error("the dead-letter topic's reader did not close within %.0fs", timeout_s)
            self.executor.shutdown(wait=False)
            return False
        self.executor.shutdown(wait=True)
        return True
