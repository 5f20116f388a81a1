"""``processor dlq inspect``: the dead-letter topic from the start to its end as of the call, summed up.
Commits nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from processor.codec import Decoder, SchemaResolver, build_decoder
from processor.config import Config
from processor.dlq.topic import DlqTopic, replay_group
from processor.redrive import NO_VENDOR, Filters, RelayRecord
from processor.vendors import REGISTRY


@dataclass
class Inspection:
    """What ``dlq inspect`` found (``dlqview`` renders it as text or JSON)."""

    topic: str
    filters: Filters
    scanned: int = 0
    matched: int = 0
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # vendor, error class, status
    reasons: Counter[str] = field(default_factory=Counter)
    replay_counts: Counter[int] = field(default_factory=Counter)
    oldest_ms: int | None = None
    newest_ms: int | None = None
    positions: dict[str, dict[int, int | None]] = field(default_factory=dict)  # vendor -> partition -> committed
    pending: Counter[str] = field(default_factory=Counter)
    replayed: Counter[str] = field(default_factory=Counter)
    unassigned_pending: Counter[str] = field(default_factory=Counter)  # vendor -> records of no vendor pending
    samples: list[RelayRecord] = field(default_factory=list)
    decoder: Decoder | None = None  # the samples' schema ids resolved in it (None without samples)

    def add(self, r: RelayRecord, show: int) -> None:
        self.matched += 1
        self.counts[(r.vendor, r.error_class, str(r.http_status or ""))] += 1
        self.reasons[r.reason] += 1
        self.replay_counts[r.replay_count] += 1
        t = r.failed_ms
        if t is not None:
            self.oldest_ms = t if self.oldest_ms is None else min(self.oldest_ms, t)
            self.newest_ms = t if self.newest_ms is None else max(self.newest_ms, t)
        for vendor, committed in self.positions.items():
            pending = committed.get(r.partition) is None or r.offset >= committed[r.partition]  # type: ignore[operator]
            if r.vendor == vendor:
                (self.pending if pending else self.replayed)[vendor] += 1
            elif r.vendor == NO_VENDOR and pending:
                self.unassigned_pending[vendor] += 1
        if len(self.samples) < show:
            self.samples.append(r)


def inspect(config: Config, filters: Filters, show: int = 0, timeout_s: float = 15.0) -> Inspection:
    """Read the dead-letter topic from the start to its end as of the call; commit nothing. The samples'
    schema ids are resolved as every decode path resolves them (waiting, and saying so, while the
    registry cannot be reached)."""
    reader = DlqTopic(config, f"{config.kafka.group_id}.inspect", timeout_s)
    try:
        found = Inspection(reader.topic, filters)
        vendors = sorted(set(config.enabled_vendors()) | (set(filters.vendors) & set(REGISTRY)))
        for vendor in vendors:
            found.positions[vendor] = _committed(config, vendor, timeout_s)
        reader.assign(reader.starts({}))
        while not reader.done:
            records = reader.consume(1000, 0.5)
            found.scanned += len(records)
            for r in records:
                if r.vendor not in found.positions and r.vendor != NO_VENDOR and r.vendor in REGISTRY:
                    found.positions[r.vendor] = _committed(config, r.vendor, timeout_s)
                if filters.matches(r):
                    found.add(r, show)
        if found.samples:
            found.decoder = build_decoder(config.schema_registry)
            asyncio.run(SchemaResolver(found.decoder, "dlq inspect").wait(r.source.value for r in found.samples))
        return found
    finally:
        reader.close()


def _committed(config: Config, vendor: str, timeout_s: float) -> dict[int, int | None]:
    group = DlqTopic(config, replay_group(config, vendor), timeout_s)
    try:
        return group.committed()
    finally:
        group.close()
