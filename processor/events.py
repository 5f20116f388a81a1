"""Canonical events: the decoded Avro record plus where it came from.

The record is the dict fastavro decodes (field names as in schemas/); adapters
read it directly so the hot path builds no intermediate objects.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class EventKind(StrEnum):
    PRODUCT_VIEW = "product_view"
    ORDER = "order"


# Avro full name of the top-level record -> event kind.
SCHEMA_KINDS: dict[str, EventKind] = {
    "shop.events.ProductView": EventKind.PRODUCT_VIEW,
    "shop.events.OrderCompleted": EventKind.ORDER,
}


class Source:
    """Where a message came from: what the dead-letter record and the offset tracker need.

    Built from a confluent_kafka.Message (or by tests directly)."""

    __slots__ = ("headers", "key", "offset", "partition", "timestamp_ms", "topic", "value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int | None,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]] | None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp_ms = timestamp_ms
        self.key = key
        self.value = value
        self.headers = headers

    @classmethod
    def from_message(cls, msg: Any) -> Source:
        ts_type, ts = msg.timestamp()
        return cls(
            msg.topic(), msg.partition(), msg.offset(), ts if ts_type else None,
            msg.key(), msg.value() or b"", msg.headers(),
        )

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class FromSource:
    """What wraps a message (``source``) and stands for it where its place is asked: its topic,
    partition and offset (the offset tracker and the dead-letter writer read these)."""

    __slots__ = ()
    source: Source

    @property
    def topic(self) -> str:
        return self.source.topic

    @property
    def partition(self) -> int:
        return self.source.partition

    @property
    def offset(self) -> int:
        return self.source.offset


# ``Event.invalid`` before validation (processor.validation): compared by identity, never changed. Not
# empty, so truthy as the violations of an invalid event are: a batch is all valid when no event's
# ``invalid`` is truthy (one ``any`` over the batch, Adapter.plan's fast path).
UNCHECKED: dict[str, str] = {"": "not validated yet"}


class Event(Source):
    """One decoded event on its way to the vendors: its message's fields (an Event is its own
    ``Source``: one object a message, not two) plus the decoded record.

    ``slot`` is the offset tracker's slot: settling the event for a vendor
    decrements it; the offset is committable once every vendor settled.

    ``invalid`` is what ``processor.validation`` found: None for a valid event, else field key ->
    reason; ``UNCHECKED`` until it ran."""

    __slots__ = ("invalid", "kind", "record", "size", "slot")

    def __init__(self, kind: EventKind, record: dict[str, Any], topic: str, partition: int, offset: int,
                 timestamp_ms: int | None, key: bytes | None, value: bytes,
                 headers: list[tuple[str, bytes]] | None) -> None:
        self.topic = topic  # Source's fields, set here: one call an event, not two
        self.partition = partition
        self.offset = offset
        self.timestamp_ms = timestamp_ms
        self.key = key
        self.value = value
        self.headers = headers
        self.kind = kind
        self.record = record
        self.size = len(value)
        self.slot: Any = None
        self.invalid: dict[str, str] | None = UNCHECKED

    @classmethod
    def of(cls, kind: EventKind, record: dict[str, Any], source: Source) -> Event:
        """The event of ``record`` decoded from ``source`` (tests and tools; the relay builds Events
        from messages directly)."""
        return cls(kind, record, source.topic, source.partition, source.offset, source.timestamp_ms,
                   source.key, source.value, source.headers)

    @property
    def source(self) -> Source:
        return self

    @property
    def site_id(self) -> str:
        return self.record["site_id"]

    @property
    def event_id(self) -> str:
        return self.record["event_id"]

    def __repr__(self) -> str:
        return f"Event({self.kind}, {self.where()})"
