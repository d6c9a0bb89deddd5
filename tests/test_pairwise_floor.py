"""benchmarks/pairwise_floor.py at a tiny size: its Gram formulations (upper client blocks,
(A X) . X, the library's cosines) compute the same numbers, so its timings compare the same
arithmetic; every case is timed and the floor is reported against FedAvg."""


def test_floor_script_formulations_agree(run_benchmark):
  out = run_benchmark(
      "pairwise_floor.py", "--clients", "12", "--experts", "3", "--reps", "1", "--dot", "128"
  )
  assert set(out["max_rel_diff_to_gram"]) == {
      "gram: library (cosines)",
      "gram: upper blocks, 2",
      "gram: upper blocks, 4",
      "gram: (A X) . X",
  }
  assert max(out["max_rel_diff_to_gram"].values()) < 1e-5, out["max_rel_diff_to_gram"]
  assert len(out["rows"]) == 8 and all(r["median_s"] > 0 for r in out["rows"])
  assert out["gram_gflop"] == 2 * 12**2 * 3 * 64 * 64 * 3 / 1e9
  assert out["floor_vs_fedavg"] > out["floor_half_gram_vs_fedavg"] > 0
