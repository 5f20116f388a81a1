"""Commit tracking: an offset is committable only when every vendor it was routed to settled it.

Per partition, a FIFO of slots ``[offset, pending, track, registered]`` in consume order.
Settling decrements ``pending``; the committable position is the offset of the first
slot still pending (or one past the last slot when all are settled). A slot
belongs to one assignment generation: after a revoke, late settlements of
its events are ignored, so nothing is ever committed for a partition we no
longer own, and work still holding such a slot drops it (``is_revoked``).

``Settlement`` is the one owner of outcomes: vendor pipelines report delivered,
dead-lettered and parked events to it; it has the dead-letter and parking
writes made and settles each event's slot once Kafka acknowledged them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# [offset, pending, PartitionTrack, registered (monotonic s)]: small, so a settled message's event can be freed
Slot = list[Any]


def is_revoked(item: Any) -> bool:
    """Whether an event's partition was revoked since it was consumed: its work is dropped, not finished
    (the partition's new owner redelivers it from the last commit)."""
    return not item.slot[2].active


class PartitionTrack:
    __slots__ = ("active", "committed", "key", "last_seen", "owner", "slots")

    def __init__(self, key: tuple[str, int], owner: OffsetTracker) -> None:
        self.key = key
        self.owner = owner  # the tracker whose in-flight count this partition's slots are part of
        self.slots: deque[Slot] = deque()
        self.active = True
        self.committed: int | None = None  # the last position we committed
        self.last_seen: int | None = None

    def position(self) -> int | None:
        """The offset to commit (first unsettled, or next after the last seen)."""
        slots = self.slots
        while slots and slots[0][1] <= 0:
            slots.popleft()
        if slots:
            return slots[0][0]
        return None if self.last_seen is None else self.last_seen + 1

    def oldest_age(self, now: float) -> float:
        """Seconds since the oldest message not yet settled was consumed (0 when none is)."""
        slots = self.slots
        while slots and slots[0][1] <= 0:
            slots.popleft()
        return now - slots[0][3] if slots else 0.0


class OffsetTracker:
    """Not thread-safe: used from the event loop only. A slot settles through any tracker (a vendor
    pipeline holds events of the input topics and of the retry topics, each with its own tracker): the
    in-flight count kept is that of the slot's own tracker."""

    def __init__(self) -> None:
        self.tracks: dict[tuple[str, int], PartitionTrack] = {}
        self.inflight = 0  # messages with at least one vendor not settled

    def assign(self, topic: str, partition: int) -> None:
        self.tracks[(topic, partition)] = PartitionTrack((topic, partition), self)

    def revoke(self, topic: str, partition: int) -> None:
        track = self.tracks.pop((topic, partition), None)
        if track is not None:
            track.active = False
            self.inflight -= sum(1 for s in track.slots if s[1] > 0)

    def _track(self, topic: str, partition: int) -> PartitionTrack:
        track = self.tracks.get((topic, partition))
        if track is None:  # consumed before the assign callback ran: cannot happen with librdkafka, be safe
            track = self.tracks[(topic, partition)] = PartitionTrack((topic, partition), self)
        return track

    def register_many(self, items: Sequence[Any], pending: Iterable[int]) -> None:
        """Record a poll's consumed messages, in consume order: each item's ``topic``, ``partition`` and
        ``offset`` say where it came from, ``pending`` how many (vendors, or the dead-letter topic) must
        settle it; each item gets its ``slot``."""
        topic: str | None = None
        part = -1
        track: PartitionTrack | None = None
        added = 0
        now = time.monotonic()
        for item, n in zip(items, pending, strict=True):
            if item.partition != part or item.topic != topic:  # consume() returns runs of one partition
                topic, part = item.topic, item.partition
                track = self._track(topic, part)
            offset = item.offset
            item.slot = slot = [offset, n, track, now]
            if n > 0:
                track.slots.append(slot)  # type: ignore[union-attr]
                added += 1
            track.last_seen = offset  # type: ignore[union-attr]
        self.inflight += added

    @staticmethod
    def settle(slot: Slot, n: int = 1) -> None:
        if slot[1] <= 0:
            return
        slot[1] -= n
        track = slot[2]
        if slot[1] <= 0 and track.active:
            track.owner.inflight -= 1

    @staticmethod
    def settle_items(items: Iterable[Any]) -> None:
        """``settle(item.slot)`` for each item (one vendor settled each), in one call."""
        for item in items:
            slot = item.slot
            pending = slot[1]
            if pending <= 0:
                continue
            slot[1] = pending - 1
            if pending == 1:
                track = slot[2]
                if track.active:
                    track.owner.inflight -= 1

    def commit_positions(self, only_changed: bool = True) -> dict[tuple[str, int], int]:
        out = {}
        for key, track in self.tracks.items():
            pos = track.position()
            if pos is not None and (not only_changed or pos != track.committed):
                out[key] = pos
        return out

    def oldest_unsettled(self, now: float | None = None) -> dict[tuple[str, int], float]:
        """Per assigned partition, the age in seconds of its oldest unsettled message (0 when none)."""
        now = time.monotonic() if now is None else now
        return {key: track.oldest_age(now) for key, track in self.tracks.items()}

    def mark_committed(self, positions: dict[tuple[str, int], int]) -> None:
        for key, pos in positions.items():
            track = self.tracks.get(key)
            if track is not None:
                track.committed = pos


class Writer(Protocol):
    """What ``Settlement`` needs of the acknowledged producer (``processor.deadletter.RecordWriter``)."""

    def write(self, source: Any, vendor: str | None, error_class: str, status: int | None, reason: str,
              attempts: int, first_ms: int | None, on_ack: Any) -> None: ...

    def park(self, source: Any, vendor: str, reason: str, attempts: int, first_ms: int | None,
             next_attempt_ms: int, on_ack: Any) -> None: ...


class Settlement:
    """The one owner of outcomes. Vendor pipelines and routing report here what became of each event;
    a dead-lettered or parked event settles only when Kafka acknowledged its record.

    Dead letters and parkings are logged as aggregated lines (``log_summary``, once an interval, with
    counts per vendor and class and one redacted reason), never one line an event."""

    def __init__(self, tracker: OffsetTracker, writer: Writer) -> None:
        self.tracker = tracker
        self.writer = writer
        self._dead: Counter[tuple[str, str]] = Counter()
        self._parked: Counter[tuple[str, str]] = Counter()
        self._reasons: dict[tuple[str, str], str] = {}

    def settle_many(self, events: Iterable[Any]) -> None:
        """Delivered or filtered: one vendor settled each of these."""
        self.tracker.settle_items(events)

    def dead_letter(self, event: Any, vendor: str | None, error_class: str, status: int | None, reason: str,
                    attempts: int = 0, first_ms: int | None = None) -> None:
        key = (vendor or "none", error_class)
        self._dead[key] += 1
        self._reasons.setdefault(key, reason)
        slot, settle = event.slot, self.tracker.settle
        self.writer.write(event.source, vendor, error_class, status, reason, attempts, first_ms,
                          lambda: settle(slot))

    def park(self, event: Any, vendor: str, why: str, reason: str, attempts: int, first_ms: int | None,
             next_attempt_ms: int) -> None:
        """Onto the vendor's retry topic (``why``: breaker_open, budget_full, retry_budget)."""
        key = (vendor, why)
        self._parked[key] += 1
        self._reasons.setdefault(key, reason)
        slot, settle = event.slot, self.tracker.settle
        self.writer.park(event.source, vendor, reason or why, attempts, first_ms, next_attempt_ms, lambda: settle(slot))

    def log_summary(self) -> None:
        """One line for what was dead-lettered and one for what was parked since the last call."""
        from processor.deadletter import redact

        for what, counts in (("dead-lettered", self._dead), ("parked", self._parked)):
            if counts:
                logger.warning("%s %d events: %s", what, sum(counts.values()), "; ".join(
                    f"{v}/{c}: {n} (e.g. {redact(self._reasons.get((v, c), ''))})"
                    for (v, c), n in sorted(counts.items())))
                counts.clear()
        self._reasons.clear()
