"""benchmarks/selective_sum_probe.py at a tiny size: the hand-written passes agree with the
library's XLA path (scores and weighted sums), so that its timings compare the same arithmetic."""

import shutil

import pytest


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no g++")
def test_probe_passes_agree_with_the_xla_path(run_benchmark):
  out = run_benchmark("selective_sum_probe.py", "--clients", "30", "--experts", "6", "--reps", "1")
  assert out["score_max_abs_diff"] < 1e-5 and out["sum_max_rel_diff"] < 1e-5
  assert 0.0 < out["excluded_fraction"] < 0.5
  assert len(out["rows"]) == 6 and all(r["median_s"] > 0 for r in out["rows"])
