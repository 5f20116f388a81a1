"""The relay's health rules (``processor.health.HealthRules``): readiness from the first failing check, a
message unsettled past ``relay.stall_after_s`` is liveness when nothing owns it and readiness when
something still works on it, and each stall is logged once when it starts and once when it ends."""

from __future__ import annotations

import logging

from processor.health import HealthRules


class Facts:
    def __init__(self) -> None:
        self.oldest = 0.0
        self.owners: list[str] = []
        self.checks: dict[str, str | None] = {"assigned": None, "registry": None}

    def rules(self) -> HealthRules:
        return HealthRules(60.0, [lambda: self.checks["assigned"], lambda: self.checks["registry"]],
                           lambda: self.oldest, lambda: self.owners)


def test_readiness_names_the_first_failing_check_then_a_stall():
    f = Facts()
    rules = f.rules()
    assert rules.not_ready() is None
    f.checks["registry"] = "waiting for the schema registry (id 7)"
    f.checks["assigned"] = "not assigned any partition yet"
    assert rules.not_ready() == "not assigned any partition yet"
    f.checks["assigned"] = None
    assert rules.not_ready() == "waiting for the schema registry (id 7)"
    f.checks["registry"] = None
    f.oldest = 61.0
    assert rules.not_ready() is not None and "nothing works on it" in rules.not_ready()


def test_past_stall_after_s_it_is_liveness_only_when_nothing_owns_the_message():
    f = Facts()
    rules = f.rules()
    f.oldest = 59.0
    f.owners = []
    assert rules.stalled() is None and rules.waiting_past_stall() is None  # not yet past
    f.oldest = 61.0
    assert rules.stalled() is not None and rules.waiting_past_stall() is None
    f.owners = ["qubit holds 3 events"]
    assert rules.stalled() is None
    why = rules.waiting_past_stall()
    assert why is not None and "qubit holds 3 events" in why and why == rules.not_ready()


def test_a_stall_is_logged_when_it_starts_and_when_it_ends_once_each(caplog):
    caplog.set_level(logging.INFO, logger="processor.health")
    f = Facts()
    rules = f.rules()
    f.oldest = 61.0
    for _ in range(3):
        rules.watch()
    f.oldest = 0.0
    for _ in range(3):
        rules.watch()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [lvl for lvl, _m in lines] == [logging.ERROR, logging.INFO], lines
    assert "unsettled for 61s" in lines[0][1] and "any more" in lines[1][1]
