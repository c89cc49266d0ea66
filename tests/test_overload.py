"""Overload, bounded: a real gateway at 10× its sustainable rate for a few seconds
(``benchmarks/overload.py`` runs it longer and records the figures). Excess requests are
refused fast with 429/503, nothing hangs or errors, admitted throughput stays ≥ 80 % of the
unloaded rate, and memory stays bounded."""

import sys
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
