"""Reproduces the paper-style comparison: methods x Dirichlet alpha x seeds (+ the ablation).

Command (from the repository root)::

    python -m experiments.reproduce --config=configs/default.py --workdir=/tmp/fedalign_grid \\
        [--methods=fedavg,fedprox,fedmoe,fedalign,fedalign_perm] [--alphas=1.0,0.1] \\
        [--seeds=0,1,2] [--ablation] [--target_accuracy=0.6] [--docs_out=docs/results.md] \\
        [--tables_only] [--tiny] [--config.train.rounds=25 ...]

Every grid entry runs :func:`fedalign.federated.server.run_experiment` in its own directory
``WORKDIR/{method}_a{alpha}_s{seed}`` on the ``--config`` file (with its ``--config.*``
overrides) plus ``method``, ``data.alpha`` and ``seed``. ``fedalign_perm`` is ``fedalign`` with
``fedalign.permutation_alignment=True`` (see :data:`METHOD_VARIANTS`). ``--ablation`` adds the
cumulative rows of ``configs/ablation.py`` at alpha = 0.1 (``WORKDIR/ablation_{row}_a0.1_s{seed}``;
a row whose config equals a grid entry's reuses that entry).

Rerunning the same command resumes: entries whose ``summary.json`` holds the same config are
skipped, the others resume from their checkpoints. A failing entry (exception, or a non-finite
final accuracy) gets ``FAILED.txt`` (error and traceback) and the grid goes on; the exit status is
1 when any entry failed. ``--tables_only`` rewrites the tables and plots without running.

Outputs: ``WORKDIR/results.md`` (and ``--docs_out``, whose plots are copied next to it into
``<docs_out stem>_plots/``), ``WORKDIR/results.json`` (the same numbers, machine-readable),
``WORKDIR/grid.json`` (the plan and how it was run) and ``WORKDIR/plots/``. Every number in the
tables is computed from the entries' ``summary.json`` / ``metrics.jsonl``. In ``--docs_out``
they replace this workdir's generated block only (:func:`fedalign.reports.write_generated_block`):
the hand-written reading around it is kept.

In Python (a tiny grid, about a minute on 2 CPU cores)::

    >>> import tempfile, ml_collections
    >>> from experiments import reproduce
    >>> base = reproduce.load_config('configs/default.py:runlocal')
    >>> reproduce.apply_overrides(base, reproduce.TINY_OVERRIDES)
    >>> plan = reproduce.make_plan(['fedavg', 'fedalign'], [0.1], [0])
    >>> out = reproduce.run_grid(base, plan, tempfile.mkdtemp())  # doctest: +SKIP
    >>> print(out['markdown'])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from experiments import plots as plots_lib
from fedalign import config_files
from fedalign.federated.server import run_experiment
from fedalign.reports import docs_key, markdown_table, write_generated_block, write_json

log = logging.getLogger("experiments.reproduce")

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ("fedavg", "fedprox", "fedmoe", "fedalign", "fedalign_perm")
# Grid methods that are not config.method values: name -> dotted overrides.
METHOD_VARIANTS: dict[str, dict[str, Any]] = {
    "fedalign_perm": {"method": "fedalign", "fedalign.permutation_alignment": True},
    # configs/common.py FEDALIGN_PAPER: the paper's literal reading (Science I's `paper` preset).
    "fedalign_paper": {
        "method": "fedalign",
        **{
            f"fedalign.{k}": v
            for k, v in config_files.load_module(
                pathlib.Path(__file__).resolve().parents[1] / "configs" / "common.py"
            ).FEDALIGN_PAPER.items()
        },
    },
}
# Config sections read only by the method of the same name (fedalign/algorithms/<method>.py).
METHOD_SECTIONS = ("fedalign", "fedprox")
METHOD_LABELS = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedmoe": "FedMoE",
    "fedalign": "FedAlign-MoE",
    "fedalign_perm": "FedAlign-MoE + perm. align",
    "fedalign_paper": "FedAlign-MoE (paper preset)",
    "scaffold": "SCAFFOLD",
    "fedavgm": "FedAvgM",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
}
ABLATION_ALPHA = 0.1
ABLATION_DESCRIPTIONS = {
    "direct_averaging": "FedAvg (no alignment)",
    "uniform_gating": "+ gating-distribution regularizer, uniform expert weights",
    "consistency": "+ routing-consistency router aggregation (o * m)",
    "adaptive_alpha": "+ adaptive expert-level weights alpha = exp(-CV)",
    "semantic": "+ semantic-aware selective expert aggregation (full method)",
    "permutation": "+ expert permutation alignment (ours)",
}
# The CI-sized setting (tests, the notebook's FEDALIGN_NOTEBOOK_TINY=1): on top of
# configs/default.py:runlocal, a few seconds of compute per entry on 2 CPU cores.
TINY_OVERRIDES: dict[str, Any] = {
    "data.num_clients": 4,
    "data.max_train_examples": 300,
    "data.max_test_examples": 100,
    "data.min_client_size": 10,
    "data.seq_len": 24,
    "data.vocab_size": 280,
    "model.hidden_size": 16,
    "model.intermediate_size": 32,
    "model.moe_intermediate_size": 16,
    "model.num_heads": 2,
    "model.num_kv_heads": 1,
    "model.num_layers": 1,
    "train.clients_per_round": 3,
    "train.local_steps": 1,
    "train.batch_size": 8,
    "train.rounds": 2,
    "eval.per_client": False,
}


# ----------------------------------------------------------------------------- configs
def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'path/to/config.py[:arg]'`` -> its ``get_config(arg)`` (relative paths: cwd, then repo).

  >>> load_config('configs/default.py:runlocal').train.rounds
  3
  """
  return config_files.load_config(spec)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  """Sets dotted fields in place; an unknown field is a KeyError naming it.

  >>> c = ml_collections.ConfigDict({'a': {'b': 1}})
  >>> apply_overrides(c, {'a.b': 2}); c.a.b
  2
  """
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
      if part not in node:
        raise KeyError(
            f"unknown config field {'.'.join(parents[:i + 1])!r} (in override " f"{key}={value!r})"
        )
      node = node[part]
    if leaf not in node:
      raise KeyError(f"unknown config field {key!r} (override {key}={value!r})")
    node[leaf] = value


def ablation_overrides(
    ablation_file: str | pathlib.Path = REPO / "configs" / "ablation.py",
) -> dict[str, dict[str, Any]]:
  """row -> the dotted fields that ``configs/ablation.py`` sets for it (``method`` plus every
  field some row changes from the default), applied on top of the grid's base config.

  >>> ablation_overrides()['permutation']['fedalign.permutation_alignment']
  True
  """
  mod = config_files.load_module(ablation_file)
  default = config_files.flatten_config(mod.base_config())
  rows = {row: config_files.flatten_config(mod.get_config(row)) for row in mod.ROWS}
  keys = {"method"} | {k for flat in rows.values() for k in flat if flat[k] != default.get(k)}
  return {row: {k: flat[k] for k in sorted(keys)} for row, flat in rows.items()}


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Entry:
  """One run of the grid: ``name`` is its sub-directory, ``label`` the method or ablation row."""

  name: str
  group: str  # 'grid' | 'ablation'
  label: str
  alpha: float
  seed: int
  overrides: dict[str, Any]

  def make_config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = base.copy_and_resolve_references()
    apply_overrides(c, {**self.overrides, "data.alpha": float(self.alpha), "seed": self.seed})
    return c


def entry_name(method: str, alpha: float, seed: int) -> str:
  """The sub-directory of a grid entry.

  >>> entry_name('fedavg', 1, 0)
  'fedavg_a1.0_s0'
  """
  return f"{method}_a{float(alpha)}_s{seed}"


def method_overrides(method: str) -> dict[str, Any]:
  return dict(METHOD_VARIANTS.get(method, {"method": method}))


def make_plan(
    methods: Sequence[str],
    alphas: Sequence[float],
    seeds: Sequence[int],
    ablation: bool = False,
    rows: Sequence[str] | None = None,
) -> list[Entry]:
  """The entries of methods x alphas x seeds, then (``ablation``) the ablation rows x seeds
  (``rows``: a subset of ``configs/ablation.py``'s rows, e.g. to run the grid in parts).

  >>> [e.name for e in make_plan(['fedavg'], [1.0, 0.1], [0])]
  ['fedavg_a1.0_s0', 'fedavg_a0.1_s0']
  >>> [e.name for e in make_plan([], [0.1], [0], ablation=True, rows=['consistency'])]
  ['ablation_consistency_a0.1_s0']
  """
  plan = [
      Entry(entry_name(m, a, s), "grid", m, float(a), int(s), method_overrides(m))
      for m in methods
      for a in alphas
      for s in seeds
  ]
  if ablation:
    all_rows = ablation_overrides()
    unknown = sorted(set(rows or ()) - set(all_rows))
    if unknown:
      raise ValueError(f"ablation rows {unknown} are unknown: expected some of {list(all_rows)}")
    for row, ov in all_rows.items():
      if rows and row not in rows:
        continue
      for s in seeds:
        plan.append(
            Entry(
                f"ablation_{row}_a{ABLATION_ALPHA}_s{s}",
                "ablation",
                row,
                ABLATION_ALPHA,
                int(s),
                ov,
            )
        )
  return plan


def effective_config_key(config: ml_collections.ConfigDict) -> str:
  """What a run computes, as a string: the config less what its method never reads.

  The sections of :data:`METHOD_SECTIONS` count only for their own method, and FedProx with
  ``train.local_steps == 1`` is FedAvg: its one local step starts at the global parameters,
  where the proximal term and its gradient are 0 (tests/test_experiments.py checks that two
  engine rounds give equal metrics).

  >>> c = load_config('configs/default.py')
  >>> c.method = 'fedprox'; k_prox = effective_config_key(c)
  >>> c.method = 'fedavg'; c.fedalign.lambda_reg = 0.5
  >>> k_prox == effective_config_key(c)
  True
  """
  flat = config_files.flatten_config(config)
  if flat.get("method") == "fedprox" and flat.get("train.local_steps") == 1:
    flat["method"] = "fedavg"
  flat = {
      k: v
      for k, v in flat.items()
      if k.split(".")[0] not in METHOD_SECTIONS or k.split(".")[0] == flat.get("method")
  }
  return json.dumps(flat, sort_keys=True, default=str)


def dedupe_plan(plan: list[Entry], base: ml_collections.ConfigDict) -> list[Entry]:
  """A copy of ``plan`` where an entry that computes what an earlier one computes
  (:func:`effective_config_key`) points at that entry's directory: an ablation row equal to a
  grid method, FedProx at one local step and FedAvg."""
  plan = [dataclasses.replace(e) for e in plan]
  by_config: dict[str, str] = {}
  for e in plan:
    try:
      key = effective_config_key(e.make_config(base))
    except Exception:  # noqa: BLE001 - a bad override fails later, when the entry runs
      continue
    e.name = by_config.setdefault(key, e.name)
  return plan


def shared_runs(plan: list[Entry]) -> dict[str, str]:
  """``{'label (alpha a)': 'the label whose runs it reuses'}`` for the deduplicated entries."""
  owner = {e.name: e for e in plan if e.name == _own_name(e)}
  out: dict[str, str] = {}
  for e in plan:
    if e.name != _own_name(e) and e.name in owner:
      out[f"{_label(e.label)} (alpha {e.alpha})"] = _label(owner[e.name].label)
  return out


def _own_name(e: Entry) -> str:
  if e.group == "grid":
    return entry_name(e.label, e.alpha, e.seed)
  return f"ablation_{e.label}_a{e.alpha}_s{e.seed}"


# ----------------------------------------------------------------------------- running
def is_finished(entry_dir: pathlib.Path, config: ml_collections.ConfigDict) -> bool:
  """summary.json present, with this config and a finite final accuracy, and no FAILED.txt."""
  path = entry_dir / "summary.json"
  if not path.exists() or (entry_dir / "FAILED.txt").exists():
    return False
  try:
    summary = json.loads(path.read_text())
  except (OSError, ValueError):
    return False
  acc = summary.get("final_test_accuracy")
  return (
      isinstance(summary.get("config"), dict)
      and not config_files.config_differences(summary["config"], config)
      and isinstance(acc, (int, float))
      and math.isfinite(acc)
  )


def run_entry(
    entry: Entry,
    base: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    runner: Callable[[ml_collections.ConfigDict, pathlib.Path], dict] | None = None,
    progress: str = "",
) -> dict[str, Any]:
  """Runs (resumes, or skips when finished) one entry; never raises except on interrupts.

  Returns ``{'name', 'status': 'done'|'skipped'|'failed', 'error', 'seconds'}``.
  """
  runner = runner or run_experiment
  d = workdir / entry.name
  failed = d / "FAILED.txt"
  t0 = time.time()
  try:
    config = entry.make_config(base)
    if is_finished(d, config):
      return {"name": entry.name, "status": "skipped", "error": None, "seconds": 0.0}
    d.mkdir(parents=True, exist_ok=True)
    failed.unlink(missing_ok=True)
    log.info(
        "%s %s: running (%s)",
        progress,
        entry.name,
        "resuming" if (d / "checkpoints").exists() else "new",
    )
    summary = runner(config, d)
    acc = summary.get("final_test_accuracy") if isinstance(summary, dict) else None
    if not isinstance(acc, (int, float)) or not math.isfinite(acc):
      raise FloatingPointError(f"final test accuracy is {acc!r} (not a finite number)")
  except Exception as e:  # noqa: BLE001 - recorded, and the grid goes on
    msg = f"{type(e).__name__}: {e}"
    d.mkdir(parents=True, exist_ok=True)
    failed.write_text(msg + "\n\n" + traceback.format_exc())
    return {"name": entry.name, "status": "failed", "error": msg, "seconds": time.time() - t0}
  return {"name": entry.name, "status": "done", "error": None, "seconds": time.time() - t0}


def run_grid(
    base: ml_collections.ConfigDict,
    plan: list[Entry],
    workdir: str | os.PathLike,
    *,
    target_accuracy: float = 0.6,
    run_info: dict[str, Any] | None = None,
    docs_out: str | os.PathLike | None = None,
    tables_only: bool = False,
) -> dict[str, Any]:
  """Runs every entry of ``plan`` (unique directories once), then writes tables and plots.

  Returns ``{'statuses': [...], 'markdown': str, 'results': dict, 'plots': [...]}``.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if base.data.get("partition", "dirichlet") != "dirichlet":
    log.warning(
        "config.data.partition=%r: data.alpha (the grid's alpha) has no effect", base.data.partition
    )
  if "pretrain" in base and base.pretrain.enabled and not base.pretrain.dir:
    base.pretrain.dir = str(workdir.resolve() / "pretrained")  # one checkpoint for the grid
  plan = dedupe_plan(plan, base)
  t0 = time.time()
  statuses: list[dict[str, Any]] = []
  unique: list[Entry] = []
  for e in plan:  # a directory shared by several plan entries runs once
    if all(u.name != e.name for u in unique):
      unique.append(e)
  info = dict(run_info or {})
  info.setdefault("command", shlex.join([sys.executable, *sys.argv]))
  if tables_only and (workdir / "grid.json").exists():  # keep what the last run measured
    old = json.loads((workdir / "grid.json").read_text()).get("run_info", {})
    for key in ("invocation_wall_time_s", "hardware", "pretrain"):
      if key in old:
        info[key] = old[key]
    if "command" in old and old["command"] != info["command"]:  # the runs' own command
      info["tables_command"] = info["command"]
      for key in ("command", "config_file", "overrides"):
        if key in old:
          info[key] = old[key]
  info["pretrain"] = _pretrain_info(base) or info.get("pretrain")
  _write_plan(workdir, plan, base, info, target_accuracy, keep_plan=tables_only)
  if not tables_only:
    info["hardware"] = hardware()
    for i, e in enumerate(unique):
      st = run_entry(e, base, workdir, progress=f"[{i + 1}/{len(unique)}]")
      statuses.append(st)
      if st["status"] == "failed":
        log.error(
            "[%d/%d] %s: FAILED (%s) - see %s",
            i + 1,
            len(unique),
            e.name,
            st["error"].splitlines()[0][:300],
            workdir / e.name / "FAILED.txt",
        )
      elif st["status"] == "skipped":
        log.info("[%d/%d] %s: finished earlier, skipped", i + 1, len(unique), e.name)
      else:
        log.info("[%d/%d] %s: done in %.1fs", i + 1, len(unique), e.name, st["seconds"])
    info["invocation_wall_time_s"] = time.time() - t0
    info["pretrain"] = _pretrain_info(base)
    _write_plan(workdir, plan, base, info, target_accuracy)
  report = write_report(workdir, target_accuracy=target_accuracy, docs_out=docs_out)
  n_failed = sum(s["status"] == "failed" for s in statuses)
  log.info(
      "grid: %d entries, %d run, %d skipped, %d failed; tables in %s",
      len(unique),
      sum(s["status"] == "done" for s in statuses),
      sum(s["status"] == "skipped" for s in statuses),
      n_failed,
      workdir / "results.md",
  )
  return {"statuses": statuses, **report}


def _pretrain_info(base: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """What the grid's shared pre-training did (its ``pretrain_info.json``), or None: the
  in-run pre-training (``pretrain.enabled``) or a ``model.hf_checkpoint`` that carries one
  (the shipped ``fedalign/pretrained/moe-small``)."""
  if "pretrain" in base and base.pretrain.enabled:
    where, seed = base.pretrain.dir, base.pretrain.seed
    sources = base.pretrain.sources
  elif base.model.get("hf_checkpoint"):
    where = base.model.hf_checkpoint
  else:
    return None
  path = pathlib.Path(where) / "pretrain_info.json"
  if not path.exists():
    return None
  info = json.loads(path.read_text())
  if not ("pretrain" in base and base.pretrain.enabled):
    fields = info.get("fields", {}).get("pretrain", {})
    seed, sources = fields.get("seed", "?"), fields.get("sources", "?")
  keep = (
      "documents",
      "tokens_seen",
      "epochs",
      "validation_loss_before",
      "validation_loss_after",
      "wall_time_s",
  )
  rel = os.path.relpath(where)  # the shipped checkpoint: its path in the repository
  where = rel if not rel.startswith("..") else str(where)
  return {"dir": where, "seed": seed, "sources": sources, **{k: info[k] for k in keep}}


def _write_plan(
    workdir: pathlib.Path,
    plan: list[Entry],
    base: ml_collections.ConfigDict,
    info: dict[str, Any],
    target_accuracy: float,
    keep_plan: bool = False,
) -> None:
  data = {
      "entries": [dataclasses.asdict(e) for e in plan],
      "run_info": info,
      "target_accuracy": target_accuracy,
      "base_config": json.loads(base.to_json()),
  }
  path = workdir / "grid.json"
  if keep_plan and path.exists():
    # --tables_only over the same entries: the plan stays as the runs wrote it (the config
    # fields added since would otherwise appear in a record of runs made without them)
    old = json.loads(path.read_text())
    if {e["name"] for e in old.get("entries", [])} == {e.name for e in plan}:
      data["entries"], data["base_config"] = old["entries"], old.get("base_config", {})
  write_json(path, data)


# ----------------------------------------------------------------------------- results
def read_entry(entry_dir: pathlib.Path, target_accuracy: float) -> dict[str, Any]:
  """What the tables need from one entry directory: status, accuracies, convergence, timing."""
  failed = entry_dir / "FAILED.txt"
  if failed.exists():
    return {"status": "failed", "error": failed.read_text().split("\n\n", 1)[0].strip()}
  path = entry_dir / "summary.json"
  if not path.exists():
    return {"status": "missing", "error": "not run (no summary.json)"}
  s = json.loads(path.read_text())
  records = plots_lib.read_metrics(entry_dir)
  curve = plots_lib.metric_curve(records, "test_accuracy")
  accs = curve[1] if curve is not None else np.zeros(0)
  reached = None
  if curve is not None:
    hit = np.nonzero(curve[1] >= target_accuracy)[0]
    reached = int(curve[0][hit[0]]) if hit.size else None
  # round 1 includes the round's compilation (seconds to minutes): left out when others exist
  timed = [r for r in records if "round_time_s" in r]
  times = [r["round_time_s"] for r in timed if r.get("round") != 1 or len(timed) == 1]
  last5 = s.get("last5_mean_test_accuracy")
  return {
      "status": "ok",
      "final": float(s["final_test_accuracy"]),
      "last5": float(last5) if last5 is not None else float(np.mean(accs[-5:])),
      "best": float(s.get("best_test_accuracy", np.max(accs) if accs.size else np.nan)),
      "last5_std": float(np.std(accs[-5:])) if accs.size else float("nan"),
      "rounds_to_target": reached,
      "rounds": int(s.get("rounds", curve[0][-1] if curve is not None else 0)),
      "wall_time_s": float(s.get("wall_time_s", float("nan"))),
      # summaries from before 2026-12-01 lack it: their wall_time_s restarted on a resume
      "wall_time_cumulative": "resumed_from_round" in s,
      "mean_round_time_s": float(np.mean(times)) if times else float("nan"),
      "last_diagnostics": _last_diagnostics(records),
      # data.task = 'lm': the final test NLL (nats per token); accuracy is next-token accuracy
      "final_nll": float(s["final_test_nll"]) if "final_test_nll" in s else None,
  }


# Last-round diagnostics the tables report: metrics.jsonl key -> column name; keys ending in
# PERM_MOVED (one per MoE layer, permutation alignment only) are reported as their range.
LAST_DIAGNOSTICS = {
    "expert_role_preservation": "role preservation",
    "expert_specialization": "I(expert; label) (nats)",
    "routing_divergence": "routing JS divergence",
}
PERM_MOVED = "perm_moved_frac"


def _last_diagnostics(records: list[dict[str, Any]]) -> dict[str, float]:
  """The last record's values of :data:`LAST_DIAGNOSTICS` and of every ``*perm_moved_frac``."""
  last = records[-1] if records else {}
  return {
      k: float(v)
      for k, v in last.items()
      if (k in LAST_DIAGNOSTICS or k.endswith(PERM_MOVED)) and isinstance(v, (int, float))
  }


def mean_std(values: Sequence[float]) -> dict[str, float]:
  """Mean and sample std (ddof=1; 0 for a single value) over seeds.

  >>> mean_std([0.5, 0.7])['n'], round(mean_std([0.5, 0.7])['std'], 4)
  (2, 0.1414)
  """
  v = np.asarray(values, np.float64)
  std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
  return {"mean": float(np.mean(v)), "std": std, "n": int(v.size)}


def paired_difference(
    values: Sequence[float], reference: Sequence[float], confidence: float = 0.95
) -> dict[str, float]:
  """Mean of the per-seed differences ``values - reference`` with its Student-t confidence
  interval (paired: the same seed means the same partition and initialisation).

  With one pair the interval is unbounded (``nan``); ``p`` is the two-sided paired t-test's
  p-value (``scipy.stats.ttest_rel``).

  >>> d = paired_difference([0.62, 0.60, 0.65], [0.58, 0.59, 0.60])
  >>> round(d['mean'], 4), round(d['lo'], 4), round(d['hi'], 4), d['n']
  (0.0333, -0.0184, 0.085, 3)
  """
  from scipy import stats

  v, r = np.asarray(values, np.float64), np.asarray(reference, np.float64)
  if v.shape != r.shape:
    raise ValueError(f"paired_difference: {v.shape[0]} values vs {r.shape[0]} references")
  d = v - r
  out = {"mean": float(np.mean(d)), "n": int(d.size), "lo": float("nan"), "hi": float("nan")}
  out["p"] = float("nan")
  if d.size > 1:
    sem = float(np.std(d, ddof=1)) / math.sqrt(d.size)
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * sem
    out.update(lo=out["mean"] - half, hi=out["mean"] + half)
    if sem > 1e-12:  # constant differences (up to rounding): no test
      out["p"] = float(stats.ttest_rel(v, r).pvalue)
  return out


def _aggregate(results: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
  ok = [r for r in results if r["status"] == "ok"]
  agg: dict[str, Any] = {
      "seeds": seeds,
      "n_ok": len(ok),
      "failed": [
          {"seed": s, "error": r["error"]}
          for s, r in zip(seeds, results)
          if r["status"] not in ("ok", "missing")
      ],
      "not_run": [s for s, r in zip(seeds, results) if r["status"] == "missing"],
  }
  if ok:
    agg["last5"] = mean_std([r["last5"] for r in ok])
    agg["final"] = mean_std([r["final"] for r in ok])
    agg["stability"] = mean_std([r["last5_std"] for r in ok])
    if all(r.get("final_nll") is not None for r in ok):
      agg["final_nll"] = mean_std([r["final_nll"] for r in ok])
    reached = [r["rounds_to_target"] for r in ok if r["rounds_to_target"] is not None]
    agg["rounds_to_target"] = {
        "mean": float(np.mean(reached)) if reached else None,
        "reached": len(reached),
        "n": len(ok),
    }
    agg["mean_round_time_s"] = float(np.nanmean([r["mean_round_time_s"] for r in ok]))
    agg["wall_time_s"] = float(np.nansum([r["wall_time_s"] for r in ok]))
    diags = [r.get("last_diagnostics", {}) for r in ok]
    agg["last_diagnostics"] = {
        k: float(np.mean([d[k] for d in diags]))
        for k in LAST_DIAGNOSTICS
        if all(k in d for d in diags)
    }
    moved = [v for d in diags for k, v in d.items() if k.endswith(PERM_MOVED)]
    if moved:
      agg["last_diagnostics"]["perm_moved_range"] = (min(moved), max(moved))
  return agg


def collect_results(
    workdir: str | os.PathLike, target_accuracy: float | None = None
) -> dict[str, Any]:
  """Aggregates the entries of ``workdir/grid.json`` from their files, over seeds.

  Returns ``{'grid': {method: {alpha: agg}}, 'ablation': {row: agg}, 'methods', 'alphas',
  'rows', 'target_accuracy', 'run_info', 'entries_wall_time_s'}`` where ``agg`` holds
  ``last5``/``final`` (``{'mean', 'std', 'n'}``), ``gain_vs_fedavg`` (relative, of the last-5
  mean), ``rounds_to_target``, ``failed`` ([{seed, error}]), ...
  """
  workdir = pathlib.Path(workdir)
  plan = json.loads((workdir / "grid.json").read_text())
  target = plan["target_accuracy"] if target_accuracy is None else target_accuracy
  entries = [Entry(**e) for e in plan["entries"]]
  cache: dict[str, dict] = {}

  def res(e: Entry) -> dict[str, Any]:
    if e.name not in cache:
      cache[e.name] = read_entry(workdir / e.name, target)
    return cache[e.name]

  methods = list(dict.fromkeys(e.label for e in entries if e.group == "grid"))
  alphas = list(dict.fromkeys(e.alpha for e in entries if e.group == "grid"))
  rows = list(dict.fromkeys(e.label for e in entries if e.group == "ablation"))
  grid: dict[str, dict[str, Any]] = {}
  for m in methods:
    grid[m] = {}
    for a in alphas:
      es = [e for e in entries if e.group == "grid" and e.label == m and e.alpha == a]
      grid[m][str(a)] = _aggregate([res(e) for e in es], [e.seed for e in es])
  for a in alphas:
    ref = grid.get("fedavg", {}).get(str(a), {}).get("last5")
    for m in methods:
      cell = grid[m][str(a)]
      cell["gain_vs_fedavg"] = (
          None
          if ref is None or "last5" not in cell or ref["mean"] == 0
          else (cell["last5"]["mean"] - ref["mean"]) / ref["mean"]
      )
  # Paired (same seed) differences against FedAvg, over the seeds both finished.
  for a in alphas:
    ref = {
        e.seed: res(e)
        for e in entries
        if e.group == "grid" and e.label == "fedavg" and e.alpha == a
    }
    for m in methods:
      es = [e for e in entries if e.group == "grid" and e.label == m and e.alpha == a]
      pairs = [
          (res(e), ref[e.seed])
          for e in es
          if e.seed in ref and res(e)["status"] == "ok" and ref[e.seed]["status"] == "ok"
      ]
      grid[m][str(a)]["paired_vs_fedavg"] = (
          None
          if m == "fedavg" or not pairs
          else {
              k: paired_difference([p[0][k] for p in pairs], [p[1][k] for p in pairs])
              for k in ("last5", "final", "final_nll")
              if all(p[0].get(k) is not None and p[1].get(k) is not None for p in pairs)
          }
      )
  ablation = {}
  previous: dict[int, dict[str, Any]] = {}
  for row in rows:
    es = [e for e in entries if e.group == "ablation" and e.label == row]
    ablation[row] = _aggregate([res(e) for e in es], [e.seed for e in es])
    ablation[row]["entries"] = sorted({e.name for e in es})
    # Paired (same seed) difference of the last-5 means against the previous row.
    ok = {e.seed: res(e) for e in es if res(e)["status"] == "ok"}
    seeds = sorted(set(ok) & set(previous))
    ablation[row]["paired_vs_previous"] = (
        paired_difference([ok[s]["last5"] for s in seeds], [previous[s]["last5"] for s in seeds])
        if seeds
        else None
    )
    previous = ok
  wall = sum(
      r.get("wall_time_s", 0.0)
      for r in cache.values()
      if r["status"] == "ok" and math.isfinite(r.get("wall_time_s", float("nan")))
  )
  return {
      "grid": grid,
      "ablation": ablation,
      "methods": methods,
      "alphas": alphas,
      "rows": rows,
      "target_accuracy": target,
      "run_info": plan.get("run_info", {}),
      "entries_wall_time_s": wall,
      "entries_wall_time_restarted": sum(
          1 for r in cache.values() if r["status"] == "ok" and not r.get("wall_time_cumulative")
      ),
      "seeds": sorted({e.seed for e in entries}),
      "entries": {e.name: res(e) for e in entries},
      "shared_runs": shared_runs(entries),
      "data": plan.get("base_config", {}).get("data", {}),  # partition and task of the grid
  }


def _alpha_header(alphas: Sequence[float], columns: Sequence[str]) -> list[str]:
  """Header of a method x alpha table: one group of ``columns`` per alpha."""
  return ["method"] + [f"α={a} {c}" for a in alphas for c in columns]


def fmt_ms(d: dict[str, float] | None, digits: int = 3) -> str:
  """``mean ± std`` of a :func:`mean_std` dict.

  >>> fmt_ms({'mean': 0.81234, 'std': 0.01, 'n': 3})
  '0.812 ± 0.010'
  >>> fmt_ms({'mean': 0.81234, 'std': 0.0, 'n': 1})  # one seed: no spread to report
  '0.812 (1 seed)'
  """
  if d is None:
    return "-"
  if d.get("n", 2) < 2:
    return f"{d['mean']:.{digits}f} (1 seed)"
  return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _cell_error(agg: dict[str, Any]) -> str:
  """The failed seeds' errors (raw text: ``markdown_table`` escapes the cell)."""
  errs = "; ".join(f"s{f['seed']}: {f['error']}" for f in agg["failed"])
  return errs[:300]


def _cell_note(agg: dict[str, Any]) -> str:
  """What a cell lacks: ``'failed: s1: ...; not run: s3, s4'`` ('' when every seed ran)."""
  parts = [f"failed: {_cell_error(agg)}"] if agg["failed"] else []
  if agg.get("not_run"):
    parts.append("not run: " + ", ".join(f"s{s}" for s in agg["not_run"]))
  return "; ".join(parts)


def _empty_cell(agg: dict[str, Any]) -> str:
  """A cell without a finished seed: 'not run' (no seed started) or its failures."""
  return "not run" if not agg["failed"] else _cell_note(agg)


def _label(m: str) -> str:
  return METHOD_LABELS.get(m, m)


def hardware() -> dict[str, Any]:
  """Processor, machine, CPU count, JAX devices and version of this process."""
  import jax
  from fedalign.hardware import cpu_name

  return {
      "processor": f"{cpu_name()} ({platform.machine()})",
      "machine": platform.machine(),
      "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__,
      "devices": str(jax.devices()),
      "python": platform.python_version(),
  }


def _pretrain_lines(p: dict[str, Any] | None) -> list[str]:
  """The header line about the pre-trained start (``fedalign.pretrain``), if any."""
  if not p:
    return ["- start: random initialisation (no pre-training)"]
  return [
      f"- start: the checkpoint `{p['dir']}` pre-trained once (seed {p['seed']}) by "
      f"`fedalign.pretrain` on {p['sources']} text ({p['documents']} documents, "
      f"{p['tokens_seen'] / 1e6:.1f}M tokens seen, {p['epochs']:.2f} epochs): held-out "
      f"next-token loss {p['validation_loss_before']:.3f} -> "
      f"{p['validation_loss_after']:.3f}, {p['wall_time_s']:.0f} s"
  ]


def _fmt_paired(d: dict[str, float]) -> str:
  """``+0.033 [-0.019, +0.086] (p=0.14, n=3)``; the interval is ``-`` for one seed."""
  ci = "[-]" if not math.isfinite(d["lo"]) else f"[{d['lo']:+.3f}, {d['hi']:+.3f}]"
  p = f"p={d['p']:.2g}, " if math.isfinite(d["p"]) else ""
  return f"{d['mean']:+.3f} {ci} ({p}n={d['n']})"


def _partition_text(res: dict[str, Any]) -> str:
  """'Dirichlet alphas: ...', or the partition (and task) when alpha has no effect."""
  d = res.get("data", {})
  task = "; task: next-token language modelling (data.task = 'lm')" if d.get("task") == "lm" else ""
  if d.get("partition", "dirichlet") == "dirichlet":
    return f"Dirichlet alphas: {', '.join(str(a) for a in res['alphas']) or '-'}{task}"
  per = d.get("classes_per_client")
  how = f", {per} label(s) per client" if d["partition"] == "pathological" and per else ""
  return (
      f"partition: {d['partition']}{how} (the α columns are the runner's entry key; alpha has "
      f"no effect){task}"
  )


def render_markdown(res: dict[str, Any]) -> str:
  """The results page (header, main table, ablation, convergence) from :func:`collect_results`."""
  info = res["run_info"]
  hw = info.get("hardware") or hardware()  # the machine that ran the entries
  target = res["target_accuracy"]
  lines = [
      "# FedAlign-MoE reproduction results",
      "",
      "Generated by `experiments/reproduce.py` from the entries' `summary.json` and "
      "`metrics.jsonl` (nothing typed in).",
      "",
      f"- command: `{info.get('command', '?')}`"
      + (
          f" (tables regenerated by `{info['tables_command']}`)"
          if info.get("tables_command")
          else ""
      ),
      f"- config file: `{info.get('config_file', '?')}`; overrides: "
      + (", ".join(f"`{o}`" for o in info.get("overrides", [])) or "none"),
      f"- methods: {', '.join(res['methods']) or '-'}; {_partition_text(res)}; seeds: "
      f"{', '.join(str(s) for s in res['seeds'])}"
      + ("; ablation rows at alpha = 0.1" if res["rows"] else ""),
      *_pretrain_lines(info.get("pretrain")),
      f"- hardware: {hw['processor']}, machine {hw['machine']}, {hw['cpu_count']} CPUs; "
      f"jax.devices() = {hw['devices']}; JAX {hw['jax_version']}, Python {hw['python']}",
      f"- wall time: {res['entries_wall_time_s']:.1f} s summed over the entries' "
      + (
          "`wall_time_s` (a resumed entry counts the segments whose rounds it kept)"
          if not res.get("entries_wall_time_restarted")
          else f"`wall_time_s` ({res['entries_wall_time_restarted']} entries written before "
          "summaries recorded `resumed_from_round`: if resumed, they count their last "
          "segment only)"
      )
      + (
          f"; last invocation {info['invocation_wall_time_s']:.1f} s"
          if "invocation_wall_time_s" in info
          else ""
      ),
      *(
          [
              "- shared runs (same effective config, so one run each: "
              "`experiments/reproduce.py: effective_config_key`): "
              + "; ".join(f"{k} = {v}" for k, v in res["shared_runs"].items())
          ]
          if res.get("shared_runs")
          else []
      ),
      "",
  ]

  # (a) the paper-style table
  if res["methods"]:
    lines += [
        "## Accuracy by method and heterogeneity",
        "",
        "Global test accuracy, mean ± std (ddof = 1) over seeds of each run's mean over "
        "its last 5 evaluated rounds (*last-5*) and of its final accuracy (*final*); "
        "*gain* = relative gain of the last-5 mean over FedAvg at the same alpha.",
        "",
    ]
    table = []
    for m in res["methods"]:
      row = [_label(m)]
      for a in res["alphas"]:
        agg = res["grid"][m][str(a)]
        if not agg["n_ok"]:
          row += [_empty_cell(agg), "-", "-"]
          continue
        note = f" (n={agg['n_ok']}; {_cell_note(agg)})" if _cell_note(agg) else ""
        gain = agg.get("gain_vs_fedavg")
        row += [
            fmt_ms(agg["last5"]) + note,
            fmt_ms(agg["final"]),
            "-" if gain is None or m == "fedavg" else f"{100 * gain:+.1f}%",
        ]
      table.append(row)
    lines += [markdown_table(_alpha_header(res["alphas"], ("last-5", "final", "gain")), table), ""]

  # (a') paired differences against FedAvg
  paired = [
      m
      for m in res["methods"]
      if any(res["grid"][m][str(a)].get("paired_vs_fedavg") for a in res["alphas"])
  ]
  if paired:
    lines += [
        "## Paired difference against FedAvg",
        "",
        "Per seed (same partition and initialisation), the method's accuracy minus FedAvg's; "
        "mean over the seeds with its 95% Student-t confidence interval and the paired "
        "t-test's p-value (n = number of seeds both finished).",
        "",
    ]
    table = []
    for m in paired:
      row = [_label(m)]
      for a in res["alphas"]:
        d = res["grid"][m][str(a)].get("paired_vs_fedavg")
        row += ["-", "-"] if d is None else [_fmt_paired(d["last5"]), _fmt_paired(d["final"])]
      table.append(row)
    header = _alpha_header(res["alphas"], ("Δ last-5 [95% CI] (p, n)", "Δ final [95% CI] (p, n)"))
    lines += [markdown_table(header, table), ""]

  # (a'') data.task = 'lm': the test NLL next to the next-token accuracy
  nll = [
      m for m in res["methods"] if any("final_nll" in res["grid"][m][str(a)] for a in res["alphas"])
  ]
  if nll:
    lines += [
        "## Test NLL (language modelling)",
        "",
        "`data.task = 'lm'`: the accuracy above is next-token top-1 accuracy; here the final "
        "test negative log-likelihood in nats per token (lower is better; perplexity = "
        "exp(NLL)), mean ± std over seeds, and the paired difference against FedAvg (negative: "
        "the method's NLL is lower).",
        "",
    ]
    table = []
    for m in nll:
      row = [_label(m)]
      for a in res["alphas"]:
        agg = res["grid"][m][str(a)]
        d = (agg.get("paired_vs_fedavg") or {}).get("final_nll")
        row += [
            fmt_ms(agg["final_nll"]) if "final_nll" in agg else "-",
            "-" if d is None else _fmt_paired(d),
        ]
      table.append(row)
    header = _alpha_header(res["alphas"], ("final NLL", "Δ final NLL [95% CI] (p, n)"))
    lines += [markdown_table(header, table), ""]

  # (b) the ablation
  if res["rows"]:
    lines += [
        "## Ablation (cumulative, alpha = 0.1)",
        "",
        "Rows of `configs/ablation.py` applied to the same base config; Δ = difference "
        "of the last-5 means; *paired*: per seed (same partition and initialisation), the "
        "row's last-5 mean minus the previous row's, over the seeds both finished.",
        "",
    ]
    table = []
    first = prev = None
    for r in res["rows"]:
      agg = res["ablation"][r]
      desc = ABLATION_DESCRIPTIONS.get(r, "")
      if not agg["n_ok"]:
        table.append([r, desc, _empty_cell(agg), "-", "-", "-", "-"])
        prev = None
        continue
      mean = agg["last5"]["mean"]
      first = mean if first is None and r == res["rows"][0] else first
      note = f" (n={agg['n_ok']}; {_cell_note(agg)})" if _cell_note(agg) else ""
      table.append(
          [
              r,
              desc,
              fmt_ms(agg["last5"]) + note,
              fmt_ms(agg["final"]),
              "-" if prev is None else f"{mean - prev:+.3f}",
              "-" if first is None or r == res["rows"][0] else f"{mean - first:+.3f}",
              "-" if not agg.get("paired_vs_previous") else _fmt_paired(agg["paired_vs_previous"]),
          ]
      )
      prev = mean
    header = [
        "row",
        "adds",
        "last-5",
        "final",
        "Δ vs previous row",
        "Δ vs direct averaging",
        "Δ vs previous row, paired [95% CI] (p, n)",
    ]
    lines += [markdown_table(header, table), ""]

  # (b') last-round diagnostics
  diag_rows = []
  for m in res["methods"]:
    for a in res["alphas"]:
      d = res["grid"][m][str(a)].get("last_diagnostics") or {}
      if not d:
        continue
      rng = d.get("perm_moved_range")
      diag_rows.append(
          [_label(m), str(a)]
          + [f"{d[k]:.4f}" if k in d else "-" for k in LAST_DIAGNOSTICS]
          + ["-" if rng is None else f"{rng[0]:.2f}-{rng[1]:.2f}"]
      )
  if diag_rows:
    lines += [
        "## Diagnostics at the last evaluated round",
        "",
        "Mean over the seeds of each run's last `metrics.jsonl` record; *experts moved* = range "
        "over MoE layers and seeds of the fraction of (client, expert) pairs that permutation "
        "alignment re-assigned in that round (`agg/<layer>/perm_moved_frac`).",
        "",
        markdown_table(["method", "alpha", *LAST_DIAGNOSTICS.values(), "experts moved"], diag_rows),
        "",
    ]

  # (c) convergence
  if res["methods"]:
    lines += [
        f"## Convergence (target accuracy {target})",
        "",
        "Rounds until the global test accuracy first reaches the target (mean over the "
        "seeds that reach it); stability = std of the accuracy over the last 5 "
        "evaluated rounds (mean over seeds); round time = mean seconds per evaluated round "
        "(local training + aggregation), round 1 (which compiles the round) left out.",
        "",
    ]
    table = []
    for m in res["methods"]:
      row = [_label(m)]
      for a in res["alphas"]:
        agg = res["grid"][m][str(a)]
        if not agg["n_ok"]:
          row += ["not run" if not agg["failed"] else "failed", "-", "-"]
          continue
        rt = agg["rounds_to_target"]
        if rt["reached"] == 0:
          cell = "not reached"
        else:
          cell = f"{rt['mean']:.1f}"
          if rt["reached"] < rt["n"]:
            cell += f" ({rt['reached']}/{rt['n']} seeds; others not reached)"
        row += [cell, f"{agg['stability']['mean']:.4f}", f"{agg['mean_round_time_s']:.2f}"]
      table.append(row)
    columns = (f"rounds to {target}", "stability", "s/round")
    lines += [markdown_table(_alpha_header(res["alphas"], columns), table), ""]
    # The paper's convergence claim: FedAlign-MoE needs 1.3x / 1.7x fewer rounds than FedMoE.
    for a in res["alphas"]:
      r = {
          m: res["grid"].get(m, {}).get(str(a), {}).get("rounds_to_target")
          for m in ("fedmoe", "fedalign")
      }
      if all(x and x["reached"] for x in r.values()):
        lines.append(
            f"- alpha = {a}: FedMoE / FedAlign-MoE rounds to {target} = "
            f"{r['fedmoe']['mean'] / r['fedalign']['mean']:.2f}x (means over the seeds that "
            f"reached it: {r['fedmoe']['reached']}/{r['fedmoe']['n']} and "
            f"{r['fedalign']['reached']}/{r['fedalign']['n']})"
        )
    lines.append("")
  return "\n".join(lines)


def write_report(
    workdir: str | os.PathLike,
    *,
    target_accuracy: float | None = None,
    docs_out: str | os.PathLike | None = None,
) -> dict[str, Any]:
  """(Re)writes ``results.md``, ``results.json`` and ``plots/`` of a grid directory from its
  entries' files (and ``docs_out`` with a copy of the plots). Returns
  ``{'markdown', 'results', 'plots', 'plot_notes'}``."""
  workdir = pathlib.Path(workdir)
  res = collect_results(workdir, target_accuracy)
  plan = json.loads((workdir / "grid.json").read_text())
  entries = [Entry(**e) for e in plan["entries"]]
  groups: dict[str, dict[str, list[str]]] = {}
  for e in entries:
    title = f"alpha={e.alpha}" if e.group == "grid" else f"ablation, alpha={e.alpha}"
    label = _label(e.label) if e.group == "grid" else e.label
    groups.setdefault(title, {}).setdefault(label, []).append(e.name)
  written, notes = plots_lib.make_grid_plots(workdir, groups)
  md = render_markdown(res)

  def plot_section(prefix: str) -> str:
    out = ["", "## Plots", ""]
    out += [f"![{p.stem}]({prefix}{p.name})" for p in written]
    out += [f"- skipped: {n}" for n in notes]
    return "\n".join(out) + "\n"

  (workdir / "results.md").write_text(md + plot_section("plots/"))
  write_json(workdir / "results.json", res)
  if docs_out:
    docs_out = pathlib.Path(docs_out)
    docs_out.parent.mkdir(parents=True, exist_ok=True)
    plot_dir = docs_out.parent / f"{docs_out.stem}_plots"
    if written:
      plot_dir.mkdir(exist_ok=True)
      for p in written:
        shutil.copy2(p, plot_dir / p.name)
    key = docs_key("experiments/reproduce.py", workdir)
    write_generated_block(docs_out, key, md + plot_section(f"{plot_dir.name}/"))
  return {"markdown": md, "results": res, "plots": written, "plot_notes": notes}


# ----------------------------------------------------------------------------- CLI
def _define_flags():
  from absl import flags
  from fedalign.config_files import define_config_flag

  define_config_flag("config", "Path to a get_config() file.")
  flags.DEFINE_string("workdir", None, "Grid directory (one sub-directory per entry).")
  flags.DEFINE_list(
      "methods",
      list(DEFAULT_METHODS),
      f"Methods: config.method values or {sorted(METHOD_VARIANTS)}.",
  )
  flags.DEFINE_list("alphas", ["1.0", "0.1"], "Dirichlet concentrations.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
  flags.DEFINE_bool("ablation", False, "Also run the rows of configs/ablation.py at alpha=0.1.")
  flags.DEFINE_list("ablation_rows", [], "With --ablation: only these rows (default: all).")
  flags.DEFINE_float("target_accuracy", 0.6, "Accuracy for the rounds-to-target table.")
  flags.DEFINE_string("docs_out", None, "Also write the tables here (e.g. docs/results.md).")
  flags.DEFINE_bool("tables_only", False, "Only rewrite the tables and plots.")
  flags.DEFINE_bool("compilation_cache", True, "Persist compiled programs in WORKDIR/.jax_cache.")
  flags.DEFINE_bool(
      "tiny",
      False,
      "Smoke-test size: apply TINY_OVERRIDES (fields not given "
      "as --config.* flags) on top of --config.",
  )
  return flags.FLAGS


def main(argv: list[str]) -> None:
  from absl import app, flags
  from ml_collections import config_flags
  from fedalign.algorithms import METHODS

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  FLAGS = flags.FLAGS
  unknown = [m for m in FLAGS.methods if m not in METHODS and m not in METHOD_VARIANTS]
  if unknown:
    raise app.UsageError(
        f"--methods: unknown {unknown}; expected config.method values "
        f"{METHODS} or {sorted(METHOD_VARIANTS)}"
    )
  try:
    alphas = [float(a) for a in FLAGS.alphas]
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(f"--alphas/--seeds: {e}") from e
  try:
    plan = make_plan(FLAGS.methods, alphas, seeds, FLAGS.ablation, FLAGS.ablation_rows)
  except ValueError as e:
    raise app.UsageError(f"--ablation_rows: {e}") from e
  base = FLAGS.config
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  if FLAGS.tiny:
    given = set(config_flags.get_override_values(FLAGS["config"]))
    apply_overrides(base, {k: v for k, v in TINY_OVERRIDES.items() if k not in given})
    overrides.append(
        "--tiny: " + ", ".join(f"{k}={v}" for k, v in TINY_OVERRIDES.items() if k not in given)
    )
  run_info = {
      "command": shlex.join(["python", "-m", "experiments.reproduce", *sys.argv[1:]]),
      "config_file": config_flags.get_config_filename(FLAGS["config"]),
      "overrides": overrides,
  }
  if FLAGS.compilation_cache:  # entries of equal shapes reuse compiled rounds across runs
    from fedalign.compilation import enable_compilation_cache

    enable_compilation_cache(pathlib.Path(FLAGS.workdir).resolve() / ".jax_cache")
  out = run_grid(
      base,
      plan,
      FLAGS.workdir,
      target_accuracy=FLAGS.target_accuracy,
      run_info=run_info,
      docs_out=FLAGS.docs_out,
      tables_only=FLAGS.tables_only,
  )
  print(out["markdown"])
  failed = [s for s in out["statuses"] if s["status"] == "failed"]
  if failed:
    print(
        f"{len(failed)} entr{'y' if len(failed) == 1 else 'ies'} failed: "
        + ", ".join(s["name"] for s in failed),
        file=sys.stderr,
    )
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags as _flags

  _define_flags()
  _flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
