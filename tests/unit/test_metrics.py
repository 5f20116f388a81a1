import random

from processor.metrics import LATENCY_BUCKETS, BulkHistogramChild


def test_observe_since_matches_one_observation_per_timestamp():
    rng = random.Random(3)
    bounds = [float(b) for b in LATENCY_BUCKETS] + [float("inf")]
    for _ in range(50):
        now_s = 1_700_000_000.0005 + rng.randint(0, 10**6)
        now_ms = int(now_s * 1000)
        # ages from the future (clock skew) to beyond the last bucket, some exactly on a bound, some missing
        stamps = [rng.choice([None, 0, now_ms + rng.randint(1, 5000), now_ms - rng.randint(0, 400_000),
                              now_ms - int(rng.choice(LATENCY_BUCKETS) * 1000)]) for _ in range(rng.randint(0, 300))]
        one, bulk = BulkHistogramChild(bounds), BulkHistogramChild(bounds)
        for ts in stamps:
            if ts:
                one.observe(max(0.0, now_s - ts / 1000))
        bulk.observe_since(now_s, iter(stamps))
        assert bulk.counts == one.counts
        assert abs(bulk.sum - one.sum) < 1e-6 * max(1.0, one.sum)
