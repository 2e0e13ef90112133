"""agent.app.metrics: the parts the control socket tests do not reach."""

from __future__ import annotations

import bisect

from agent.app.metrics import LATENCY_BUCKETS, bucket_index


def test_bucket_index_is_bisect_left_on_the_bounds():
    values = [0.0, 1e-9, 30.0, 30.0001, 1e9, float("inf")]
    values += [b + d for b in LATENCY_BUCKETS for d in (-1e-9, 0.0, 1e-9)]
    for seconds in values:
        assert bucket_index(seconds) == bisect.bisect_left(LATENCY_BUCKETS, seconds), seconds
