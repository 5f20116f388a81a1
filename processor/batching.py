"""Per-vendor batches that close on max events, max bytes or max wait, whichever comes first."""

from __future__ import annotations

import time
from operator import attrgetter

from processor.events import Event
from processor.vendors.base import BatchSettings

_size = attrgetter("size")


class Batch:
    __slots__ = ("bytes", "deadline", "events")

    def __init__(self, deadline: float) -> None:
        self.events: list[Event] = []
        self.bytes = 0
        self.deadline = deadline


class Batcher:
    """Accumulates events; ``add`` returns a batch when it closed on size, ``due`` one whose window ended."""

    def __init__(self, settings: BatchSettings, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.max_events = settings.max_events
        self.max_bytes = settings.max_bytes
        self.max_wait = settings.max_wait_ms / 1000
        self.clock = clock
        self.current: Batch | None = None

    def __len__(self) -> int:
        return len(self.current.events) if self.current else 0

    def add(self, event: Event) -> list[Event] | None:
        cur = self.current
        if cur is None:
            cur = self.current = Batch(self.clock() + self.max_wait)
        elif cur.bytes + event.size > self.max_bytes and cur.events:
            full = cur.events
            cur = self.current = Batch(self.clock() + self.max_wait)
            cur.events.append(event)
            cur.bytes = event.size
            return full
        cur.events.append(event)
        cur.bytes += event.size
        if len(cur.events) >= self.max_events or cur.bytes >= self.max_bytes:
            self.current = None
            return cur.events
        return None

    def add_many(self, events: list[Event]) -> list[list[Event]]:
        """``add`` for each event, in order: the batches that closed. Runs that fit the open batch
        without reaching its byte limit are added as a slice, not one by one."""
        closed: list[list[Event]] = []
        i, n = 0, len(events)
        while i < n:
            cur = self.current
            if cur is None:
                cur = self.current = Batch(self.clock() + self.max_wait)
            chunk = events[i:i + self.max_events - len(cur.events)]
            i += len(chunk)
            size = sum(map(_size, chunk))
            if cur.bytes + size < self.max_bytes:
                cur.events += chunk
                cur.bytes += size
                if len(cur.events) >= self.max_events:
                    self.current = None
                    closed.append(cur.events)
                continue
            for event in chunk:  # the byte limit falls inside this run
                batch = self.add(event)
                if batch is not None:
                    closed.append(batch)
        return closed

    def deadline(self) -> float | None:
        return self.current.deadline if self.current else None

    def due(self, now: float | None = None) -> list[Event] | None:
        cur = self.current
        if cur is not None and (now if now is not None else self.clock()) >= cur.deadline:
            self.current = None
            return cur.events
        return None

    def flush(self) -> list[Event] | None:
        cur, self.current = self.current, None
        return cur.events if cur and cur.events else None
