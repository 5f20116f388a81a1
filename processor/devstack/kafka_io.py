"""Small Kafka helpers shared by the demo, the tests and the benchmark: produce sample
events, read a topic to its end, read a group's committed offsets."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition


def produce(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]],
            headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
            settings: dict[str, Any] | None = None) -> int:
    """Produce every message and wait until the broker acknowledged all; ``settings`` tune the producer."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True,
                  "queue.buffering.max.messages": 1_000_000, "log_level": 3, **(settings or {})})
    n = 0
    for key, value in messages:
        kwargs: dict[str, Any] = {"key": key, "value": value, "headers": headers}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                p.produce(topic, **kwargs)
                break
            except BufferError:
                p.poll(0.1)
        n += 1
        if n % 10_000 == 0:
            p.poll(0)
    left = p.flush(60)
    if left:
        raise RuntimeError(f"{left} messages not acknowledged by the broker")
    return n


def read_all(bootstrap: str, topic: str, expect: int | None = None, timeout_s: float = 30.0,
             idle_s: float = 2.0) -> list[Any]:
    """Every message on ``topic`` (all partitions) from the start: until ``expect`` arrived, or idle."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "log_level": 3})
    md = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if expect is not None and len(out) >= expect:
                break
            if expect is None and time.monotonic() - last > idle_s:
                break
            for m in c.consume(1000, 0.2):
                if m.error() is None:
                    out.append(m)
                    last = time.monotonic()
    finally:
        c.close()
    return out


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, "log_level": 3})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        tps = c.committed([TopicPartition(topic, p) for p in md.partitions], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """One past the last offset of each partition, by reading the topic (the local broker's
    ListOffsets answer for "latest" is not reliable, so this does not ask for watermarks)."""
    out: dict[int, int] = {}
    for m in read_all(bootstrap, topic, idle_s=1.0):
        out[m.partition()] = max(out.get(m.partition(), 0), m.offset() + 1)
    return out
