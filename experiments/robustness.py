"""The robustness table (issue 15): attacks x defences x attack fractions x alpha x seeds.

Command (from the repository root)::

    python -m experiments.robustness --config=configs/default.py:runlocal \\
        --workdir=experiments/results/robustness [--seeds=0,1,2] [--alphas=0.1,1.0] \\
        [--fractions=0,0.1,0.2,0.3] [--attacks=sign_flip,scale,gaussian,label_flip,routing_inflation] \\
        [--defences=none,norm_bound,median,trimmed_mean,krum] [--methods=fedavg,fedalign] \\
        [--set=field=value ...: e.g. --set=train.rounds=N] [--docs_out=docs/robustness.md] [--tables_only]

Every cell (method, defence, attack, fraction, alpha, seed) is the config file's config with
``method``, ``server.robust`` (and ``server.robust_stats=True`` for every defence but 'none':
the statistics defence is part of each defended row), ``attack.kind`` / ``attack.fraction``,
``data.alpha`` and ``seed`` set; fraction 0 is run once per (method, defence, alpha, seed) as
the clean reference. FedAvg x ``routing_inflation`` is not run: FedAvg reads no routing
statistics, so the attack leaves its round unchanged (tests/test_robust.py checks it bit for
bit) and its table row reads the clean run's accuracy, marked "= clean". It trains ``train.rounds`` rounds with fedalign's engine and evaluates
the final global model on the test split; it writes
``WORKDIR/runs/{method}__{defence}__{attack}__f{fraction}__a{alpha}__s{seed}.json`` (the
config, the final accuracy, the attackers, timings). Finished files with the same config are
skipped (resumable). ``WORKDIR/results.md`` (and, in ``--docs_out``, the block named after the
workdir, keeping the hand-written text and the other workdirs' blocks) is built from the run
files only.

Speed: the round is :func:`fedalign.federated.round.make_round_fn` of the run's own
training parts, jitted once per (method, defence, attack kind) with the seed, the attacker
mask and the label-flip table as arguments instead of constants, so the other cells of the
grid reuse the compilation (the same operations as ``fedalign.main``'s round, which closes
over them); the data and the initial model of each (alpha, seed) are built once. JAX's
persistent compilation cache is on (:mod:`fedalign.compilation`; ``--nocompilation_cache``
turns it off), so a second invocation, or a second process running other seeds at the same
time, reuses the rounds already compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shlex
import statistics
import sys
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedalign.aggregation import robust as robust_lib
from fedalign.compilation import enable_compilation_cache
from fedalign.config_files import config_differences, load_config
from fedalign.data.federated import FederatedData
from fedalign.federated import attacks as attacks_lib
from fedalign.federated.config_checks import validate_config
from fedalign.federated.round import init_server_state, make_round_fn
from fedalign.federated.run import build_training, make_evaluator, sample_clients
from fedalign.models.from_config import load_model
from fedalign.reports import docs_key as reports_docs_key
from fedalign.reports import markdown_table, read_json, write_generated_block, write_json

METHODS = ("fedavg", "fedalign")
DEFENCES = ("none", "norm_bound", "median", "trimmed_mean", "krum")
ATTACKS = ("sign_flip", "scale", "gaussian", "label_flip", "routing_inflation")
FRACTIONS = (0.0, 0.1, 0.2, 0.3)
ALPHAS = (0.1, 1.0)
SEEDS = (0, 1, 2)
METHOD_NAMES = {"fedavg": "FedAvg", "fedalign": "FedAlign-MoE"}
# (method, attack) pairs whose attack cannot change the method's round: not run, the table
# shows the clean run ("= clean")
UNCHANGED = {("fedavg", "routing_inflation")}


@dataclasses.dataclass(frozen=True)
class Cell:
  method: str
  defence: str
  attack: str
  fraction: float
  alpha: float
  seed: int

  @property
  def name(self) -> str:
    return (
        f"{self.method}__{self.defence}__{self.attack}__f{self.fraction:g}__a{self.alpha:g}"
        f"__s{self.seed}"
    )

  def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(base.to_dict())
    c.method = self.method
    c.seed = self.seed
    c.data.alpha = self.alpha
    c.server.robust = self.defence
    c.server.robust_stats = self.defence != "none"
    c.attack.kind = self.attack
    c.attack.fraction = self.fraction
    return c


def grid(methods, defences, attacks, fractions, alphas, seeds) -> list[Cell]:
  """The cells, clean ones (fraction 0, attack 'none') once per (method, defence, alpha, seed);
  ordered seed-major so that a partial run covers whole seeds first."""
  cells = []
  for seed in seeds:
    for alpha in alphas:
      for method in methods:
        for defence in defences:
          if 0.0 in fractions:
            cells.append(Cell(method, defence, "none", 0.0, alpha, seed))
          for attack in attacks:
            if (method, attack) in UNCHANGED:
              continue
            for f in fractions:
              if f > 0:
                cells.append(Cell(method, defence, attack, f, alpha, seed))
  return cells


def apply_sets(config: ml_collections.ConfigDict, sets: Sequence[str]) -> None:
  """``field.path=value`` overrides (value parsed as JSON when it parses, else a string)."""
  for item in sets:
    key, _, raw = item.partition("=")
    try:
      value = json.loads(raw)
    except ValueError:
      value = raw
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value


class Runner:
  """Runs cells, caching the data per (alpha, seed) and the jitted round per (method,
  defence, attack kind)."""

  def __init__(self, workdir: pathlib.Path):
    self.workdir = workdir
    self.data: dict[tuple, Any] = {}
    self.rounds: dict[tuple, Any] = {}
    self.evals: dict[tuple, Any] = {}
    self.models: dict[tuple, Any] = {}

  def run(self, cell: Cell, config: ml_collections.ConfigDict) -> dict[str, Any]:
    t0 = time.time()
    validate_config(config)
    dkey = (cell.alpha, cell.seed)
    if dkey not in self.data:
      tmp = pathlib.Path(tempfile.mkdtemp(prefix="robust_data_"))  # tokenizer files
      self.data[dkey] = FederatedData(config, tmp)
    data = self.data[dkey]
    if dkey not in self.models:  # the seed's initial model (its init compiles once)
      self.models[dkey] = load_model(config, data.tokenizer)
    mcfg, params = self.models[dkey]
    training = build_training(config, mcfg, params, seq2seq=data.seq2seq)
    robust = robust_lib.from_config(config, top_k=getattr(mcfg, "top_k", None))
    attack = attacks_lib.from_config(config, getattr(mcfg, "vocab_size", None), data.candidate_ids)
    rkey = (cell.method, cell.defence, cell.attack if attack is not None else "none")
    if rkey not in self.rounds:
      kind = rkey[2]
      scale = float(config.attack.scale)

      def round_fn(state, batches, weights, ids, r, seed, attackers, table, training=training):
        atk = None if kind == "none" else attacks_lib.Attack(kind, scale, attackers, table)
        fn = make_round_fn(
            training.client_update,
            training.algorithm,
            training.mask,
            seed=seed,
            robust=robust,
            attack=atk,
        )
        return fn(state, batches, weights, ids, r)

      self.rounds[rkey] = jax.jit(round_fn)
    round_fn = self.rounds[rkey]
    if dkey not in self.evals:
      self.evals[dkey] = make_evaluator(data, mcfg, training.module, config.eval.batch_size)
    evaluate = self.evals[dkey]
    n = config.data.num_clients
    attackers = np.zeros(n, bool) if attack is None else attack.attackers
    vocab = getattr(mcfg, "vocab_size", 1)
    table = (
        attack.flip_table
        if attack is not None and attack.flip_table is not None
        else np.arange(vocab, dtype=np.int32)
    )
    state = init_server_state(params, training.algorithm, training.mask, n)
    t_compile = None
    losses = []
    for r in range(config.train.rounds):
      ids = sample_clients(config.seed, r, n, config.train.clients_per_round)
      batches = data.round_batches(config, ids, r)
      weights = data.client_sizes[ids].astype(np.float32)
      tr = time.time()
      state, out = round_fn(
          state,
          batches,
          jnp.asarray(weights),
          jnp.asarray(ids),
          r,
          jnp.asarray(config.seed, jnp.uint32),
          jnp.asarray(attackers),
          jnp.asarray(table),
      )
      losses.append(float(out["train_loss"]))
      if t_compile is None:
        t_compile = time.time() - tr
    ev = evaluate(state["params"], data.test)
    return {
        "cell": dataclasses.asdict(cell),
        "config": json.loads(config.to_json()),
        "final_test_accuracy": float(ev["acc"]),
        "train_loss": losses,
        "attackers": np.flatnonzero(attackers).tolist(),
        "first_round_s": t_compile,
        "wall_time_s": time.time() - t0,
    }


def is_finished(path: pathlib.Path, config: ml_collections.ConfigDict) -> bool:
  if not path.exists():
    return False
  try:
    rec = read_json(path)
  except (OSError, ValueError):
    return False
  return isinstance(rec.get("config"), dict) and not config_differences(rec["config"], config)


# ------------------------------------------------------------------------------------ tables


def _ms(values: list[float]) -> str:
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.3f} (1)"
  return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({len(values)})"


def tables(records: list[dict[str, Any]]) -> str:
  """Markdown: per alpha, rows (method, defence), columns clean + attack x fraction; each cell
  mean ± std over seeds of the final test accuracy (seed count in parentheses)."""
  by: dict[tuple, list[float]] = {}
  for rec in records:
    c = rec["cell"]
    key = (c["method"], c["defence"], c["attack"], c["fraction"], c["alpha"])
    by.setdefault(key, []).append(rec["final_test_accuracy"])
  if not by:
    return "(no run files yet)\n"
  alphas = sorted({k[4] for k in by})
  methods = [m for m in METHODS if any(k[0] == m for k in by)]
  defences = [d for d in DEFENCES if any(k[1] == d for k in by)]
  attacks = [a for a in ATTACKS if any(k[2] == a for k in by)]
  fractions = sorted({k[3] for k in by if k[3] > 0})
  out = []
  for alpha in alphas:
    for attack in attacks:
      header = ["method", "defence", "clean (f=0)"] + [f"f={f:g}" for f in fractions]
      rows = []
      for m in methods:
        for d in defences:
          clean = by.get((m, d, "none", 0.0, alpha), [])
          if (m, attack) in UNCHANGED:
            if clean:
              rows.append([METHOD_NAMES.get(m, m), d, _ms(clean)] + ["= clean"] * len(fractions))
            continue
          vals = [by.get((m, d, attack, f, alpha), []) for f in fractions]
          if not clean and not any(vals):
            continue
          rows.append([METHOD_NAMES.get(m, m), d, _ms(clean)] + [_ms(v) for v in vals])
      if rows:
        out.append(f"### alpha = {alpha:g}, attack = {attack}\n\n" + markdown_table(header, rows))
  return "\n\n".join(out) + "\n"


def write_tables(workdir: pathlib.Path, header: str, docs_out: str = "") -> str:
  records = [read_json(p) for p in sorted((workdir / "runs").glob("*.json"))]
  seeds = sorted({r["cell"]["seed"] for r in records})
  wall = sum(r.get("wall_time_s", 0.0) for r in records)
  body = (
      f"{header}\n\n- run files: {len(records)} in `{workdir}/runs`; seeds present: {seeds}; "
      f"summed wall time {wall:.0f} s\n"
      "- every cell: final global test accuracy, mean ± std over the seeds present (their "
      "count in parentheses)\n\n" + tables(records)
  )
  (workdir / "results.md").write_text(body)
  if docs_out:
    write_generated_block(docs_out, docs_key(workdir), body)
  return body


def docs_key(workdir: pathlib.Path) -> str:
  """This tool's block name for ``workdir`` (see :func:`fedalign.reports.docs_key`)."""
  return reports_docs_key("experiments/robustness.py", workdir)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/default.py:runlocal")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--defences", default=",".join(DEFENCES))
  ap.add_argument("--attacks", default=",".join(ATTACKS))
  ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
  ap.add_argument("--alphas", default=",".join(map(str, ALPHAS)))
  ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
  ap.add_argument("--set", action="append", default=[], help="field.path=value override")
  ap.add_argument("--tables_only", action="store_true")
  ap.add_argument("--docs_out", default="")
  ap.add_argument("--nocompilation_cache", action="store_true")
  args = ap.parse_args(argv)
  if not args.nocompilation_cache:
    enable_compilation_cache()
  split = lambda s: [x for x in s.split(",") if x]
  workdir = pathlib.Path(args.workdir)
  (workdir / "runs").mkdir(parents=True, exist_ok=True)
  base = load_config(args.config)
  apply_sets(base, args.set)
  cells = grid(
      split(args.methods),
      split(args.defences),
      split(args.attacks),
      [float(x) for x in split(args.fractions)],
      [float(x) for x in split(args.alphas)],
      [int(x) for x in split(args.seeds)],
  )
  command = "python -m experiments.robustness " + " ".join(shlex.quote(a) for a in argv)
  header = (
      f"- command: `{command}`\n- config: `{args.config}` with overrides {args.set or 'none'}; "
      f"rounds {base.train.rounds}, {base.data.num_clients} clients ({base.train.clients_per_round}"
      f" per round), attack.scale {base.attack.scale}"
  )
  if not args.tables_only:
    runner = Runner(workdir)
    for i, cell in enumerate(cells):
      config = cell.config(base)
      path = workdir / "runs" / f"{cell.name}.json"
      if is_finished(path, config):
        continue
      rec = runner.run(cell, config)
      write_json(path, rec)
      print(
          f"[{i + 1}/{len(cells)}] {cell.name}: acc {rec['final_test_accuracy']:.3f} "
          f"({rec['wall_time_s']:.0f} s)",
          flush=True,
      )
      write_tables(workdir, header, args.docs_out)
  print(write_tables(workdir, header, args.docs_out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
