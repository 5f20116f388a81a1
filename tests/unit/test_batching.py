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


def test_add_many_closes_exactly_the_batches_add_would():
    import random

    rng = random.Random(7)
    pool = [ev(i) for i in range(400)]
    for trial in range(60):
        size = pool[0].size
        settings = BatchSettings(max_events=rng.choice([1, 3, 50, 500]),
                                 max_bytes=rng.choice([size, size * 2 + 1, size * 40, 10**9]), max_wait_ms=1000)
        one, many = Batcher(settings, Clock()), Batcher(settings, Clock())
        for event in pool[:5]:  # an open batch to start from
            one.add(event)
            many.add(event)
        want = [b for b in map(one.add, pool[5:]) if b is not None]
        runs, i = [], 5
        while i < len(pool):
            n = rng.randint(1, 120)
            runs.append(pool[i:i + n])
            i += n
        got = [b for run in runs for b in many.add_many(run)]
        assert [[e.source.offset for e in b] for b in got] == [[e.source.offset for e in b] for b in want], trial
        assert [e.source.offset for e in many.flush() or []] == [e.source.offset for e in one.flush() or []]
