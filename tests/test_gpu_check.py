"""benchmarks/gpu_check.sh, the prepared accelerator run of issue #12, end to end at tiny sizes.

The full check needs a GPU; its smoke mode runs the same three benchmark scripts with the same
options on any machine, so a session that is lent a GPU spends its device time measuring, not
debugging the script.
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_the_three_benchmarks_and_collects_their_results(tmp_path):
  out, results = tmp_path / "out", tmp_path / "results"
  env = dict(
      os.environ,
      OUT=str(out),
      PYTHON=sys.executable,
      PEAK_TFLOPS="2",
      FEDALIGN_BENCHMARK_RESULTS=str(results),
  )
  env.pop("XLA_FLAGS", None)  # one device, as on the machine it is meant for
  proc = subprocess.run(
      ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  names = sorted(p.name for p in out.iterdir())
  assert names == sorted(
      [
          "device.txt",
          "round_time.log",
          "mfu.log",
          "aggregation.log",
          "round_time_gpu_check_smoke.json",
          "mfu_gpu_check_smoke.json",
          "aggregation_time_gpu_check_smoke.json",
          "breakdown.log",
          "aggregation_breakdown_gpu_check_smoke.json",
      ]
  )
  assert not list((REPO / "benchmarks" / "results").glob("*gpu_check_smoke*"))

  mfu = json.loads((out / "mfu_gpu_check_smoke.json").read_text())
  assert mfu["peak_flops"] == 2e12
  assert "model dtype bfloat16" in mfu["markdown"] and "client / peak" in mfu["markdown"]
  assert mfu["step_flops"]["every_position"] > mfu["step_flops"]["scored_positions"] > 0

  rounds = json.loads((out / "round_time_gpu_check_smoke.json").read_text())["rounds"]
  assert [r["clients"] for r in rounds] == [2]
  assert rounds[0]["vmapped_s"] > 0 and rounds[0]["loop_s"] > 0

  agg = json.loads((out / "aggregation_time_gpu_check_smoke.json").read_text())
  rows = {r["variant"]: r for r in agg["rows"]}
  assert {"fedavg", "fedalign O(N)", "fedalign pairwise"} <= set(rows)
  assert all(r["status"] == "ok" for r in rows.values())
  assert rows["fedavg"]["vs_fedavg"] == 1.0
  assert "Precision.HIGHEST on cpu" in agg["markdown"]

  blocks = json.loads((out / "aggregation_breakdown_gpu_check_smoke.json").read_text())
  assert (blocks["clients"], blocks["experts"]) == (8, 4)
  ops = {r["op"]: r for r in blocks["rows"]}
  assert any(op.startswith("expert_sum") for op in ops) and any("einsum" in op for op in ops)
  assert all(r["median_s"] > 0 for r in ops.values())
