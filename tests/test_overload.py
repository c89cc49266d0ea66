"""Overload, bounded: a real gateway at 10× its sustainable rate for a few seconds
(``benchmarks/overload.py`` runs it longer and records the figures). Excess requests are
refused fast with 429/503, nothing hangs or errors, admitted throughput stays ≥ 80 % of the
unloaded rate, and memory stays bounded."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.mark.slow
def test_ten_times_the_sustainable_rate():
    testing = pytest.importorskip("ctxcache_client.testing")
    from benchmarks.overload import _server_pid, measure

    with testing.live_gateway() as url:
        res = measure(url, _server_pid(url), unloaded_s=4.0, overload_s=6.0)
    print(res)
    assert res["hung"] == 0 and res["other_status"] == []
    assert res["refused"] > 0 and res["refusal_p99_ms"] < 250
    assert res["admitted_over_sustainable"] >= 0.8
    assert res["rss_mb_peak"] - res["rss_mb_before"] < 1024


def test_refuses_when_the_estimated_wait_exceeds_its_bound():
    """The queue's count bound alone let a slow machine queue a minute of work; the wait bound
    refuses the newcomer whose estimated wait (from measured slot hold times) is too long."""
    from ctxcache.service.gateway import Gate, QueueFull
    from ctxcache.service.metrics import Metrics

    gate = Gate(2, 100, Metrics(), max_queue_wait_s=1.0)
    for _ in range(2):  # two measured holds of ~0.4 s each: the service-time estimate
        gate.enter()
        assert gate.acquire(lambda: False)
        time.sleep(0.4)
        gate.release()
    assert 0.35 < gate.service_s < 0.6
    for _ in range(2):  # both slots taken
        gate.enter()
        assert gate.acquire(lambda: False)
    admitted = 0
    with pytest.raises(QueueFull) as refused:
        while admitted < 100:
            gate.enter()
            admitted += 1
    # (waiting + 1) × 0.4 s / 2 slots passes 1 s at the 5th waiting request
    assert 3 <= admitted <= 6, admitted
    assert refused.value.retry_after >= 1
    assert gate.expected_wait_s() > 1.0
