"""Commit tracking: an offset is committable only when every vendor it was routed to settled it.

Per partition, a FIFO of slots ``[offset, pending, track]`` in consume order. Settling
decrements ``pending``; the committable position is the offset of the first
slot still pending (or one past the last slot when all are settled). A slot
belongs to one assignment generation: after a revoke, late settlements of
its events are ignored, so nothing is ever committed for a partition we no
longer own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

Slot = list[Any]  # [offset, pending, PartitionTrack]: small, so a settled message's event can be freed


class PartitionTrack:
    __slots__ = ("active", "committed", "key", "last_seen", "slots")

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
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


class OffsetTracker:
    """Not thread-safe: used from the event loop only."""

    def __init__(self) -> None:
        self.tracks: dict[tuple[str, int], PartitionTrack] = {}
        self.inflight = 0  # messages with at least one vendor not settled

    def assign(self, topic: str, partition: int) -> None:
        self.tracks[(topic, partition)] = PartitionTrack((topic, partition))

    def revoke(self, topic: str, partition: int) -> None:
        track = self.tracks.pop((topic, partition), None)
        if track is not None:
            track.active = False
            self.inflight -= sum(1 for s in track.slots if s[1] > 0)

    def _track(self, topic: str, partition: int) -> PartitionTrack:
        track = self.tracks.get((topic, partition))
        if track is None:  # consumed before the assign callback ran: cannot happen with librdkafka, be safe
            track = self.tracks[(topic, partition)] = PartitionTrack((topic, partition))
        return track

    def register_many(self, items: Sequence[Any], pending: Iterable[int]) -> None:
        """Record a poll's consumed messages, in consume order: each item's ``topic``, ``partition`` and
        ``offset`` say where it came from, ``pending`` how many (vendors, or the dead-letter topic) must
        settle it; each item gets its ``slot``."""
        topic: str | None = None
        part = -1
        track: PartitionTrack | None = None
        added = 0
        for item, n in zip(items, pending, strict=True):
            if item.partition != part or item.topic != topic:  # consume() returns runs of one partition
                topic, part = item.topic, item.partition
                track = self._track(topic, part)
            offset = item.offset
            item.slot = slot = [offset, n, track]
            if n > 0:
                track.slots.append(slot)  # type: ignore[union-attr]
                added += 1
            track.last_seen = offset  # type: ignore[union-attr]
        self.inflight += added

    def settle(self, slot: Slot, n: int = 1) -> None:
        if slot[1] <= 0:
            return
        slot[1] -= n
        if slot[1] <= 0 and slot[2].active:
            self.inflight -= 1

    def settle_items(self, items: Iterable[Any]) -> None:
        """``settle(item.slot)`` for each item (one vendor settled each), in one call."""
        done = 0
        for item in items:
            slot = item.slot
            pending = slot[1]
            if pending <= 0:
                continue
            slot[1] = pending - 1
            if pending == 1 and slot[2].active:
                done += 1
        self.inflight -= done

    def commit_positions(self, only_changed: bool = True) -> dict[tuple[str, int], int]:
        out = {}
        for key, track in self.tracks.items():
            pos = track.position()
            if pos is not None and (not only_changed or pos != track.committed):
                out[key] = pos
        return out

    def mark_committed(self, positions: dict[tuple[str, int], int]) -> None:
        for key, pos in positions.items():
            track = self.tracks.get(key)
            if track is not None:
                track.committed = pos
