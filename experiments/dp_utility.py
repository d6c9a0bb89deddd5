"""DP utility table: final test accuracy at epsilon 1, 4, 8 and inf (docs/privacy.md).

For each target epsilon the noise multiplier is the smallest one whose accounted epsilon
(:mod:`fedalign.privacy`, at ``dp.delta``, for the run's sampling and rounds) reaches it;
epsilon inf = clipping only (no noise); 'no DP' = neither. Runs are resumable (an entry with a
summary.json is not rerun); the table is rendered from the entries' summary.json.

Command (the table in docs/privacy.md)::

    python experiments/dp_utility.py --config=configs/default.py:runlocal \\
        --workdir=/tmp/dp_utility --seeds=0 --clip=1.0 --out=experiments/results/dp_utility.md
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fedalign import privacy  # noqa: E402
from fedalign.config_files import load_config  # noqa: E402

EPSILONS = (1.0, 4.0, 8.0, math.inf)


def noise_for(config, target: float) -> float:
  """The noise multiplier reaching ``target`` for the config's method, sampling and rounds."""
  n, m = config.data.num_clients, config.train.clients_per_round
  rounds, delta = config.train.rounds, config.dp.delta
  if privacy.dp_view(config.method) == "sum":
    fn = lambda z: privacy.epsilon_sum(z, m, n, rounds, delta)
  else:  # worst case: a client uploading in every round
    fn = lambda z: privacy.epsilon_rows(z, rounds, delta)
  return privacy.noise_for_epsilon(target, delta, fn)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/default.py:runlocal")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--clip", type=float, default=1.0)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  from fedalign.federated.server import run_experiment

  work = pathlib.Path(args.workdir)
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = []
  for label, eps in [("no DP", None)] + [(f"{e:g}", e) for e in EPSILONS]:
    accs, z = [], 0.0
    for seed in seeds:
      c = load_config(args.config)
      c.seed = seed
      if eps is not None:
        c.dp.clip_norm = args.clip
        z = noise_for(c, eps)
        c.dp.noise_multiplier = z
      d = work / f"eps_{label.replace(' ', '_')}_seed{seed}"
      if not (d / "summary.json").exists():
        run_experiment(c, d)
      s = json.loads((d / "summary.json").read_text())
      accs.append(s["final_test_accuracy"])
      got = s.get("dp_epsilon")
    rows.append((label, z, got, accs))
  c = load_config(args.config)
  lines = [
      f"Config `{args.config}` (method {c.method}, {c.data.num_clients} clients, "
      f"{c.train.clients_per_round} a round, {c.train.rounds} rounds), dp.clip_norm={args.clip}, "
      f"dp.delta={c.dp.delta}, seeds {seeds}. Command: `python experiments/dp_utility.py "
      f"--config={args.config} --workdir=... --seeds={args.seeds} --clip={args.clip}`.",
      "",
      "| target epsilon | noise multiplier z | accounted epsilon | final test accuracy (per seed) |",
      "|---|---|---|---|",
  ]
  for label, z, got, accs in rows:
    eps = "-" if got is None else f"{got:.3g}"
    lines.append(f"| {label} | {z:.3g} | {eps} | {', '.join(f'{a:.3f}' for a in accs)} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
