"""fedalign (JAX) vs the PyTorch FedAvg baseline, side by side: accuracy per round and timing.

Runs, in one process on one machine: fedalign's ``run_experiment`` (FedAvg), the PyTorch
baseline (:mod:`experiments.pytorch_baseline`) on the same config, an interleaved timing phase
(fedalign's round built by :func:`fedalign.federated.run.build_run`, exactly as
``run_experiment`` builds it, and the baseline's round with ``--threads`` and with 1 torch
thread, alternated round by round so that the shared machine's load changes hit all alike)
and ``--noise_seeds`` fedalign runs with seeds seed+1, ... as the seed-noise reference. Writes
``--out`` (markdown tables; the reading of them is the hand-written
``docs/pytorch_comparison.md``) and ``WORKDIR/compare.json``.

Command (from the repository root)::

    python -m experiments.compare_pytorch --config=configs/default.py:base \\
        --workdir=/tmp/pt_vs_jax --config.data.num_clients=4 ... [--timing_reps=6] \\
        [--noise_seeds=1] [--threads=2] [--out=benchmarks/pytorch_vs_jax.md]
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pathlib
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/pytorch_baseline.py

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments.pytorch_baseline import (  # noqa: E402
    check_supported,
    load_torch_model,
    run_baseline,
    torch_round,
)
from fedalign.reports import markdown_table  # noqa: E402

log = logging.getLogger("experiments.compare_pytorch")

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_MD = REPO / "benchmarks" / "pytorch_vs_jax.md"
READING = "docs/pytorch_comparison.md"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def median(xs: Sequence[float]) -> float:
  """The median, NaN for no values.

  >>> median([3.0, 1.0, 2.0]), str(median([]))
  (2.0, 'nan')
  """
  return float(statistics.median(xs)) if xs else float("nan")


def timing_summary(
    jax_rows: Sequence[Mapping[str, Any]], torch_rows: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
  """Median round times excluding round 1 (JAX compiles in it), JAX compile estimate, ratio.

  >>> j = [{'round_time_s': 10.0}, {'round_time_s': 1.0}, {'round_time_s': 1.2}]
  >>> t = [{'round_time_s': 3.0}, {'round_time_s': 2.2}, {'round_time_s': 2.2}]
  >>> timing_summary(j, t)['ratio']
  2.0
  """
  jt = [r["round_time_s"] for r in jax_rows]
  tt = [r["round_time_s"] for r in torch_rows]
  jm, tm = median(jt[1:]), median(tt[1:])
  return {
      "jax_round1_s": jt[0],
      "jax_median_s": jm,
      "jax_compile_s": jt[0] - jm,
      "torch_round1_s": tt[0],
      "torch_median_s": tm,
      "ratio": tm / jm,
      "jax_min_s": min(jt[1:], default=float("nan")),
      "torch_min_s": min(tt[1:], default=float("nan")),
  }


def machine_info() -> dict[str, Any]:
  """CPU, cores and library versions of this process."""
  import flax
  import optax
  import transformers
  from fedalign.hardware import describe

  hw = describe()
  return {
      "cpu": hw["cpu"],
      "cores": hw["cores"],
      "python": hw["python"],
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "jax": hw["jax"],
      "jax_backend": hw["backend"],
      "jax_devices": hw["devices"],
      "flax": flax.__version__,
      "optax": optax.__version__,
      "numpy": np.__version__,
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
  }


def make_fedalign_round(
    config: ml_collections.ConfigDict, data: Any, workdir: str | os.PathLike | None = None
) -> Any:
  """fedalign's round as ``run_experiment`` runs it (:func:`fedalign.federated.run.build_run`
  on ``data``): returns ``run(r) -> seconds`` (sample, batch, jitted round, host sync)."""
  from fedalign.federated.run import build_run

  run = build_run(config, workdir or tempfile.mkdtemp(prefix="fedalign_round_"), data=data)
  state = [run.initial_state]

  def run_round(r: int) -> float:
    rt = time.time()
    state[0], out, _ = run.run_round(state[0], r)
    float(out["train_loss"])
    return time.time() - rt

  return run_round


def make_torch_round(
    config: ml_collections.ConfigDict, data: Any, hf_dir: str | os.PathLike, threads: int
) -> Any:
  """The baseline's round (:func:`torch_round`) with ``threads`` intra-op threads as
  ``run(r) -> seconds`` (its own model and global state)."""
  model = load_torch_model(hf_dir)
  state = [copy.deepcopy(model.state_dict())]

  def run(r: int) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
      rt = time.time()
      state[0], _, _ = torch_round(model, state[0], data, config, r)
      return time.time() - rt
    finally:
      torch.set_num_threads(before)

  return run


def interleaved_timing(
    config: ml_collections.ConfigDict,
    data: Any,
    hf_dir: str | os.PathLike,
    reps: int,
    torch_threads: Sequence[int] = (2, 1),
) -> dict[str, Any]:
  """Round times of fedalign and of the baseline (once per entry of ``torch_threads``)
  alternated on the same rounds, the order rotating every round, so that changes of the
  machine's load hit all of them alike. Round 0 of each is a warm-up (jit compile for
  fedalign) reported apart; rounds 1..reps are timed.

  Why several thread counts: on a shared 2-core machine PyTorch's 2 OpenMP threads stall
  whenever another process takes a core (a parallel region waits for the descheduled
  thread), 1 thread does not.
  """
  runners = {"jax": make_fedalign_round(config, data)}
  for th in torch_threads:
    runners[f"torch{th}"] = make_torch_round(config, data, hf_dir, th)
  names = list(runners)
  warm = {name: runners[name](0) for name in names}
  rows = []
  for i in range(reps):
    r = i + 1
    order = names[i % len(names) :] + names[: i % len(names)]
    row = {"round": r + 1, "order": order}
    for name in order:
      row[name] = runners[name](r)
    row["loadavg_1min"] = os.getloadavg()[0]
    rows.append(row)
    log.info("interleaved round %d: %s", r + 1, ", ".join(f"{n} {row[n]:.3f}s" for n in names))
  med = {name: median([row[name] for row in rows]) for name in names}
  ratios = {
      f"torch{th}": median([row[f"torch{th}"] / row["jax"] for row in rows]) for th in torch_threads
  }
  return {
      "warmup": warm,
      "rows": rows,
      "median_s": med,
      "median_ratio": ratios,
      "torch_threads": list(torch_threads),
  }


def run_compare(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    out_md: str | os.PathLike = DEFAULT_MD,
    threads: int = 2,
    command: str | None = None,
    timing_reps: int = 6,
    noise_seeds: int = 1,
) -> dict[str, Any]:
  """fedalign's FedAvg (``run_experiment``), then the PyTorch baseline, on one config in one
  process, then an interleaved timing phase and ``noise_seeds`` more fedalign runs with seeds
  seed+1, ... (the seed-noise reference); writes the markdown report and
  ``workdir/compare.json``."""
  from fedalign.data.federated import FederatedData
  from fedalign.federated.server import run_experiment

  check_supported(config)
  if config.train.use_mesh:
    raise ValueError(
        "the comparison times fedalign's single-device round: set train.use_mesh=False."
    )
  torch.set_num_threads(threads)
  workdir = pathlib.Path(workdir)
  if workdir.exists():
    shutil.rmtree(workdir)  # fresh runs: fedalign would otherwise resume from checkpoints
  workdir.mkdir(parents=True)
  load_start = os.getloadavg()
  t0 = time.time()
  jax_summary = run_experiment(config, workdir / "jax")
  t_jax = time.time() - t0
  load_mid = os.getloadavg()
  (workdir / "torch").mkdir()
  # The same tokenizer file (BPE training is deterministic, but no need to rely on it).
  shutil.copy(workdir / "jax" / "tokenizer.json", workdir / "torch" / "tokenizer.json")
  t1 = time.time()
  torch_summary = run_baseline(config, workdir / "torch", threads=threads)
  t_torch = time.time() - t1
  load_after_runs = os.getloadavg()
  t2 = time.time()
  data = FederatedData(config, workdir / "torch")
  inter = interleaved_timing(
      config,
      data,
      workdir / "torch" / "hf_init",
      timing_reps,
      torch_threads=sorted({threads, 1}, reverse=True),
  )
  t_inter = time.time() - t2
  noise = []
  for k in range(1, noise_seeds + 1):
    cfg_k = copy.deepcopy(config)
    cfg_k.seed = config.seed + k
    run_experiment(cfg_k, workdir / f"jax_seed{cfg_k.seed}")
    noise.append(
        {
            "seed": cfg_k.seed,
            "rows": [
                {kk: r.get(kk) for kk in ("round", "test_accuracy", "train_loss")}
                for r in read_metrics(workdir / f"jax_seed{cfg_k.seed}" / "metrics.jsonl")
            ],
        }
    )
  load_end = os.getloadavg()
  jax_rows = read_metrics(workdir / "jax" / "metrics.jsonl")
  torch_rows = read_metrics(workdir / "torch" / "metrics.jsonl")
  keys = ("round", "test_accuracy", "train_loss", "round_time_s")
  result = {
      "command": command,
      "machine": machine_info(),
      "loadavg": {
          "start": load_start,
          "between": load_mid,
          "after_runs": load_after_runs,
          "end": load_end,
      },
      "wall_s": {"jax": t_jax, "torch": t_torch, "interleaved": t_inter, "total": time.time() - t0},
      "timing": timing_summary(jax_rows, torch_rows),
      "interleaved": inter,
      "jax": [{k: r.get(k) for k in keys} for r in jax_rows],
      "torch": [{k: r.get(k) for k in keys} for r in torch_rows],
      "seed_noise": noise,
      "torch_threads": torch_summary["torch_threads"],
      "attn_implementation": torch_summary["attn_implementation"],
      "experts_implementation": torch_summary["experts_implementation"],
      "client_sizes": jax_summary["client_sizes"],
      "config": json.loads(config.to_json()),
  }
  (workdir / "compare.json").write_text(json.dumps(result, indent=2))
  pathlib.Path(out_md).write_text(render_markdown(result))
  return result


def flops_per_token(cfg: Mapping[str, Any], dense_experts: bool) -> float:
  """Forward multiply-adds per token of the decoder (projections, attention over the full
  sequence, router, experts: all E when ``dense_experts`` else top-k, lm_head).

  >>> m = {'hidden_size': 8, 'num_heads': 2, 'num_kv_heads': 1, 'num_layers': 1,
  ...      'num_experts': 4, 'top_k': 1, 'moe_intermediate_size': 4}
  >>> c = {'model': m, 'data': {'seq_len': 4, 'vocab_size': 10}}
  >>> flops_per_token(c, True) - flops_per_token(c, False)
  288.0
  """
  m, d = cfg["model"], cfg["data"]
  h, hkv, dim = m["num_heads"], m["num_kv_heads"], m["hidden_size"]
  hd = dim // h
  attn = dim * h * hd * 2 + dim * hkv * hd * 2 + 2 * d["seq_len"] * h * hd
  experts = (
      (m["num_experts"] if dense_experts else m["top_k"]) * 3 * dim * m["moe_intermediate_size"]
  )
  per_layer = attn + dim * m["num_experts"] + experts
  return float(m["num_layers"] * per_layer + dim * d["vocab_size"])


def _ths(res: Mapping[str, Any]) -> list[int]:
  return list(res["interleaved"]["torch_threads"])


def result_table(res: Mapping[str, Any]) -> str:
  """Median round times (interleaved phase and the two full runs) and their ratios."""
  t, it = res["timing"], res["interleaved"]
  rows = [
      ["fedalign (interleaved)", f"{it['warmup']['jax']:.2f}", f"{it['median_s']['jax']:.3f}", ""]
  ]
  for th in _ths(res):
    k = f"torch{th}"
    rows.append(
        [
            f"PyTorch {th} thr (interleaved)",
            f"{it['warmup'][k]:.2f}",
            f"{it['median_s'][k]:.3f}",
            f"{it['median_ratio'][k]:.2f}",
        ]
    )
  rows.append(["fedalign (full run)", f"{t['jax_round1_s']:.2f}", f"{t['jax_median_s']:.3f}", ""])
  rows.append(
      [
          f"PyTorch {res['torch_threads']} thr (full run)",
          f"{t['torch_round1_s']:.2f}",
          f"{t['torch_median_s']:.3f}",
          f"{t['ratio']:.2f}",
      ]
  )
  return markdown_table(
      ["round function", "first round s", "median round s", "PyTorch / fedalign"], rows
  )


def accuracy_table(res: Mapping[str, Any]) -> str:
  """Per round: both engines' test accuracy and train loss, and the seed-noise runs."""
  noise = res.get("seed_noise") or []
  head = ["round", "fedalign acc", "PyTorch acc", "diff", "fedalign train loss"]
  head += ["PyTorch train loss", "loss diff"] + [f"fedalign seed {nz['seed']} acc" for nz in noise]
  rows = []
  for i, (j, p) in enumerate(zip(res["jax"], res["torch"])):
    row = [
        j["round"],
        f"{j['test_accuracy']:.4f}",
        f"{p['test_accuracy']:.4f}",
        f"{p['test_accuracy'] - j['test_accuracy']:+.4f}",
        f"{j['train_loss']:.5f}",
        f"{p['train_loss']:.5f}",
        f"{p['train_loss'] - j['train_loss']:+.1e}",
    ]
    for nz in noise:
      rr = nz["rows"]
      row.append(f"{rr[i]['test_accuracy']:.4f}" if i < len(rr) else "")
    rows.append(row)
  return markdown_table(head, rows)


def gap_summary(res: Mapping[str, Any]) -> dict[str, float]:
  """Accuracy / loss gaps between the engines, against the seed-to-seed gaps.

  >>> r = {'jax': [{'test_accuracy': 0.5, 'train_loss': 1.0}],
  ...      'torch': [{'test_accuracy': 0.52, 'train_loss': 1.0}],
  ...      'seed_noise': [{'rows': [{'test_accuracy': 0.4}]}],
  ...      'config': {'data': {'max_test_examples': 100}}}
  >>> g = gap_summary(r); round(g['max_acc_diff'], 2), round(g['max_seed_diff'], 2)
  (0.02, 0.1)
  """
  jrows, trows = res["jax"], res["torch"]
  d_acc = [abs(j["test_accuracy"] - p["test_accuracy"]) for j, p in zip(jrows, trows)]
  d_loss = [abs(j["train_loss"] - p["train_loss"]) for j, p in zip(jrows, trows)]
  n_test = res["config"]["data"]["max_test_examples"] or 2000
  # Accuracies are k / n_test; float32 vs float64 means differ by ~1e-8 for equal counts.
  same = next((i for i, d in enumerate(d_acc) if d > 0.25 / n_test), len(d_acc))
  p_mid = float(np.mean([j["test_accuracy"] for j in jrows]))
  gaps = [
      abs(j["test_accuracy"] - r["test_accuracy"])
      for nz in res.get("seed_noise") or []
      for j, r in zip(jrows, nz["rows"])
  ]
  nan = float("nan")
  return {
      "test_examples": n_test,
      "max_acc_diff": max(d_acc),
      "mean_acc_diff": float(np.mean(d_acc)),
      "identical_rounds": same,
      "round1_loss_diff": d_loss[0],
      "max_loss_diff": max(d_loss),
      "accuracy_standard_error": math.sqrt(p_mid * (1 - p_mid) / n_test),
      "max_seed_diff": max(gaps) if gaps else nan,
      "mean_seed_diff": float(np.mean(gaps)) if gaps else nan,
  }


def interleaved_table(res: Mapping[str, Any]) -> str:
  """Every timed round of the interleaved phase, with the medians."""
  it, ths = res["interleaved"], _ths(res)
  head = ["round", "fedalign s"] + [f"PyTorch {th} thr s" for th in ths]
  head += [f"{th} thr / fedalign" for th in ths] + ["load avg (1 min)"]
  rows = [
      [row["round"], f"{row['jax']:.3f}"]
      + [f"{row[f'torch{th}']:.3f}" for th in ths]
      + [f"{row[f'torch{th}'] / row['jax']:.2f}" for th in ths]
      + [f"{row['loadavg_1min']:.2f}"]
      for row in it["rows"]
  ]
  rows.append(
      ["**median**", f"**{it['median_s']['jax']:.3f}**"]
      + [f"**{it['median_s'][f'torch{th}']:.3f}**" for th in ths]
      + [f"**{it['median_ratio'][f'torch{th}']:.2f}**" for th in ths]
      + [""]
  )
  return markdown_table(head, rows)


def in_run_table(res: Mapping[str, Any]) -> str:
  """``round_time_s`` of the two full runs."""
  t = res["timing"]
  rows = [
      [
          j["round"],
          f"{j['round_time_s']:.3f}" + (" (incl. compile)" if j["round"] == 1 else ""),
          f"{p['round_time_s']:.3f}",
      ]
      for j, p in zip(res["jax"], res["torch"])
  ]
  rows.append(["median of rounds 2..", f"{t['jax_median_s']:.3f}", f"{t['torch_median_s']:.3f}"])
  return markdown_table(["round", "fedalign s", "PyTorch s"], rows)


def setup_table(res: Mapping[str, Any]) -> str:
  """Machine, versions, load averages, wall times and the model's work per token."""
  m, cfg, la = res["machine"], res["config"], res["loadavg"]
  load = lambda x: " / ".join(f"{v:.2f}" for v in x)
  dense, sparse = flops_per_token(cfg, True), flops_per_token(cfg, False)
  rows = [
      ["CPU", f"{m['cpu']}, {m['cores']} cores visible"],
      ["PyTorch threads", f"{res['torch_threads']} (and 1 in the interleaved phase)"],
      ["OMP_WAIT_POLICY", m.get("omp_wait_policy")],
      ["JAX", f"{m['jax']} ({m['jax_backend']} backend, {m['jax_devices']} device)"],
      [
          "versions",
          f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
          f"flax {m['flax']}, optax {m['optax']}, numpy {m['numpy']}",
      ],
      [
          "transformers implementations",
          f"attention `{res['attn_implementation']}`, experts `{res['experts_implementation']}`",
      ],
      [
          "load avg (1/5/15 min)",
          f"start {load(la['start'])}; after fedalign {load(la['between'])}; after PyTorch "
          f"{load(la['after_runs'])}; end {load(la['end'])}",
      ],
      [
          "wall s",
          ", ".join(f"{k} {v:.1f}" for k, v in res["wall_s"].items()),
      ],
      [
          "forward multiply-adds per token",
          f"all experts (fedalign moe_impl='dense') {dense / 1e3:.0f}k, "
          f"top-{cfg['model']['top_k']} (transformers; fedalign 'sparse' + block padding) "
          f"{sparse / 1e3:.0f}k ({dense / sparse:.2f}x); this run: fedalign "
          f"moe_impl='{cfg['model']['moe_impl']}'",
      ],
      ["client sizes", str(res["client_sizes"])],
  ]
  return markdown_table(["", "value"], rows)


def render_markdown(res: Mapping[str, Any]) -> str:
  """The report: tables of the run (what they mean: ``docs/pytorch_comparison.md``)."""
  g = gap_summary(res)
  gaps = markdown_table(
      ["", "value"],
      [[k.replace("_", " "), f"{v:.4g}" if isinstance(v, float) else v] for k, v in g.items()],
  )
  sections = [
      "# fedalign (JAX) vs a PyTorch / transformers FedAvg baseline",
      f"Generated by `experiments/compare_pytorch.py` (command below); how to read these "
      f"tables: [{READING}](../{READING}).",
      "## Round time (CPU)\n\n" + result_table(res),
      "## Accuracy per round\n\n" + accuracy_table(res),
      "### Engine gap vs seed noise\n\n" + gaps,
      "## Timing, interleaved phase\n\n" + interleaved_table(res),
      "## Timing, in-run `round_time_s`\n\n" + in_run_table(res),
      "## Command, machine, versions\n\n```\n"
      + (res["command"] or "(called from Python)")
      + "\n```\n\n"
      + setup_table(res),
      "## Config\n\n<details><summary>full config (JSON)</summary>\n\n```json\n"
      + json.dumps(res["config"], indent=1, sort_keys=True)
      + "\n```\n</details>",
  ]
  return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str]) -> None:
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  command = "python -m experiments.compare_pytorch " + " ".join(
      shlex.quote(a) for a in sys.argv[1:]
  )
  res = run_compare(
      _CONFIG.value,
      _WORKDIR.value,
      _OUT.value,
      _THREADS.value,
      command,
      _TIMING_REPS.value,
      _NOISE_SEEDS.value,
  )
  it = res["interleaved"]
  print(
      "ratio(PyTorch/fedalign): "
      + ", ".join(f"{k}={v:.2f}" for k, v in it["median_ratio"].items())
      + f" medians_s={it['median_s']} report={_OUT.value}"
  )


if __name__ == "__main__":
  from absl import app, flags
  from fedalign.config_files import define_config_flag

  _CONFIG = define_config_flag("config", "Path to a get_config() file.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
  _OUT = flags.DEFINE_string("out", str(DEFAULT_MD), "Markdown report.")
  _THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads of the PyTorch run.")
  _TIMING_REPS = flags.DEFINE_integer("timing_reps", 6, "Interleaved timed rounds.")
  _NOISE_SEEDS = flags.DEFINE_integer(
      "noise_seeds", 1, "Extra fedalign runs with seeds seed+1.. (seed-noise reference)."
  )
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
