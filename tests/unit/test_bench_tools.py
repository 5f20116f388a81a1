from bench.scenarios import RunResult


def run(timeline, marks):
    return RunResult(seconds=timeline[-1][0], events=1000, delivered=0, filtered=0, dead_lettered=0, requests=0,
                     error_requests=0, cpu_s=0, peak_rss_mb=0, latency_ms={}, per_vendor={}, log="",
                     timeline=timeline, cpu_marks=marks)


def test_steady_rate_and_cores_come_from_the_10_to_90_percent_stretch():
    # 0-1 s: joining (nothing settled); 1-6 s: 180 events/s; then a slow tail
    timeline = [(0.0, 0), (1.0, 0), (1.5, 100), (2.0, 190), (6.0, 910), (9.0, 1000)]
    marks = [{"relay": t * 0.5, "sandbox": t * 0.1} for t, _ in timeline[:2]] + [
        {"relay": 0.5 + (t - 1.0), "sandbox": 0.1 + 0.4 * (t - 1.0)} for t, _ in timeline[2:]]
    r = run(timeline, marks)
    assert r.steady_rate() == (910 - 100) / (6.0 - 1.5)
    assert r.steady_cores() == {"relay": 1.0, "sandbox": 0.4, "total": 1.4}


def test_a_stretch_under_two_seconds_has_no_steady_numbers():
    timeline = [(0.0, 0), (0.5, 200), (1.0, 950)]
    r = run(timeline, [{"relay": 0.0}] * 3)
    assert r.steady_rate() is None and r.steady_cores() is None
    assert run(timeline, []).steady_cores() is None


def test_the_instruction_count_plans_decoded_workload_events_as_the_benchmark_configures_them():
    from bench.instructions import EVENTS, adapter_and_batches

    adapter, batches = adapter_and_batches("convert:batched")
    assert sum(map(len, batches)) == EVENTS and max(map(len, batches)) == 500
    assert all(ep.v1 for ep in adapter.routes.values())  # the batched mode, as scenario a runs it
    plan = adapter.plan(batches[0])
    assert plan.requests and not plan.rejected
    assert sum(len(r.events) for r in plan.requests) + len(plan.filtered) == 500


def _counts(delivered=0.0, parked=0.0, redriven_delivered=0.0, backlog=0.0, breaker=0.0, **more):
    from bench.outage import OUTCOMES, REDRIVEN

    c = dict.fromkeys(OUTCOMES, 0.0) | {f"redriven_{o}": 0.0 for o in REDRIVEN}
    c.update(delivered=delivered, parked=parked, redriven_delivered=redriven_delivered, backlog=backlog,
             breaker=breaker, **more)
    return c


def test_each_event_counts_once_and_what_is_still_parked_is_not_lost():
    from bench.outage import final_counts, outstanding, settled_once

    # 1000 produced: 700 delivered live, 300 parked, 250 of them redriven and delivered, 20 parked again
    # (one of those redriven later), 1 expired on the retry topic
    c = _counts(delivered=950, parked=320, redriven_delivered=250, redriven_parked=20, redriven_expired=1)
    assert settled_once(c) == 700 + 300
    assert outstanding(c) == 320 - 250 - 20 - 1
    out = final_counts(c, 1000, accepted=950)
    assert out["still_parked"] == 49 and out["expired"] == 1 and out["unsettled"] == 0
    assert out["lost"] is None and out["not_final_at_end"] == 49  # not known while some are still parked
    assert out["vendor_accepted_minus_delivered"] == 0
    assert final_counts(c, 1003)["unsettled"] == 3 and "vendor_accepted_minus_delivered" not in final_counts(c, 1)
    done = _counts(delivered=999, parked=320, redriven_delivered=299, redriven_parked=20, redriven_expired=1)
    assert final_counts(done, 1000)["lost"] == 0 and final_counts(done, 1000, accepted=1001)[
        "vendor_accepted_minus_delivered"] == 2


def test_the_outage_summary_rates_come_from_the_phases_windows():
    from bench.outage import BROKEN, Mark, summarise

    vendors = ["qubit", BROKEN]
    marks = []
    for t in range(0, 61):  # before 0-20 s, outage 20-40 s, healed at 40 s, drained at 50 s
        q = 100.0 * t if t <= 20 else 2000 + 90.0 * (t - 20)
        c = 100.0 * min(t, 20) + (100.0 * (t - 40) if t > 40 else 0)
        parked = 100.0 * (min(t, 40) - 20) if t > 20 else 0
        redriven = min(parked, 200.0 * (t - 41)) if t > 41 else 0
        marks.append(Mark(float(t), "x", {
            "qubit": _counts(delivered=q),
            BROKEN: _counts(delivered=c + redriven, parked=parked, redriven_delivered=redriven,
                            backlog=max(0.0, parked - redriven), breaker=2.0 if 20 <= t < 42 else 0.0)}))
    s = summarise(marks, 20.0, 40.0, 51.0, 20.0, vendors)
    assert s["healthy"]["qubit"] == {"before_per_s": 100.0, "during_per_s": 90.0, "ratio": 0.9}
    assert s["healthy_ratio_min"] == 0.9
    assert s["broken"] == {"vendor": BROKEN, "normal_per_s": 100.0, "during_per_s": 0.0}
    assert s["parked_backlog_peak"] == 2000 and s["parked_outstanding_peak"] == 2000
    r = s["recovery"]
    assert r["breaker_closed_after_s"] == 2.0 and r["first_redrive_after_s"] == 2.0
    assert r["drain_seconds"] == 11.0 and r["redriven_delivered"] == 2000
    assert r["drain_rate_per_s"] == round(2000 / 11, 1) and r["drain_ratio"] == round(2000 / 11 / 100, 3)
    assert r["drain_rate_after_first_redrive_per_s"] == round(2000 / 9, 1)
    assert summarise(marks, 20.0, 40.0, None, 20.0, vendors)["recovery"]["drained"] is False
    for m in marks:  # nothing parked at all: no drain to measure
        m.counts[BROKEN].update(parked=0.0, redriven_delivered=0.0, backlog=0.0)
    r = summarise(marks, 20.0, 40.0, 40.0, 20.0, vendors)["recovery"]
    assert r["nothing_parked"] and "drain_ratio" not in r


def test_the_adapters_floor_plans_what_the_relay_would_plan_and_costs_more_than_decoding():
    from bench.ceilings import adapter_floor, planned_requests
    from bench.scenarios import Scenario
    from bench.stack import workload_messages

    values = list(workload_messages(1200))
    for key in ("a", "b"):
        sc = Scenario.build(key, "http://127.0.0.1:9")
        planned, _ = planned_requests(sc.vendors, sc.env, values, 1200)
        floor = adapter_floor(sc.vendors, sc.env, values, 1200, rounds=1)
        # a poll at a time through add_many: the same batches, so the same requests, as one event at a time
        assert floor["requests"] == sum(len(reqs) for _, reqs in planned.values()) > 0
        assert floor["events"] == 1200
        assert floor["floor_cpu_us_per_event"] > floor["decode_cpu_us_per_event"] > 0
        assert floor["decode_over_floor"] < 1
