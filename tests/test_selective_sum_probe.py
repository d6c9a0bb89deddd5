"""benchmarks/selective_sum_probe.py at a tiny size: the hand-written passes agree with the
library's XLA path (scores and weighted sums), so that its timings compare the same arithmetic."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no g++")
def test_probe_passes_agree_with_the_xla_path(tmp_path):
  env = dict(os.environ, FEDALIGN_BENCHMARK_RESULTS=str(tmp_path))
  proc = subprocess.run(
      [sys.executable, "benchmarks/selective_sum_probe.py", "--clients", "30", "--experts", "6"]
      + ["--reps", "1", "--tag", "test"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  out = json.loads((tmp_path / "selective_sum_probe_test.json").read_text())
  assert out["score_max_abs_diff"] < 1e-5 and out["sum_max_rel_diff"] < 1e-5
  assert 0.0 < out["excluded_fraction"] < 0.5
  assert len(out["rows"]) == 6 and all(r["median_s"] > 0 for r in out["rows"])
