"""experiments/: the reproduction grid (tables from the runs' files, resume, failures), the CLI
and the demo notebook."""

import json
import math
import pathlib
import statistics
import subprocess
import sys

import numpy as np
import pytest

from experiments import plots, reproduce
from fedalign.reports import docs_key

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "notebooks" / "fedalign_demo.ipynb"


def tiny_base():
  base = reproduce.load_config("configs/default.py:runlocal")
  reproduce.apply_overrides(base, reproduce.TINY_OVERRIDES)
  return base


def table_row(markdown: str, label: str) -> str:
  rows = [l for l in markdown.splitlines() if l.startswith(f"| {label} |")]
  assert rows, (label, markdown)
  return rows[0]


def expected_ms(values):
  if len(values) < 2:  # a single seed has no spread to report
    return f"{statistics.mean(values):.3f} (1 seed)"
  return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summaries(workdir, names):
  return [json.loads((workdir / n / "summary.json").read_text()) for n in names]


# ----------------------------------------------------------------------------- real tiny grid
@pytest.mark.slow  # 50 s; the report logic and failure records: the two tests below
def test_tiny_grid_tables_from_files_resume_and_failure(tmp_path, monkeypatch):
  """2 methods x 1 alpha x 2 seeds, 2 rounds; fedalign seed 1 is forced to fail."""
  real = reproduce.run_experiment
  calls = []

  def flaky(config, workdir):
    calls.append(pathlib.Path(workdir).name)
    if config.method == "fedalign" and config.seed == 1:
      raise RuntimeError("injected failure for this entry")
    return real(config, workdir)

  monkeypatch.setattr(reproduce, "run_experiment", flaky)
  base = tiny_base()
  plan = reproduce.make_plan(["fedavg", "fedalign"], [0.1], [0, 1])
  out = reproduce.run_grid(
      base, plan, tmp_path, target_accuracy=0.6, run_info={"command": "pytest tiny grid"}
  )
  status = {s["name"]: s["status"] for s in out["statuses"]}
  assert status == {
      "fedavg_a0.1_s0": "done",
      "fedavg_a0.1_s1": "done",
      "fedalign_a0.1_s0": "done",
      "fedalign_a0.1_s1": "failed",
  }
  failed_txt = (tmp_path / "fedalign_a0.1_s1" / "FAILED.txt").read_text()
  assert failed_txt.startswith("RuntimeError: injected failure for this entry")

  md = (tmp_path / "results.md").read_text()
  assert "pytest tiny grid" in md and "JAX" in md and "jax.devices()" in md
  # (a) numbers = mean/std over the seeds' summary.json, computed here.
  fedavg = ["fedavg_a0.1_s0", "fedavg_a0.1_s1"]
  s = summaries(tmp_path, fedavg)
  row = table_row(md, "FedAvg")
  assert expected_ms([x["last5_mean_test_accuracy"] for x in s]) in row
  assert expected_ms([x["final_test_accuracy"] for x in s]) in row
  agg = out["results"]["grid"]["fedavg"]["0.1"]
  assert agg["final"]["mean"] == pytest.approx(statistics.mean(x["final_test_accuracy"] for x in s))
  row = table_row(md, "FedAlign-MoE")
  (fa,) = summaries(tmp_path, ["fedalign_a0.1_s0"])
  assert expected_ms([fa["last5_mean_test_accuracy"]]) in row
  assert "failed: s1: RuntimeError: injected failure" in row
  ref = statistics.mean(x["last5_mean_test_accuracy"] for x in s)
  gain = (fa["last5_mean_test_accuracy"] - ref) / ref * 100
  assert f"{gain:+.1f}%" in row
  # (c) convergence from metrics.jsonl: a target the seed-0 run reaches.
  recs = [plots.read_metrics(tmp_path / n) for n in fedavg]
  target = max(r["test_accuracy"] for r in recs[0])
  firsts = [next((r["round"] for r in rs if r["test_accuracy"] >= target), None) for rs in recs]
  md2 = reproduce.write_report(tmp_path, target_accuracy=target)["markdown"]
  conv = [l for l in md2.split("## Convergence")[1].splitlines() if l.startswith("| FedAvg |")][0]
  reached = [f for f in firsts if f is not None]
  assert conv.split(" | ")[1].startswith(f"{statistics.mean(reached):.1f}")
  if len(reached) < 2:
    assert "1/2 seeds" in conv
  # Plots from the metrics files (routing curves when the server logged them).
  assert (tmp_path / "plots" / "accuracy_alpha_0.1.png").exists()
  if "routing_divergence" in recs[0][-1]:
    assert (tmp_path / "plots" / "routing_divergence_alpha_0.1.png").exists()
  if not (tmp_path / "fedavg_a0.1_s0" / "routing_distributions.npz").exists():
    assert any("routing heatmap" in n for n in out["plot_notes"])  # skipped, with a note

  # Editing a summary changes the table: nothing is cached or typed in.
  path = tmp_path / "fedavg_a0.1_s1" / "summary.json"
  edited = json.loads(path.read_text())
  edited["final_test_accuracy"] = edited["last5_mean_test_accuracy"] = 0.9
  path.write_text(json.dumps(edited))
  md3 = reproduce.write_report(tmp_path, target_accuracy=0.6)["markdown"]
  new = [s[0]["final_test_accuracy"], 0.9]
  assert expected_ms(new) in table_row(md3, "FedAvg")
  assert expected_ms(new) not in table_row(md, "FedAvg")

  # Rerun: finished entries are skipped (no call, files untouched); the failed one is retried.
  mtimes = {
      n: (tmp_path / n / "summary.json").stat().st_mtime_ns for n in fedavg + ["fedalign_a0.1_s0"]
  }
  calls.clear()
  out2 = reproduce.run_grid(base, plan, tmp_path, target_accuracy=0.6)
  assert calls == ["fedalign_a0.1_s1"]
  assert [s["status"] for s in out2["statuses"]] == ["skipped", "skipped", "skipped", "failed"]
  assert all((tmp_path / n / "summary.json").stat().st_mtime_ns == t for n, t in mtimes.items())
  assert expected_ms(new) in table_row(out2["markdown"], "FedAvg")


# ----------------------------------------------------------------------------- fake runs
def fake_runner(accuracy_of, calls):
  """A run_experiment stand-in writing metrics.jsonl / summary.json like the server."""

  def run(config, workdir):
    workdir = pathlib.Path(workdir)
    calls.append(workdir.name)
    accs = accuracy_of(config)
    with (workdir / "metrics.jsonl").open("w") as f:
      for r, a in enumerate(accs, 1):
        f.write(
            json.dumps(
                {
                    "round": r,
                    "method": config.method,
                    "test_accuracy": a,
                    "train_loss": 1.0,
                    "round_time_s": 0.5,
                    "routing_divergence": 0.1 / r,
                    "expert_role_preservation": 0.5,
                    **(
                        {"agg/layers_0/mlp/perm_moved_frac": 0.05 * r}
                        if config.method == "fedalign" and config.fedalign.permutation_alignment
                        else {}
                    ),
                }
            )
            + "\n"
        )
    summary = {
        "method": config.method,
        "final_test_accuracy": accs[-1],
        "best_test_accuracy": max(accs),
        "last5_mean_test_accuracy": float(np.mean(accs[-5:])),
        "rounds": len(accs),
        "wall_time_s": 1.0,
        "config": json.loads(config.to_json()),
    }
    (workdir / "summary.json").write_text(json.dumps(summary))
    return summary

  return run


def test_report_logic_with_fake_runs(tmp_path, monkeypatch):
  """Ablation rows (deduplicated against the grid), NaN accuracy and a bad method override
  are failures, config changes re-run, gains and rounds-to-target, the routing heatmap."""
  calls = []

  def accuracy_of(c):
    if c.method == "fedprox" and c.seed == 1:
      return [0.3, float("nan")]
    bonus = 0.1 if c.method == "fedalign" else 0.0
    return [0.3 + bonus, 0.5 + bonus + 0.01 * c.seed, 0.6 + bonus + 0.02 * c.seed]

  monkeypatch.setattr(reproduce, "run_experiment", fake_runner(accuracy_of, calls))
  monkeypatch.setitem(
      reproduce.METHOD_VARIANTS, "broken", {"method": "fedalign", "fedalign.no_such_field": 1}
  )
  base = reproduce.load_config("configs/default.py")
  base.train.local_steps = 2  # at 1 local step FedProx is FedAvg (shared runs, tested below)
  plan = reproduce.make_plan(
      ["fedavg", "fedprox", "fedalign", "broken"], [0.1], [0, 1], ablation=True
  )
  out = reproduce.run_grid(base, plan, tmp_path, target_accuracy=0.61)
  st = {s["name"]: s for s in out["statuses"]}
  assert st["fedprox_a0.1_s1"]["status"] == "failed"
  assert "final test accuracy is nan" in st["fedprox_a0.1_s1"]["error"]
  assert "unknown config field 'fedalign.no_such_field'" in st["broken_a0.1_s0"]["error"]
  # direct_averaging = fedavg and semantic = fedalign: shared directories, run once.
  assert not (tmp_path / "ablation_direct_averaging_a0.1_s0").exists()
  assert not (tmp_path / "ablation_semantic_a0.1_s0").exists()
  # 3 methods x 2 seeds (broken never reaches the runner) + 4 of the 6 ablation rows x 2 seeds
  assert len(calls) == len(set(calls)) == 6 + 8
  md = out["markdown"]
  fedavg_last5 = [np.mean([0.3, 0.5, 0.6]), np.mean([0.3, 0.51, 0.62])]
  assert f"| FedAvg | {expected_ms(fedavg_last5)} | {expected_ms([0.6, 0.62])} | - |" == table_row(
      md, "FedAvg"
  )
  fedalign_last5 = [np.mean([0.4, 0.6, 0.7]), np.mean([0.4, 0.61, 0.72])]
  gain = (np.mean(fedalign_last5) - np.mean(fedavg_last5)) / np.mean(fedavg_last5) * 100
  assert f"{gain:+.1f}%" in table_row(md, "FedAlign-MoE")
  assert "failed: s0: KeyError" in table_row(md, "broken")
  assert "## Test NLL" not in md  # classification: no NLL in the summaries
  assert "(n=1; failed: s1: FloatingPointError" in table_row(md, "FedProx")
  # Paired differences against FedAvg over the seeds both finished (same seed = same partition).
  paired = md.split("## Paired difference against FedAvg")[1].split("## ")[0]
  d = reproduce.paired_difference(fedalign_last5, fedavg_last5)
  assert d["n"] == 2 and d["mean"] == pytest.approx(0.1)
  assert table_row(paired, "FedAlign-MoE").startswith(
      "| FedAlign-MoE | +0.100 [+0.100, +0.100] (n=2)"
  )
  assert table_row(paired, "FedProx").startswith("| FedProx | +0.000 [-] (n=1)")  # s1 failed
  assert "| FedAvg |" not in paired
  abl = md.split("## Ablation")[1]
  for row in reproduce.ABLATION_DESCRIPTIONS:
    assert f"| {row} |" in abl
  assert "| semantic | " in abl and "+0.100 |" in table_row(abl, "semantic")
  # paired against the previous row, per seed: uniform_gating (a FedAlign-MoE run, +0.1 in the
  # fake) vs direct averaging (FedAvg), semantic vs adaptive_alpha (both FedAlign-MoE runs)
  assert table_row(abl, "uniform_gating").endswith("| +0.100 [+0.100, +0.100] (n=2) |")
  assert table_row(abl, "semantic").endswith("| +0.000 [+0.000, +0.000] (n=2) |")
  assert table_row(abl, "direct_averaging").endswith("| - |")
  conv = md.split("## Convergence")[1]
  assert "| FedAvg | 3.0 (1/2 seeds; others not reached) |" in conv
  assert table_row(conv, "FedAlign-MoE").startswith("| FedAlign-MoE | 2.5 |")  # rounds 3, 2
  diag = md.split("## Diagnostics at the last evaluated round")[1].split("## ")[0]
  assert "| FedAvg | 0.1 | 0.5000 | - | 0.0333 | - |" in diag  # last of 3 rounds: 0.1 / 3
  assert (tmp_path / "plots" / "routing_divergence_alpha_0.1.png").exists()
  assert (tmp_path / "plots" / "accuracy_ablation_alpha_0.1.png").exists()

  # Heatmap once the runs save per-client routing distributions.
  for name in ("fedavg_a0.1_s0", "fedalign_a0.1_s0"):
    np.savez(
        tmp_path / name / "routing_distributions.npz", **{"layers_0/mlp": np.full((4, 8), 1 / 8)}
    )
  rep = reproduce.write_report(tmp_path, docs_out=tmp_path / "docs" / "results.md")
  assert (tmp_path / "plots" / "routing_heatmap_alpha_0.1.png").exists()
  docs = (tmp_path / "docs" / "results.md").read_text()
  assert "results_plots/routing_heatmap_alpha_0.1.png" in docs
  assert (tmp_path / "docs" / "results_plots" / "accuracy_alpha_0.1.png").exists()
  assert rep["markdown"] in docs
  # configs/default.py starts from the shipped checkpoint: the header names it and its record
  assert "- start: the checkpoint `fedalign/pretrained/moe-small` pre-trained once" in docs
  # A hand-written reading around the generated block survives regeneration, and the block is
  # replaced, not repeated.
  (tmp_path / "docs" / "results.md").write_text(
      "# Intro\n\n" + docs + "\n## Reading\nFedAlign wins by 0.1.\n"
  )
  reproduce.write_report(tmp_path, docs_out=tmp_path / "docs" / "results.md")
  again = (tmp_path / "docs" / "results.md").read_text()
  assert again.startswith("# Intro\n") and again.endswith("## Reading\nFedAlign wins by 0.1.\n")
  assert again.count(rep["markdown"].strip()) == 1
  assert again.count(docs_key("experiments/reproduce.py", tmp_path)) == 2  # begin and end
  # --tables_only keeps the plan as the runs wrote it: a config field added after the runs
  # (here: one deleted from the record) does not appear in their record
  grid = json.loads((tmp_path / "grid.json").read_text())
  del grid["base_config"]["train"]["rounds"]
  (tmp_path / "grid.json").write_text(json.dumps(grid))
  calls.clear()
  reproduce.run_grid(base, plan, tmp_path, tables_only=True)
  kept = json.loads((tmp_path / "grid.json").read_text())
  assert calls == [] and "rounds" not in kept["base_config"]["train"]
  assert kept["entries"] == grid["entries"]

  # Rerun: only unfinished/failed entries are called; a changed config re-runs everything.
  calls.clear()
  reproduce.run_grid(base, plan, tmp_path)
  assert calls == ["fedprox_a0.1_s1"]
  calls.clear()
  base.train.rounds = 11
  reproduce.run_grid(base, plan, tmp_path)
  assert "fedavg_a0.1_s0" in calls and len(calls) == 14


def test_lm_runs_get_an_nll_table_with_paired_differences(tmp_path, monkeypatch):
  """data.task = 'lm' (configs/domain.py): the summaries' final_test_nll make a table of mean
  +/- std and the paired difference against FedAvg, computed here from the same numbers."""
  nll = {("fedavg", 0): 3.9, ("fedavg", 1): 3.8, ("fedalign", 0): 3.85, ("fedalign", 1): 3.78}
  inner = fake_runner(lambda c: [0.2, 0.25], [])

  def run(config, workdir):
    summary = inner(config, workdir)
    summary["final_test_nll"] = nll[config.method, config.seed]
    (pathlib.Path(workdir) / "summary.json").write_text(json.dumps(summary))
    return summary

  monkeypatch.setattr(reproduce, "run_experiment", run)
  base = reproduce.load_config("configs/domain.py")
  plan = reproduce.make_plan(["fedavg", "fedalign"], [0.1], [0, 1])
  md = reproduce.run_grid(base, plan, tmp_path, target_accuracy=0.22)["markdown"]
  assert "partition: pathological, 1 label(s) per client (the α columns" in md
  assert "task: next-token language modelling" in md
  table = md.split("## Test NLL (language modelling)")[1].split("## ")[0]
  fa = [nll["fedalign", 0], nll["fedalign", 1]]
  ref = [nll["fedavg", 0], nll["fedavg", 1]]
  d = reproduce.paired_difference(fa, ref)
  assert d["mean"] == pytest.approx(-0.035)
  assert table_row(table, "FedAvg") == f"| FedAvg | {expected_ms(ref)} | - |"
  assert table_row(table, "FedAlign-MoE") == (
      f"| FedAlign-MoE | {expected_ms(fa)} | {reproduce._fmt_paired(d)} |"
  )


def test_fedprox_at_one_local_step_shares_the_fedavg_runs(tmp_path, monkeypatch):
  """At train.local_steps = 1 (the default) FedProx's entries point at FedAvg's directories and
  the page says so; the paper preset is a separate method; ablation rows equal to a method
  (direct_averaging = FedAvg, semantic = FedAlign-MoE, permutation = + perm.) run once."""
  calls = []
  monkeypatch.setattr(
      reproduce, "run_experiment", fake_runner(lambda c: [0.3, 0.5 + 0.01 * c.seed], calls)
  )
  base = reproduce.load_config("configs/default.py")
  assert base.train.local_steps == 1
  methods = ["fedavg", "fedprox", "fedalign", "fedalign_paper", "fedalign_perm"]
  plan = reproduce.make_plan(methods, [0.1], [0, 1], ablation=True)
  out = reproduce.run_grid(base, plan, tmp_path)
  # 4 distinct methods + the 3 ablation rows that are no method (uniform_gating, consistency,
  # adaptive_alpha), 2 seeds each
  assert sorted(calls) == sorted(
      [f"{m}_a0.1_s{s}" for m in methods if m != "fedprox" for s in (0, 1)]
      + [
          f"ablation_{r}_a0.1_s{s}"
          for r in ("uniform_gating", "consistency", "adaptive_alpha")
          for s in (0, 1)
      ]
  )
  paper = json.loads((tmp_path / "fedalign_paper_a0.1_s0" / "summary.json").read_text())
  assert paper["config"]["fedalign"]["regularizer_form"] == "marginal"
  md = out["markdown"]
  assert "FedProx (alpha 0.1) = FedAvg" in md
  assert "direct_averaging (alpha 0.1) = FedAvg" in md
  assert "permutation (alpha 0.1) = FedAlign-MoE + perm. align" in md
  assert table_row(md, "FedProx").split("|")[2] == table_row(md, "FedAvg").split("|")[2]
  diag = md.split("## Diagnostics at the last evaluated round")[1].split("## ")[0]
  assert table_row(diag, "FedAlign-MoE + perm. align").endswith("| 0.10-0.10 |")  # round 2
  # An entry without run files is "not run", not "failed" (grids run in parts).
  (tmp_path / "fedalign_perm_a0.1_s1" / "summary.json").unlink()
  md = reproduce.write_report(tmp_path)["markdown"]
  assert "(n=1; not run: s1)" in table_row(md, "FedAlign-MoE + perm. align")
  (tmp_path / "fedalign_perm_a0.1_s0" / "summary.json").unlink()
  md = reproduce.write_report(tmp_path)["markdown"]
  assert table_row(md, "FedAlign-MoE + perm. align").startswith(
      "| FedAlign-MoE + perm. align | not run | - |"
  )
  # The premise: the proximal term's gradient is 0 at the global parameters, where the only
  # local step starts (the engine-level equality: the slow test below).
  import jax
  import jax.numpy as jnp

  from fedalign.algorithms.fedprox import proximal_term

  w = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
  g = jax.grad(proximal_term(0.5))(w, w, {}, {})
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
  g_off = jax.grad(proximal_term(0.5))(w, {"a": w["a"] + 1, "b": w["b"]}, {}, {})
  np.testing.assert_allclose(g_off["a"], -0.5)  # mu (w - w_global) away from the global model


@pytest.mark.slow  # 25-50 s (two programs compiled); the premise is checked in the test above
def test_fedprox_equals_fedavg_at_one_local_step(tmp_path):
  """The rule behind the sharing, on the engine: two rounds of FedProx (mu = 0.5) and of FedAvg
  with one local step give the same metrics, bit for bit (round 2 trains from round 1's model)."""
  rows = {}
  for method in ("fedavg", "fedprox"):
    c = tiny_base()
    c.method, c.fedprox.mu = method, 0.5
    reproduce.run_experiment(c, tmp_path / method)
    lines = (tmp_path / method / "metrics.jsonl").read_text().splitlines()
    rows[method] = [
        {k: v for k, v in json.loads(l).items() if k != "method" and not k.endswith("_s")}
        for l in lines
    ]
  assert [r["round"] for r in rows["fedavg"]] == [1, 2]
  assert "train_loss" in rows["fedavg"][-1] and "test_accuracy" in rows["fedavg"][-1]
  assert rows["fedprox"] == rows["fedavg"]


# ----------------------------------------------------------------------------- CLI
def test_paired_difference_matches_scipy():
  """The interval is scipy's t interval of the per-seed differences; mismatched pairs fail."""
  from scipy import stats

  a, b = [0.71, 0.64, 0.69, 0.75, 0.66], [0.66, 0.65, 0.61, 0.70, 0.60]
  d = reproduce.paired_difference(a, b)
  diff = np.subtract(a, b)
  lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
  assert (d["mean"], d["lo"], d["hi"]) == pytest.approx((diff.mean(), lo, hi))
  assert d["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue) and d["p"] < 0.05
  one = reproduce.paired_difference([0.7], [0.6])
  assert one["n"] == 1 and math.isnan(one["lo"]) and one["mean"] == pytest.approx(0.1)
  with pytest.raises(ValueError, match="2 values vs 3 references"):
    reproduce.paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])


def test_cli_writes_header_and_records_failures(tmp_path):
  """Every entry fails config validation (no compute): exit 1, FAILED.txt, tables say so."""
  docs = tmp_path / "docs" / "results.md"
  cmd = [
      sys.executable,
      "-m",
      "experiments.reproduce",
      "--config=configs/default.py:runlocal",
      f"--workdir={tmp_path / 'grid'}",
      "--methods=fedavg,fedalign_perm",
      "--alphas=0.1",
      "--seeds=0",
      "--tiny",
      "--config.train.clients_per_round=99",
      f"--docs_out={docs}",
  ]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "2 entries failed" in proc.stderr
  failed = (tmp_path / "grid" / "fedalign_perm_a0.1_s0" / "FAILED.txt").read_text()
  assert "train.clients_per_round=99 is invalid" in failed
  md = docs.read_text()
  assert "--config.train.clients_per_round=99" in md and "configs/default.py:runlocal" in md
  assert "failed: s0: ValueError: config.train.clients_per_round=99" in table_row(
      md, "FedAlign-MoE + perm. align"
  )
  grid = json.loads((tmp_path / "grid" / "grid.json").read_text())
  perm = [e for e in grid["entries"] if e["label"] == "fedalign_perm"][0]
  assert perm["overrides"] == {"method": "fedalign", "fedalign.permutation_alignment": True}
  bad = subprocess.run(
      cmd[:5] + ["--methods=fedfoo"], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert bad.returncode != 0 and "fedfoo" in bad.stderr


# ----------------------------------------------------------------------------- notebook
def test_demo_notebook_runs_tiny(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  import jax
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

  try:
    KernelSpecManager().get_kernel_spec("python3")
  except NoSuchKernel:  # a venv without the kernelspec: this interpreter's, in a tmp dir
    from ipykernel.kernelspec import install

    install(prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
  monkeypatch.setenv("FEDALIGN_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("FEDALIGN_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
  cache = jax.config.jax_compilation_cache_dir  # shares the tiny grid's compilations
  if cache:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
  ).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  table = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
  assert table and "| FedAlign-MoE |" in table[0] and "| FedAvg |" in table[0]
  for m in ("fedavg", "fedalign"):
    s = json.loads((tmp_path / "runs" / m / "summary.json").read_text())
    assert math.isfinite(s["final_test_accuracy"]) and s["rounds"] == 2
    assert f"{s['final_test_accuracy']:.3f}" in table[0]


def test_grid_shares_one_pretrained_checkpoint(tmp_path, monkeypatch):
  """A config with a pretrain section: every entry gets WORKDIR/pretrained, the header says so."""
  seen = []

  def runner(config, workdir):
    seen.append(config.pretrain.dir)
    return fake_runner(lambda c: [0.3, 0.4], [])(config, workdir)

  monkeypatch.setattr(reproduce, "run_experiment", runner)
  base = reproduce.load_config("configs/cpu_analog.py")
  pre = tmp_path / "pretrained"
  pre.mkdir()
  (pre / "pretrain_info.json").write_text(
      json.dumps(
          {
              "documents": 10,
              "tokens_seen": 2_000_000,
              "epochs": 0.5,
              "validation_loss_before": 6.2,
              "validation_loss_after": 3.3,
              "wall_time_s": 90.0,
          }
      )
  )
  plan = reproduce.make_plan(["fedavg", "fedalign"], [0.1], [0, 1])
  out = reproduce.run_grid(base, plan, tmp_path)
  assert seen == [str(pre.resolve())] * 4
  assert (
      "- start: the checkpoint `" + str(pre.resolve()) + "` pre-trained once (seed 0)"
      in out["markdown"]
  )
  assert "held-out next-token loss 6.200 -> 3.300, 90 s" in out["markdown"]
