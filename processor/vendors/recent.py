"""A bounded memory of what a vendor was already sent: the most recent keys, least recently used first out.

An adapter whose vendor counts a thing once (Convert: a goal per visitor, an order, a bucketing) asks
``seen(key)`` while planning and leaves out what was sent before; it ``add``s a key only once the request
carrying it was delivered (``Adapter.delivered``), never when it is planned, so a request that is retried,
parked or dead-lettered carries its keys again when it is sent again. The memory is per process and lost on
a restart; it holds at most ``size`` keys (0: it remembers nothing). ``hits`` and ``evictions`` are running
counts the delivery pipeline turns into ``processor_vendor_memory_total`` (adapters never import
prometheus_client).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable


class RecentKeys:
    __slots__ = ("_told", "evictions", "hits", "keys", "size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("size must be at least 0")
        self.size = size
        # the remembered keys, least recent first: a membership test is a miss's whole cost (read only:
        # ``hit`` and ``add`` change it)
        self.keys: OrderedDict[Hashable, None] = OrderedDict()
        self.hits = 0
        self.evictions = 0
        self._told = (0, 0)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is remembered, without counting or refreshing it."""
        return key in self.keys

    def seen(self, key: Hashable) -> bool:
        """Whether ``key`` was sent and delivered recently: a hit is counted and makes it the most recent."""
        if key in self.keys:
            self.hit(key)
            return True
        return False

    def hit(self, key: Hashable) -> None:
        """A remembered ``key`` was asked for again: counted, and now the most recent."""
        self.keys.move_to_end(key)
        self.hits += 1

    def add(self, keys: Iterable[Hashable]) -> None:
        """Remember delivered ``keys`` as the most recent (one already remembered keeps its place: it was
        not when its request was planned, so another request delivered it meanwhile), forgetting the least
        recent beyond ``size``."""
        mine, size = self.keys, self.size
        if not size:
            return
        for key in keys:  # a plain loop: OrderedDict.update of pairs costs more
            mine[key] = None
        over = len(mine) - size
        if over > 0:
            for _ in range(over):
                mine.popitem(last=False)
            self.evictions += over

    def counts_since_last(self) -> tuple[int, int]:
        """Hits and evictions since the last call (whoever asked: two pipelines may share one adapter)."""
        hits, evictions = self.hits, self.evictions
        told_hits, told_evictions = self._told
        self._told = (hits, evictions)
        return hits - told_hits, evictions - told_evictions
