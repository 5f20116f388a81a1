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
