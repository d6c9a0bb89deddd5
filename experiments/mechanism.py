"""The mechanism benchmark (issue 13): router/expert misalignment with ground-truth roles.

Command (from the repository root; 11 minutes on 2 CPU cores for a fresh workdir, the
learning-rate choice included; up to ~25 minutes with other jobs on the cores)::

    python -m experiments.mechanism --workdir=experiments/results/mechanism \\
        [--seeds=0,1,2,3,4] [--settings=a10,a50,a200,b_drift,c_permuted,d_partial] \\
        [--variants=fedavg,fedprox,...] [--tiny] [--docs_out=docs/results_mechanism.md] \\
        [--tune | --lr=LR] [--tables_only] [--compare=OTHER_WORKDIR]

Setting (:mod:`fedalign.synthetic`): a teacher with K = 8 Gaussian clusters in D = 16 dims,
each cluster with its own linear map to 4 classes; a student MoE (2 residual MoE blocks,
E = 8 experts, top-1, fedalign's parameter layout) pre-trained centrally until each expert
serves one cluster (with a small router-supervision term; the cluster x expert mutual
information is recorded against log K). The federated phase fine-tunes on shifted targets
(every cluster's map moved by ``SHIFT`` * N(0, 1)) over 10 clients whose cluster mixtures are
Dirichlet(0.1), with fedalign's engine (:func:`fedalign.algorithms.make_algorithm`,
:func:`fedalign.federated.client.make_client_update`, :func:`fedalign.federated.round.
make_round_fn`, :func:`fedalign.federated.round.init_server_state`); nothing of a method is
re-implemented here.

Settings (:data:`SETTINGS`): ``a10`` / ``a50`` / ``a200``: the usual protocol with 10 / 50 /
200 local steps; ``b_drift``: 10x the client learning rate, 50 steps; ``c_permuted``: in round
1 each client starts from its own random expert permutation of the global model (as when
merging independently fine-tuned checkpoints; the client update is wrapped so that its delta
is taken against the unpermuted global model); ``d_partial``: 3 of 10 clients per round.

Methods (:data:`VARIANTS`): a dict name -> dotted config overrides of ``configs/default.py``.
A variant whose key the config does not have (an option not merged yet) is skipped with a
printed note.

Every (setting, variant, seed) writes ``WORKDIR/runs/{setting}__{variant}__s{seed}.json``;
finished files are skipped (resumable). ``WORKDIR/results.md`` (and ``--docs_out``) is built
from the run files only. ``--tune`` picks the client learning rate on the validation seeds
(:data:`VALIDATION_SEEDS`) with FedAvg in ``a50`` and writes ``WORKDIR/tuning.json``, which
later runs read; a workdir without it is tuned first unless ``--lr`` fixes the rate; test
seeds are never used for a choice. In ``--docs_out`` the tables go
into this workdir's generated block (:func:`fedalign.reports.write_generated_block`); the
hand-written reading around it is kept when the tables are rewritten.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import pathlib
import shlex
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedalign import synthetic as syn
from fedalign.aggregation.permutation import permute_params
from fedalign.algorithms import make_algorithm
from fedalign.config_files import load_config
from fedalign.federated.client import client_optimizer, make_client_update
from fedalign.federated.round import client_rngs, init_server_state, make_round_fn
from fedalign.hardware import describe
from fedalign.metrics.routing_metrics import expert_role_preservation
from fedalign.models.lora import partition
from fedalign.models.routing import finalize_stats
from fedalign.reports import docs_key, markdown_table, read_json, write_generated_block, write_json

PyTree = Any

TEST_SEEDS = (0, 1, 2, 3, 4)
VALIDATION_SEEDS = (100, 101, 102)
LR_GRID = (3e-4, 1e-3, 3e-3)


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Fixed choices of the benchmark (the learning rate may come from ``--tune``)."""

  num_clusters: int = 8
  dim: int = 16
  num_classes: int = 4
  num_experts: int = 8
  hidden: int = 32
  num_layers: int = 2
  num_clients: int = 10
  alpha: float = 0.1
  shift: float = 0.7  # federated targets = pre-training maps + shift * N(0, 1)
  pretrain_steps: int = 1500
  router_supervision: float = 0.1
  rounds: int = 8
  batch_size: int = 32
  learning_rate: float = 1e-3
  load_balance_coef: float = 0.01
  min_client_size: int = 64
  max_client_size: int = 512
  test_per_cluster: int = 200

  @property
  def student(self) -> syn.StudentConfig:
    return syn.StudentConfig(
        self.dim, self.num_experts, self.hidden, self.num_layers, self.num_classes, 1
    )


TINY = dict(pretrain_steps=300, rounds=2, test_per_cluster=40, max_client_size=128)

SETTINGS: dict[str, dict[str, Any]] = {
    "a10": dict(local_steps=10),
    "a50": dict(local_steps=50),
    "a200": dict(local_steps=200),
    "b_drift": dict(local_steps=50, lr_scale=10.0),
    "c_permuted": dict(local_steps=50, permuted=True),
    "d_partial": dict(local_steps=50, clients_per_round=3),
}

VARIANTS: dict[str, dict[str, Any]] = {
    "fedavg": {"method": "fedavg"},
    "fedprox": {"method": "fedprox"},
    "fedmoe": {"method": "fedmoe"},
    "fedalign": {"method": "fedalign"},
    "fedalign_router_only": {"method": "fedalign", "fedalign.semantic_selection": False},
    "fedalign_perm": {"method": "fedalign", "fedalign.permutation_alignment": True},
    "fedavg_plus_reg": {
        "method": "fedalign",
        "fedalign.router_weighting": "uniform",
        "fedalign.semantic_selection": False,
    },
    "fedalign_conditional": {"method": "fedalign", "fedalign.regularizer_form": "conditional"},
    "fedalign_bhattacharyya": {"method": "fedalign", "fedalign.router_overlap": "bhattacharyya"},
    "fedalign_perm_margin": {
        "method": "fedalign",
        "fedalign.permutation_alignment": True,
        "fedalign.alignment_margin": 0.05,
    },
    "fedavg_plus_conditional": {
        "method": "fedalign",
        "fedalign.router_weighting": "uniform",
        "fedalign.semantic_selection": False,
        "fedalign.regularizer_form": "conditional",
    },
    "fedalign_conditional_bhattacharyya": {
        "method": "fedalign",
        "fedalign.regularizer_form": "conditional",
        "fedalign.router_overlap": "bhattacharyya",
    },
}


# ============================================================================================
# Configs.
# ============================================================================================


def variant_config(
    overrides: dict[str, Any], hp: Hyper, lr: float
) -> ml_collections.ConfigDict | None:
  """``configs/default.py:paper`` (FedAlign-MoE's options at the paper's literal reading, so a
  variant names every departure from it) with the variant's overrides and the benchmark's
  training fields; None when an override's key does not exist in the config.

  >>> variant_config({'method': 'fedprox'}, Hyper(), 1e-3).fedprox.mu
  0.01
  >>> variant_config({'fedalign.no_such_option': 1}, Hyper(), 1e-3) is None
  True
  """
  c = load_config("configs/default.py:base,paper")
  c.train.learning_rate = lr
  c.train.optimizer = "adamw"
  c.train.load_balance_coef = hp.load_balance_coef
  c.train.z_loss_coef = 0.0
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      if p not in node:
        return None
      node = node[p]
    if leaf not in node:
      return None
    node[leaf] = value
  return c


# ============================================================================================
# One run.
# ============================================================================================


def permuted_start(client_update: Callable, paths: Sequence[str]) -> Callable:
  """Wraps the engine's client update: the client starts from the global model with its
  experts permuted by ``batches['perm']`` ((L, E), one row per MoE block; identity = the usual
  protocol) and reports its delta against the unpermuted global model, with routing
  statistics in its own expert order (as an independently fine-tuned copy would)."""

  def update(global_trainable, frozen, batches, broadcast, client_state, rng):
    perm = batches["perm"]
    rest = {k: v for k, v in batches.items() if k != "perm"}
    start = permute_params(global_trainable, {p: perm[i] for i, p in enumerate(paths)})
    delta, stats, metrics, new_state = client_update(
        start, frozen, rest, broadcast, client_state, rng
    )
    delta = jax.tree.map(lambda s, d, g: (s + d) - g, start, delta, global_trainable)
    return delta, stats, metrics, new_state

  return update


@dataclasses.dataclass
class Engine:
  """The jitted round and the client update of one (variant, learning rate)."""

  algorithm: Any
  round_fn: Callable
  local_fn: Callable
  mask: PyTree


_ENGINES: dict[tuple, Engine] = {}


def get_engine(
    variant: str, config: ml_collections.ConfigDict, hp: Hyper, params: PyTree
) -> Engine:
  """Built once per (variant, lr, hyper) and reused across seeds and settings (same shapes:
  one compilation)."""
  key = (variant, float(config.train.learning_rate), hp)
  if key not in _ENGINES:
    mask = jax.tree.map(lambda _: True, params)
    trainable, _ = partition(params, mask)
    alg = make_algorithm(config, trainable, hp.num_clients)
    cu = make_client_update(
        syn.MixtureTask(hp.student),
        alg,
        client_optimizer(config),
        load_balance_coef=config.train.load_balance_coef,
        z_loss_coef=config.train.z_loss_coef,
    )
    wrapped = permuted_start(cu, syn.block_paths(hp.student))
    # seed=0: the task uses no randomness, so the client rngs do not matter.
    round_fn = jax.jit(make_round_fn(wrapped, alg, mask, seed=0))
    local_fn = jax.jit(jax.vmap(wrapped, in_axes=(None, None, 0, None, 0, 0)))
    _ENGINES[key] = Engine(alg, round_fn, local_fn, mask)
  return _ENGINES[key]


@functools.lru_cache(maxsize=8)
def pretrained(seed: int, hp: Hyper) -> tuple[PyTree, dict[str, Any]]:
  """The seed's pre-trained student and its diagnostics (cached per process)."""
  teacher = syn.Teacher.create(seed, hp.num_clusters, hp.dim, hp.num_classes)
  params = syn.pretrain(
      hp.student, teacher, seed, steps=hp.pretrain_steps, router_supervision=hp.router_supervision
  )
  x, y, k = teacher.balanced(np.random.default_rng([seed, 21]), hp.test_per_cluster)
  table = syn.routing_table(params, hp.student, x, k, hp.num_clusters)
  info = {
      "pretrain_accuracy": syn.accuracy(params, hp.student, x, y),
      "mi": syn.cluster_expert_mi(table),
      "mi_max": math.log(hp.num_clusters),
      "roles": syn.expert_roles(table).tolist(),
  }
  return params, info


def client_data(seed: int, hp: Hyper, teacher: syn.Teacher):
  """Per-client local datasets: sizes, (x, y) arrays and cluster mixtures."""
  mix = syn.dirichlet_mixtures(seed, hp.num_clients, hp.num_clusters, hp.alpha)
  rng = np.random.default_rng([seed, 13])
  sizes = rng.integers(hp.min_client_size, hp.max_client_size + 1, size=hp.num_clients)
  data = [teacher.sample(rng, int(n), mix[i]) for i, n in enumerate(sizes)]
  return sizes, data, mix


def round_batches(
    seed: int, r: int, hp: Hyper, data, ids: np.ndarray, steps: int, max_steps: int, perms
) -> dict[str, np.ndarray]:
  """(rows, max_steps, B, ...) batches of the round's clients; steps beyond ``steps`` are
  padding (step_mask 0, skipped by the engine's dynamic trip count). ``ids`` < 0 = padding
  rows (no real step)."""
  rows = len(ids)
  rng = np.random.default_rng([seed, 17, r])
  x = np.zeros((rows, max_steps, hp.batch_size, hp.dim), np.float32)
  y = np.zeros((rows, max_steps, hp.batch_size), np.int32)
  mask = np.zeros((rows, max_steps), bool)
  for row, cid in enumerate(ids):
    if cid < 0:
      continue
    cx, cy, _ = data[cid]
    idx = rng.integers(0, len(cy), size=(steps, hp.batch_size))
    x[row, :steps], y[row, :steps] = cx[idx], cy[idx]
    mask[row, :steps] = True
  return {"x": x, "y": y, "step_mask": mask, "perm": perms}


def run_one(
    setting: str, variant: str, seed: int, hp: Hyper, max_steps: int
) -> dict[str, Any] | None:
  """One federated run; returns its record (None when the variant is not available)."""
  st = SETTINGS[setting]
  lr = hp.learning_rate * st.get("lr_scale", 1.0)
  config = variant_config(VARIANTS[variant], hp, lr)
  if config is None:
    return None
  config.seed = seed
  t0 = time.time()
  cfg = hp.student
  params0, info = pretrained(seed, hp)
  roles = np.asarray(info["roles"])
  teacher = syn.Teacher.create(seed, hp.num_clusters, hp.dim, hp.num_classes)
  fed_teacher = teacher.shifted(seed, hp.shift)
  sizes, data, mix = client_data(seed, hp, fed_teacher)
  xt, yt, kt = fed_teacher.balanced(np.random.default_rng([seed, 23]), hp.test_per_cluster)
  xt_j = jnp.asarray(xt)
  eng = get_engine(variant, config, hp, params0)
  state = init_server_state(params0, eng.algorithm, eng.mask, hp.num_clients)
  n, e, num_layers = hp.num_clients, hp.num_experts, hp.num_layers
  per_round = st.get("clients_per_round", n)
  ident = np.broadcast_to(np.arange(e, dtype=np.int32), (n, num_layers, e)).copy()
  prng = np.random.default_rng([seed, 29])
  start_perms = np.stack(
      [np.stack([prng.permutation(e) for _ in range(num_layers)]) for _ in range(n)]
  ).astype(np.int32)
  start_acc = syn.accuracy(params0, cfg, xt_j, yt)
  curve = []
  for r in range(hp.rounds):
    srng = np.random.default_rng([seed, 31, r])
    chosen = np.sort(srng.choice(n, size=per_round, replace=False))
    ids = np.full((n,), -1)
    ids[:per_round] = chosen
    perms = start_perms if (st.get("permuted") and r == 0) else ident
    b = round_batches(seed, r, hp, data, ids, st["local_steps"], max_steps, perms)
    weights = np.where(ids >= 0, sizes[np.maximum(ids, 0)], 0).astype(np.float32)
    ids_j = jnp.asarray(np.where(ids >= 0, ids, chosen[0]), jnp.int32)
    prev = state
    state, out = eng.round_fn(state, b, jnp.asarray(weights), ids_j, r)
    curve.append(syn.accuracy(state["params"], cfg, xt_j, yt))
  # Diagnostics of the last round: the clients' local models (same inputs and rngs as the
  # round just run) and their routing statistics.
  bcast = eng.algorithm.broadcast(prev["agg"])
  cs = jnp.zeros((n,), jnp.float32)
  trainable, frozen = partition(prev["params"], eng.mask)
  deltas, _, _, _ = eng.local_fn(trainable, frozen, b, bcast, cs, client_rngs(0, r, ids_j))
  part = ids >= 0
  local = jax.tree.map(lambda g, d: (g[None] + d)[part], trainable, deltas)
  disagreement = syn.routing_disagreement(local, cfg, xt_j)
  roles_pres = []
  for path in syn.block_paths(cfg):
    fs = finalize_stats(out["routing_stats"][path])
    roles_pres.append(float(expert_role_preservation(fs["mu"], fs["c"])))
  final = state["params"]
  table = syn.routing_table(final, cfg, xt_j, kt, hp.num_clusters)
  return {
      "setting": setting,
      "variant": variant,
      "seed": seed,
      "overrides": VARIANTS[variant],
      "setting_spec": st,
      "learning_rate": lr,
      "hyper": dataclasses.asdict(hp),
      "pretrain": info,
      "start_accuracy": start_acc,
      "accuracy": curve[-1],
      "accuracy_curve": curve,
      "routing_accuracy": syn.routing_accuracy(final, cfg, xt_j, kt, roles),
      "role_map_preserved": float(np.mean(syn.expert_roles(table) == roles)),
      "mi": syn.cluster_expert_mi(table),
      "disagreement": disagreement,
      "role_preservation": float(np.mean(roles_pres)),
      "client_mixtures": np.round(mix, 3).tolist(),
      "excluded": int(np.sum(np.asarray(out["excluded"]) & part)),
      "seconds": time.time() - t0,
      # float32 results move with the JAX version and the CPU (docs/results_mechanism.md)
      "environment": {k: v for k, v in describe().items() if k in ("cpu", "jax", "backend")},
  }


def run_file(workdir: pathlib.Path, setting: str, variant: str, seed: int) -> pathlib.Path:
  return workdir / "runs" / f"{setting}__{variant}__s{seed}.json"


def run_all(
    workdir: str | pathlib.Path,
    seeds: Sequence[int],
    settings: Sequence[str],
    variants: Sequence[str],
    hp: Hyper,
) -> list[pathlib.Path]:
  """Runs every missing (setting, variant, seed); returns the run files that exist."""
  workdir = pathlib.Path(workdir)
  max_steps = max(SETTINGS[s]["local_steps"] for s in settings)
  avail = []
  for v in variants:
    if variant_config(VARIANTS[v], hp, hp.learning_rate) is None:
      print(f"note: variant {v!r} skipped: the config lacks a key of {VARIANTS[v]}", flush=True)
    else:
      avail.append(v)
  files = []
  for seed in seeds:
    for s in settings:
      for v in avail:
        path = run_file(workdir, s, v, seed)
        if not path.exists():
          rec = run_one(s, v, seed, hp, max_steps)
          write_json(path, rec)
          print(
              f"{s:>11} {v:>24} s{seed}: acc {rec['accuracy']:.3f} route "
              f"{rec['routing_accuracy']:.3f} dis {rec['disagreement']:.3f} "
              f"({rec['seconds']:.1f}s)",
              flush=True,
          )
        files.append(path)
  return files


def tune(workdir: str | pathlib.Path, hp: Hyper) -> dict[str, Any]:
  """Client learning rate by FedAvg's mean final accuracy in ``a50`` on the validation seeds."""
  workdir = pathlib.Path(workdir)
  scores = {}
  for lr in LR_GRID:
    h = dataclasses.replace(hp, learning_rate=lr)
    accs = [run_one("a50", "fedavg", s, h, 50)["accuracy"] for s in VALIDATION_SEEDS]
    scores[str(lr)] = float(np.mean(accs))
    print(f"tune lr {lr}: fedavg a50 accuracy {scores[str(lr)]:.4f}", flush=True)
  best = float(max(LR_GRID, key=lambda lr: scores[str(lr)]))
  out = {
      "learning_rate": best,
      "scores": scores,
      "seeds": list(VALIDATION_SEEDS),
      "rule": "FedAvg, setting a50, mean final accuracy",
  }
  write_json(workdir / "tuning.json", out)
  return out


# ============================================================================================
# Report.
# ============================================================================================


def paired_interval(diffs: Sequence[float]) -> tuple[float, float, float]:
  """Mean and 95% t-interval of paired differences (nan interval for one value).

  >>> [round(v, 3) for v in paired_interval([1.0, 2.0, 3.0])]
  [2.0, -0.484, 4.484]
  """
  from scipy import stats

  d = np.asarray(diffs, float)
  m = float(d.mean())
  if len(d) < 2:
    return m, float("nan"), float("nan")
  half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
  return m, m - half, m + half


def compare_runs(a: str | pathlib.Path, b: str | pathlib.Path) -> dict[str, Any]:
  """How the final accuracies of two workdirs' run files (same setting, variant and seed)
  differ: matched, identical, median and max absolute difference, max per setting.

  >>> import tempfile, json
  >>> d = [pathlib.Path(tempfile.mkdtemp()) for _ in range(2)]
  >>> for root, acc in zip(d, (0.5, 0.75)):
  ...   (root / "runs").mkdir()
  ...   _ = (root / "runs" / "a10__fedavg__s0.json").write_text(json.dumps(
  ...       {"setting": "a10", "variant": "fedavg", "seed": 0, "accuracy": acc}))
  >>> compare_runs(*d)["max_abs_diff"]
  0.25
  """

  def accs(root):
    out = {}
    for path in sorted((pathlib.Path(root) / "runs").glob("*.json")):
      r = read_json(path)
      out[(r["setting"], r["variant"], r["seed"])] = float(r["accuracy"])
    return out

  x, y = accs(a), accs(b)
  keys = sorted(set(x) & set(y))
  diffs = np.array([abs(x[k] - y[k]) for k in keys])
  per_setting = collections.defaultdict(float)
  for k, dv in zip(keys, diffs):
    per_setting[k[0]] = max(per_setting[k[0]], float(dv))
  return {
      "matched": len(keys),
      "identical": int(np.sum(diffs == 0)),
      "median_abs_diff": float(np.median(diffs)) if keys else float("nan"),
      "max_abs_diff": float(np.max(diffs)) if keys else float("nan"),
      "max_abs_diff_by_setting": dict(per_setting),
  }


def _environments(recs: list[dict[str, Any]]) -> collections.Counter:
  """How many run files were made with each JAX version and CPU ('not recorded' before the
  run files kept it)."""
  env = lambda e: f"JAX {e['jax']}, {e['cpu']}" if e else "not recorded"
  return collections.Counter(env(r.get("environment")) for r in recs)


def render(workdir: str | pathlib.Path, command: str = "", note: str = "") -> str:
  """The results markdown from the run files under ``workdir/runs``."""
  workdir = pathlib.Path(workdir)
  recs = [read_json(p) for p in sorted((workdir / "runs").glob("*.json"))]
  if not recs:
    return "no runs\n"
  tuning = workdir / "tuning.json"
  seeds = sorted({r["seed"] for r in recs})
  hp = recs[0]["hyper"]
  pre = {r["seed"]: r["pretrain"] for r in recs}
  lines = [
      "# Mechanism benchmark (issue 13): runs and tables",
      "",
      f"Command: `{command}`{note}" if command else "",
      "",
      f"The tables read every run file in `{workdir.name}/runs` ({len(recs)}), including those "
      "of earlier commands in this workdir.",
      "",
      f"Seeds: {seeds} (same seed = same teacher, client partition, pre-trained student and "
      "client batches for every variant: differences are paired).",
      f"Hyper-parameters: `{hp}`.",
      "Environments (run files): "
      + "; ".join(f"{n} x {env}" for env, n in sorted(_environments(recs).items()))
      + ".",
  ]
  if tuning.exists():
    t = read_json(tuning)
    lines.append(
        f"Client learning rate {t['learning_rate']} chosen on validation seeds {t['seeds']} "
        f"({t['rule']}; scores {t['scores']}); drift setting b uses 10x."
    )
  lines += [
      "Pre-trained students: cluster x expert mutual information "
      + ", ".join(f"s{s}: {p['mi']:.3f}" for s, p in sorted(pre.items()))
      + f" (max log K = {math.log(hp['num_clusters']):.3f}); pre-training accuracy "
      + ", ".join(f"{p['pretrain_accuracy']:.3f}" for _, p in sorted(pre.items()))
      + ".",
      "",
      "Columns: acc = final global test accuracy (balanced over clusters, shifted targets); "
      "d vs FedAvg = paired mean difference with a 95% t-interval over seeds; route = fraction "
      "of (token, block) the global router sends to the expert that served its cluster after "
      "pre-training; map = fraction of (block, cluster) whose majority expert is still that "
      "expert; disagree = fraction of (token, block, client pair) that two clients' local "
      "models of the last round route to different experts; roles = expert_role_preservation "
      "of the last round's client centroids (mean over blocks); MI = cluster x expert MI of the "
      "global model (nats).",
      "",
  ]
  settings = [s for s in SETTINGS if any(r["setting"] == s for r in recs)]
  for s in settings:
    rs = [r for r in recs if r["setting"] == s]
    lines += [f"## Setting {s}: `{SETTINGS[s]}`", ""]
    base = {r["seed"]: r["accuracy"] for r in rs if r["variant"] == "fedavg"}
    start = np.mean([r["start_accuracy"] for r in rs])
    lines.append(f"Accuracy of the pre-trained student on the shifted targets: {start:.3f}.")
    lines.append("")
    rows = []
    for v in VARIANTS:
      vr = [r for r in rs if r["variant"] == v]
      if not vr:
        continue
      mean = lambda k: float(np.mean([r[k] for r in vr]))
      paired = [r["accuracy"] - base[r["seed"]] for r in vr if r["seed"] in base]
      if v == "fedavg" or not paired:
        diff = "-"
      else:
        m, lo, hi = paired_interval(paired)
        ci = f"[{lo:+.4f}, {hi:+.4f}]" if np.isfinite(lo) else "[-]"  # one seed: no interval
        diff = f"{m:+.4f} {ci}"
      rows.append(
          [
              v,
              len(vr),
              mean("accuracy"),
              diff,
              mean("routing_accuracy"),
              mean("role_map_preserved"),
              mean("disagreement"),
              mean("role_preservation"),
              mean("mi"),
          ]
      )
    lines.append(
        markdown_table(
            [
                "variant",
                "seeds",
                "acc",
                "d vs FedAvg [95% CI]",
                "route",
                "map",
                "disagree",
                "roles",
                "MI",
            ],
            rows,
            digits=4,
        )
    )
    lines.append("")
  lines += ["## Variants (config overrides of configs/default.py:paper)", ""]
  lines.append(markdown_table(["variant", "overrides"], [[k, str(v)] for k, v in VARIANTS.items()]))
  lines.append("")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--seeds", default=",".join(map(str, TEST_SEEDS)))
  ap.add_argument("--settings", default=",".join(SETTINGS))
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--tiny", action="store_true", help="tiny sizes (tests)")
  ap.add_argument(
      "--tune",
      action="store_true",
      help="choose the lr on validation seeds (done anyway when the workdir has no tuning.json "
      "and --lr is not given)",
  )
  ap.add_argument("--lr", type=float, default=None, help="a fixed client lr instead of tuning")
  ap.add_argument("--tables_only", action="store_true")
  ap.add_argument("--docs_out", default="")
  ap.add_argument(
      "--compare",
      default="",
      help="another workdir: print how its runs' final accuracies differ from this one's",
  )
  args = ap.parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  hp = Hyper(**TINY) if args.tiny else Hyper()
  tuned = workdir / "tuning.json"
  if args.lr is not None:
    if not (math.isfinite(args.lr) and args.lr > 0):
      raise SystemExit(f"--lr={args.lr} is invalid: expected a client learning rate > 0")
    if args.tune or tuned.exists():
      raise SystemExit(
          f"--lr={args.lr} fixes the client learning rate, but "
          + ("--tune asks to choose it" if args.tune else f"{tuned} holds a chosen one")
          + ": drop --lr, or use another workdir"
      )
    hp = dataclasses.replace(hp, learning_rate=args.lr)
  elif tuned.exists():
    hp = dataclasses.replace(hp, learning_rate=read_json(tuned)["learning_rate"])
  elif not args.tables_only and not args.tune:
    # the published tables use the lr chosen on the validation seeds: a fresh workdir
    # chooses it first, so that the plain command reproduces them
    print(f"no {tuned}: choosing the client learning rate first (--tune)", flush=True)
    args.tune = True
  if args.tune:
    t = tune(workdir, hp)
    hp = dataclasses.replace(hp, learning_rate=t["learning_rate"])
  if not args.tables_only:
    seeds = [int(s) for s in args.seeds.split(",") if s]
    settings = [s for s in args.settings.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    for name, known in (("setting", SETTINGS), ("variant", VARIANTS)):
      bad = [x for x in (settings if name == "setting" else variants) if x not in known]
      if bad:
        raise SystemExit(f"unknown {name}s {bad}; known: {list(known)}")
    run_all(workdir, seeds, settings, variants, hp)
  command = "python -m experiments.mechanism " + " ".join(
      shlex.quote(a) for a in (argv or sys.argv[1:])
  )
  cmd_file, note = workdir / "command.txt", ""
  if args.tables_only and cmd_file.exists():
    command = cmd_file.read_text().strip()
    note = " (tables rewritten with `--tables_only`)"
  elif not args.tables_only:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd_file.write_text(command + "\n")
  md = render(workdir, command, note)
  (workdir / "results.md").write_text(md)
  if args.docs_out:
    write_generated_block(args.docs_out, docs_key("experiments/mechanism.py", workdir), md)
  print(f"wrote {workdir / 'results.md'}")
  if args.compare:
    cmp = compare_runs(workdir, args.compare)
    print(
        f"against {args.compare}: {cmp['identical']} of {cmp['matched']} runs identical; "
        f"final accuracy differs by a median of {cmp['median_abs_diff']:.4f}, at most "
        f"{cmp['max_abs_diff']:.4f}; max by setting "
        + ", ".join(f"{k} {v:.4f}" for k, v in sorted(cmp["max_abs_diff_by_setting"].items())),
        flush=True,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
