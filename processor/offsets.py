"""Commit tracking: an offset is committable only when every vendor it was routed to settled it.

Per partition, a FIFO of slots ``[offset, pending]`` in consume order. Settling
decrements ``pending``; the committable position is the offset of the first
slot still pending (or one past the last slot when all are settled). A slot
belongs to one assignment generation: after a revoke, late settlements of
its events are ignored, so nothing is ever committed for a partition we no
longer own.
"""

from __future__ import annotations

from collections import deque


class PartitionTrack:
    __slots__ = ("active", "committed", "key", "last_seen", "slots")

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.slots: deque[list[int]] = deque()
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

    def register(self, topic: str, partition: int, offset: int, pending: int) -> tuple[PartitionTrack, list[int]]:
        """Record a consumed message that ``pending`` vendors (or the DLQ) must settle."""
        track = self.tracks.get((topic, partition))
        if track is None:  # consumed before the assign callback ran: cannot happen with librdkafka, be safe
            track = self.tracks[(topic, partition)] = PartitionTrack((topic, partition))
        slot = [offset, pending]
        if pending > 0:
            track.slots.append(slot)
            self.inflight += 1
        track.last_seen = offset
        return track, slot

    def settle(self, handle: tuple[PartitionTrack, list[int]], n: int = 1) -> None:
        track, slot = handle
        if slot[1] <= 0:
            return
        slot[1] -= n
        if slot[1] <= 0 and track.active:
            self.inflight -= 1

    def settle_many(self, handles: list[tuple[PartitionTrack, list[int]]]) -> None:
        """``settle(handle)`` for each handle (one vendor settled each), in one call."""
        done = 0
        for track, slot in handles:
            if slot[1] <= 0:
                continue
            slot[1] -= 1
            if slot[1] <= 0 and track.active:
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
