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


def test_any_revoked_is_is_revoked_of_any_item_whatever_the_runs_of_partitions():
    from hypothesis import given
    from hypothesis import strategies as st

    from processor.offsets import any_revoked, is_revoked

    @given(st.lists(st.integers(0, 3), min_size=0, max_size=30), st.sets(st.integers(0, 3)))
    def check(partitions, revoked):
        t = OffsetTracker()
        for p in range(4):
            t.assign("t", p)
        items = [Msg("t", p, off) for off, p in enumerate(partitions)]
        for item in items:  # one by one: runs of any length, a partition coming back after another
            t.register_many([item], [1])
        for p in revoked:
            t.revoke("t", p)
        assert any_revoked(items) == any(map(is_revoked, items))

    check()


def test_outcome_counts_per_kind_are_the_plain_count_of_each_events_kind():
    from hypothesis import given
    from hypothesis import strategies as st

    from processor.events import EventKind
    from processor.metrics import Metrics
    from processor.offsets import Outcomes

    class Item(Msg):
        def __init__(self, kind):
            super().__init__("t", 0, 0)
            self.kind = kind

    kinds = st.sampled_from([EventKind.PRODUCT_VIEW, EventKind.ORDER, None])

    @given(st.lists(st.lists(kinds, min_size=1, max_size=12), max_size=4))
    def check(requests):
        t = OffsetTracker()
        t.assign("t", 0)
        o = Outcomes(Metrics())
        want: dict[str, int] = {}
        for request in requests:
            items = [Item(k) for k in request]
            t.register_many(items, [1] * len(items))
            o.count("qubit", items, "delivered")
            for item in items:  # the plain reference: one count an event of a kind (no kind: not counted)
                if item.kind is not None:
                    want[item.kind.value] = want.get(item.kind.value, 0) + 1
        got = {k.value: o.metrics.registry.get_sample_value(
            "processor_vendor_events_total", {"vendor": "qubit", "event_kind": k.value, "outcome": "delivered"})
            for k in EventKind}
        assert {k: v for k, v in got.items() if v} == want

    check()
