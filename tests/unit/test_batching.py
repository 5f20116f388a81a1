from processor.batching import Batcher
from processor.devstack.samples import as_event, make_view
from processor.events import EventKind
from processor.vendors.base import BatchSettings


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def ev(i=0):
    return as_event(EventKind.PRODUCT_VIEW, make_view(i, i), i)


def test_closes_on_max_events():
    b = Batcher(BatchSettings(max_events=3, max_bytes=10**9, max_wait_ms=1000), Clock())
    assert b.add(ev(1)) is None
    assert b.add(ev(2)) is None
    batch = b.add(ev(3))
    assert [e.source.offset for e in batch] == [1, 2, 3]
    assert len(b) == 0


def test_closes_on_max_bytes_without_exceeding_it():
    e = ev()
    b = Batcher(BatchSettings(max_events=100, max_bytes=e.size * 2 + 1, max_wait_ms=1000), Clock())
    assert b.add(ev(1)) is None
    assert b.add(ev(2)) is None
    batch = b.add(ev(3))  # would pass the limit: the open batch closes, the new event starts the next
    assert [x.source.offset for x in batch] == [1, 2]
    assert len(b) == 1


def test_closes_on_max_wait():
    clock = Clock()
    b = Batcher(BatchSettings(max_events=100, max_bytes=10**9, max_wait_ms=500), clock)
    b.add(ev(1))
    clock.now = 0.4
    assert b.due() is None
    b.add(ev(2))
    clock.now = 0.5
    assert [x.source.offset for x in b.due()] == [1, 2]
    assert b.due() is None and b.deadline() is None


def test_flush_returns_the_open_batch_once():
    b = Batcher(BatchSettings(), Clock())
    assert b.flush() is None
    b.add(ev(1))
    assert len(b.flush()) == 1
    assert b.flush() is None
