"""Commit tracking: an offset is committable only when every vendor it was routed to settled it.

Per partition, a FIFO of slots ``[offset, pending, track, registered, claimed]`` in consume order.
Settling decrements ``pending``; the committable position is the offset of the first
slot still pending (or one past the last slot when all are settled). A slot
belongs to one assignment generation: after a revoke, late settlements of
its events are ignored, so nothing is ever committed for a partition we no
longer own, and work still holding such a slot drops it (``is_revoked``).

``Settlement`` (a Protocol) is what vendor pipelines report outcomes to: delivered,
filtered, dead-lettered, parked, or dropped (its partition was revoked). ``Outcomes``
is its one owner of the rule "exactly one outcome per (event, vendor)": each vendor
has a bit (``vendor_bit``), and a slot's ``claimed`` holds the bits of the vendors that
reported an outcome for that message. A second outcome for the same pair is refused and
logged as a bug, never a second release of the message's pending count (which could let
a commit pass a vendor that has not settled). ``Outcomes`` also counts them
(``processor_vendor_events_total``, and ``processor_redriven_events_total`` for the
events of the retry topics). ``RelaySettlement`` is the relay's: it has the dead-letter
and parking writes made and settles each event's slot once Kafka acknowledged them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from processor.events import EventKind

# the park reasons where the vendor made the events wait (a 429, a setup error): their redrive never exhausts them
WAITING_ON_VENDOR = frozenset({"throttled", "setup_error"})

if TYPE_CHECKING:
    from processor.metrics import Metrics

logger = logging.getLogger(__name__)

# [offset, pending, PartitionTrack, registered (monotonic s), claimed (vendor bits)]: small, so a settled
# message's event can be freed
Slot = list[Any]
CLAIMED = 4
_BITS: dict[str, int] = {}
_KINDS = tuple(EventKind)


def vendor_bit(vendor: str | None) -> int:
    """The bit that stands for ``vendor`` in a slot's ``claimed`` (None: the dead-letter topic, for what no
    vendor can take). Assigned on first use, the same for every tracker of the process."""
    key = vendor or ""
    bit = _BITS.get(key)
    if bit is None:
        bit = _BITS[key] = 1 << len(_BITS)
    return bit


def is_revoked(item: Any) -> bool:
    """Whether an event's partition was revoked since it was consumed: its work is dropped, not finished
    (the partition's new owner redelivers it from the last commit)."""
    return not item.slot[2].active


def any_revoked(items: Iterable[Any]) -> bool:
    """Whether any item's partition was revoked since it was consumed: ``any(map(is_revoked, items))``
    asking each partition once a run (a batch is asked before each round of its delivery, nearly always
    to hear no; its events come in runs of a few partitions)."""
    last = None
    for item in items:
        track = item.slot[2]
        if track is not last:
            if not track.active:
                return True
            last = track
    return False


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

    def __init__(self, retry_topics: bool = False) -> None:
        self.tracks: dict[tuple[str, int], PartitionTrack] = {}
        self.inflight = 0  # messages with at least one vendor not settled
        self.retry_topics = retry_topics  # its messages are parked records being redriven (counted as such)

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
            item.slot = slot = [offset, n, track, now, 0]
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
    def settle_items(items: Sequence[Any]) -> None:
        """``settle(item.slot)`` for each item (one vendor settled each), in one call (no outcome claimed)."""
        OffsetTracker.claim_and_settle(items, 0)

    @staticmethod
    def claim_and_settle(items: Sequence[Any], bit: int) -> list[Any] | None:
        """``settle_items`` for the items the vendor of ``bit`` has not given an outcome yet, marking them,
        in one pass (the delivered path: one call a request); returns the refused items (None: none)."""
        refused: list[Any] | None = None
        for item in items:
            slot = item.slot
            claimed = slot[4]
            if claimed & bit:
                if refused is None:
                    refused = []
                refused.append(item)
                continue
            slot[4] = claimed | bit
            pending = slot[1]
            if pending <= 0:
                continue
            slot[1] = pending - 1
            if pending == 1:
                track = slot[2]
                if track.active:
                    track.owner.inflight -= 1
        return refused

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
    """What ``RelaySettlement`` needs of the acknowledged producer (``processor.deadletter.DeadLetterWriter``)."""

    def write(self, source: Any, vendor: str | None, error_class: str, status: int | None, reason: str,
              attempts: int, first_ms: int | None, on_ack: Callable[[], None]) -> None: ...

    def park(self, source: Any, vendor: str, reason: str, attempts: int, first_ms: int | None,
             next_attempt_ms: int, on_ack: Callable[[], None], waiting_on: str = "") -> None: ...


class Settlement(Protocol):
    """What a vendor pipeline reports each event's one outcome to. Every method takes the event(s) and the
    vendor, and says how many of them it accepted: an event that already has an outcome for this vendor is
    refused (a bug, logged), and the pipeline must not count it as leaving a second time.

    Implemented by ``RelaySettlement`` (the relay) and ``processor.redrive.Redrive`` (``dlq replay``)."""

    def settle_many(self, events: Sequence[Any], vendor: str, outcome: str = "delivered") -> int:
        """Delivered (or ``filtered`` by the adapter): settled at once."""

    def dead_letter(self, event: Any, vendor: str | None, error_class: str, status: int | None, reason: str,
                    attempts: int = 0, first_ms: int | None = None) -> bool:
        """Onto the dead-letter topic: settled once Kafka acknowledged the record."""

    def park(self, event: Any, vendor: str, why: str, reason: str, attempts: int, first_ms: int | None,
             next_attempt_ms: int) -> bool:
        """Onto the vendor's retry topic: settled once Kafka acknowledged the record."""

    def drop(self, events: Sequence[Any], vendor: str) -> int:
        """Work of a revoked partition: no outcome here, the partition's new owner redelivers it."""

    def has_outcome(self, item: Any, vendor: str) -> bool:
        """Whether ``vendor`` reported an outcome for ``item`` (or dropped it)."""


class Outcomes:
    """Exactly one outcome per (event, vendor), and the outcome counts: the part of settlement every
    implementation shares. Event loop only."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.refused = 0  # second outcomes refused (bugs)
        self._children: dict[tuple[str, str, str], Any] = {}

    def vacant(self, item: Any, vendor: str | None) -> bool:
        """Whether ``vendor`` has given ``item`` no outcome yet; if it has, the new one is refused (logged)."""
        if item.slot[CLAIMED] & vendor_bit(vendor):
            self._refuse(item, vendor, 1)
            return False
        return True

    def mark(self, item: Any, vendor: str | None) -> None:
        item.slot[CLAIMED] |= vendor_bit(vendor)

    def claim_many(self, events: Sequence[Any], vendor: str) -> Sequence[Any]:
        """``claim`` for each event: the ones claimed now (``events`` itself when all are, the common case)."""
        bit = vendor_bit(vendor)
        fresh: list[Any] | None = None
        for i, ev in enumerate(events):
            slot = ev.slot
            if slot[CLAIMED] & bit:
                if fresh is None:
                    fresh = list(events[:i])
                self._refuse(ev, vendor, 1)
            else:
                slot[CLAIMED] |= bit
                if fresh is not None:
                    fresh.append(ev)
        return events if fresh is None else fresh

    def has_outcome(self, item: Any, vendor: str) -> bool:
        return bool(item.slot[CLAIMED] & vendor_bit(vendor))

    def settle_many(self, events: Sequence[Any], vendor: str, outcome: str = "delivered") -> int:
        """Delivered or filtered: claimed, settled and counted in one pass; how many were accepted."""
        refused = OffsetTracker.claim_and_settle(events, vendor_bit(vendor))
        if refused is not None:
            for ev in refused:
                self._refuse(ev, vendor, 1)
            kept = list(events)
            for r in refused:  # one occurrence each (a bug path: may be slow)
                del kept[next(i for i, ev in enumerate(kept) if ev is r)]
            events = kept
        self.count(vendor, events, outcome)
        return len(events)

    def drop(self, events: Sequence[Any], vendor: str) -> int:
        """Claim the events of revoked partitions (no write: their new owner redelivers them); an event
        of a partition still ours is refused (a bug: it would never settle), left for a real outcome."""
        live = [ev for ev in events if not is_revoked(ev)]
        if live:
            self.refused += len(live)
            logger.error("BUG: %d event(s) of %s dropped while their partition is still assigned (e.g. %s); "
                         "refused", len(live), vendor, live[0].where())
            events = [ev for ev in events if is_revoked(ev)]
        return len(self.claim_many(events, vendor))

    def _refuse(self, item: Any, vendor: str | None, n: int) -> None:
        self.refused += n
        where = item.where() if hasattr(item, "where") else f"{item.topic}[{item.partition}]@{item.offset}"
        logger.error("BUG: a second outcome for %d event(s) of %s (e.g. %s) refused; each keeps its first",
                     n, vendor or "the dead-letter topic", where)

    def count(self, vendor: str | None, items: Sequence[Any], outcome: str, redriven_as: str | None = None) -> None:
        """``processor_vendor_events_total`` for these items, one increment per kind; for items of a retry
        topic (parked records being redriven) ``processor_redriven_events_total`` too, as ``redriven_as``
        (default: ``outcome``)."""
        m = self.metrics
        if m is None or vendor is None or not items:
            return
        first = items[0]
        n = len(items)
        if n == 1:
            self._inc(vendor, getattr(first, "kind", None), outcome, 1)
        else:  # an array vendor's request mixes views and orders: one pass lists the kinds, then
            # ``list.count`` (identity first, in C) counts each, no dict update an event
            kinds = [ev.kind for ev in items]
            left = n
            for k in _KINDS:
                c = kinds.count(k)
                if c:
                    self._inc(vendor, k, outcome, c)
                    left -= c
            if left:  # None (no event: nothing to count) or a kind the relay does not know
                for k in {k for k in kinds if k not in _KINDS}:
                    self._inc(vendor, k, outcome, kinds.count(k))
        if first.slot[2].owner.retry_topics:
            m.redriven.labels(vendor, redriven_as or outcome).inc(len(items))

    def _inc(self, vendor: str, kind: Any, outcome: str, n: int) -> None:
        if kind is None:  # a record that is no event (undecodable): no kind to count it under
            return
        key = (vendor, kind.value, outcome)
        child = self._children.get(key)
        if child is None:
            assert self.metrics is not None
            child = self._children[key] = self.metrics.vendor_events.labels(*key)
        child.inc(n)


class SettlesThroughOutcomes:
    """The settlement calls that ``Outcomes`` answers alone (one outcome per event and vendor, counted),
    for a settlement that keeps one as ``self.outcomes``: the relay's and the redrive's."""

    outcomes: Outcomes

    def settle_many(self, events: Sequence[Any], vendor: str, outcome: str = "delivered") -> int:
        return self.outcomes.settle_many(events, vendor, outcome)

    def drop(self, events: Sequence[Any], vendor: str) -> int:
        return self.outcomes.drop(events, vendor)

    def has_outcome(self, item: Any, vendor: str) -> bool:
        return self.outcomes.has_outcome(item, vendor)


class RelaySettlement(SettlesThroughOutcomes):
    """The relay's settlement: delivered and filtered events settle at once; a dead-lettered or parked
    event settles only when Kafka acknowledged its record. Work of a revoked partition is dropped,
    never written: the partition's new owner redelivers it.

    Dead letters and parkings are logged as aggregated lines (``log_summary``, once an interval, with
    counts per vendor and class and one redacted reason), never one line an event."""

    def __init__(self, tracker: OffsetTracker, writer: Writer, metrics: Metrics | None = None) -> None:
        self.tracker = tracker
        self.writer = writer
        self.outcomes = Outcomes(metrics)
        self._dead: Counter[tuple[str, str]] = Counter()
        self._parked: Counter[tuple[str, str]] = Counter()
        self._reasons: dict[tuple[str, str], str] = {}

    def dead_letter(self, event: Any, vendor: str | None, error_class: str, status: int | None, reason: str,
                    attempts: int = 0, first_ms: int | None = None, redriven_as: str = "dead_lettered") -> bool:
        """The write is made before the outcome is recorded: a write that raises leaves the event without
        one (the caller's last resort can still give it one). ``redriven_as``: the redrive's own label for
        a parked record's event (``expired``: it waited past ``retry.max_elapsed_s`` before it was redriven)."""
        o = self.outcomes
        if not o.vacant(event, vendor):
            return False
        if is_revoked(event):
            o.mark(event, vendor)
            return True  # its new owner redelivers it
        slot, settle = event.slot, self.tracker.settle
        self.writer.write(event.source, vendor, error_class, status, reason, attempts, first_ms,
                          lambda: settle(slot))
        o.mark(event, vendor)
        o.count(vendor, (event,), "dead_lettered", redriven_as)
        key = (vendor or "none", error_class)
        self._dead[key] += 1
        self._reasons.setdefault(key, reason)
        return True

    def park(self, event: Any, vendor: str, why: str, reason: str, attempts: int, first_ms: int | None,
             next_attempt_ms: int) -> bool:
        """Onto the vendor's retry topic (``why``: breaker_open, budget_full, retry_budget)."""
        o = self.outcomes
        if not o.vacant(event, vendor):
            return False
        if is_revoked(event):
            o.mark(event, vendor)
            return True
        slot, settle = event.slot, self.tracker.settle
        self.writer.park(event.source, vendor, reason or why, attempts, first_ms, next_attempt_ms, lambda: settle(slot),
                         waiting_on=why if why in WAITING_ON_VENDOR else "")
        o.mark(event, vendor)
        o.count(vendor, (event,), "parked")
        if o.metrics is not None:
            o.metrics.parked.labels(vendor, why).inc()
        key = (vendor, why)
        self._parked[key] += 1
        self._reasons.setdefault(key, reason)
        return True
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
