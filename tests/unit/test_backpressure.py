"""The relay-wide in-flight bound (``processor.admission.InflightBound``): fetching waits from the limit
until the count is down to ``resume_ratio`` of it, not on and off at every settled message."""

from __future__ import annotations

from processor.admission import InflightBound


def test_over_from_the_limit_until_down_to_the_resume_ratio():
    bound = InflightBound(100, 0.5)
    assert [bound.check(n) for n in (0, 99)] == [False, False]
    assert bound.check(100)
    assert [bound.check(n) for n in (99, 80, 51)] == [True, True, True]  # still above half
    assert not bound.check(50)
    assert not bound.check(99)  # below the limit again: fetching
    assert bound.check(150)
