from processor.offsets import OffsetTracker


class Msg:
    """A consumed message as the tracker sees it."""

    def __init__(self, topic, partition, offset):
        self.topic, self.partition, self.offset, self.slot = topic, partition, offset, None


def register(t, topic, partition, offset, pending):
    """One message registered alone: its slot."""
    m = Msg(topic, partition, offset)
    t.register_many([m], [pending])
    return m.slot


def test_commit_stops_at_the_first_unsettled_offset():
    t = OffsetTracker()
    t.assign("t", 0)
    handles = [register(t, "t", 0, off, 2) for off in range(10, 15)]
    assert t.inflight == 5
    assert t.commit_positions() == {("t", 0): 10}
    for h in handles[1:]:
        t.settle(h, 2)  # everything after the first is fully settled
    assert t.commit_positions() == {("t", 0): 10}
    t.settle(handles[0])
    assert t.commit_positions() == {("t", 0): 10}  # one vendor still owes offset 10
    t.settle(handles[0])
    assert t.commit_positions() == {("t", 0): 15}
    assert t.inflight == 0


def test_settling_twice_is_harmless_and_unchanged_positions_are_not_repeated():
    t = OffsetTracker()
    t.assign("t", 1)
    h = register(t, "t", 1, 0, 1)
    t.settle(h)
    t.settle(h)
    assert t.inflight == 0
    pos = t.commit_positions()
    assert pos == {("t", 1): 1}
    t.mark_committed(pos)
    assert t.commit_positions() == {}
    assert t.commit_positions(only_changed=False) == {("t", 1): 1}


def test_messages_with_nothing_to_settle_commit_at_once():
    t = OffsetTracker()
    t.assign("t", 0)
    register(t, "t", 0, 0, 1)
    register(t, "t", 0, 1, 0)
    assert t.commit_positions() == {("t", 0): 0}
    assert t.inflight == 1


def test_revoked_partitions_ignore_late_settlements():
    t = OffsetTracker()
    t.assign("t", 0)
    h = register(t, "t", 0, 5, 1)
    t.revoke("t", 0)
    assert t.inflight == 0
    t.settle(h)
    assert t.inflight == 0
    assert t.commit_positions() == {}
    t.assign("t", 0)
    assert t.commit_positions() == {}


def test_settle_items_is_settle_once_per_item_and_never_commits_past_a_pending_vendor():
    t = OffsetTracker()
    t.assign("t", 0)
    t.assign("t", 1)
    a = [Msg("t", 0, off) for off in range(5)]
    b = [Msg("t", 1, off) for off in range(3)]
    t.register_many(a, [2] * 5)  # two vendors each
    t.register_many(b, [1] * 3)
    t.settle_items(a[1:] + b[:2])  # vendor 1 of offsets 1-4 on t[0]; t[1] 0-1 fully
    assert t.inflight == 5 + 1
    assert t.commit_positions() == {("t", 0): 0, ("t", 1): 2}
    t.settle_items([*a, b[2], b[2]])  # vendor 2 everywhere on t[0]; t[1]@2 twice (harmless)
    assert t.commit_positions() == {("t", 0): 0, ("t", 1): 3}  # offset 0 still owes vendor 1
    assert t.inflight == 1
    t.settle_items([a[0]])
    assert t.commit_positions() == {("t", 0): 5, ("t", 1): 3}
    assert t.inflight == 0
    t.revoke("t", 0)
    t.settle_items([a[0]])  # late settlements after a revoke change nothing
    assert t.inflight == 0


def test_register_many_tracks_each_partition_in_consume_order():
    from processor.devstack.samples import as_event, make_view
    from processor.events import EventKind

    t = OffsetTracker()
    t.assign("shop.events", 0)
    t.assign("shop.events", 1)
    events = [as_event(EventKind.PRODUCT_VIEW, make_view(i, i), off, partition=p)
              for i, (p, off) in enumerate([(0, 10), (0, 11), (1, 3), (0, 12), (1, 4), (1, 5)])]
    t.register_many(events, [2, 2, 2, 2, 2, 0])  # the last: a kind no vendor takes, committable at once
    assert t.inflight == 5
    assert t.commit_positions() == {("shop.events", 0): 10, ("shop.events", 1): 3}
    t.settle_items(events)
    t.settle_items(events[:3])
    assert t.inflight == 2
    assert t.commit_positions() == {("shop.events", 0): 12, ("shop.events", 1): 4}
    t.settle_items(events)
    assert t.commit_positions() == {("shop.events", 0): 13, ("shop.events", 1): 6}
    assert t.inflight == 0
