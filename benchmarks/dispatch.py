"""Expert dispatch in federated rounds: dense (every expert on every token) vs block-sparse
dropless (the default, ``moe_impl='sparse'``) vs capacity dispatch (scatter to (E, C, D)
buffers, grouped matmuls, gather), against the PyTorch baseline's round.

One process, one machine, the same rounds' batches for all variants; rounds are alternated (the
order rotating every round) so that load changes of a shared machine hit every variant alike.
Round 0 of each variant is a warm-up (jit compile) and is reported apart. The PyTorch round is
``experiments/pytorch_baseline.py``'s (transformers Mixtral, clients one after another, dropless
top-k experts); capacity dispatch drops (token, expert) choices beyond
``capacity_factor * tokens * k / E`` per expert, so it is not the same function as the dropless
ones: it is the speed/quality trade-off Switch and GShard make.

Command (about 5 minutes on 2 CPU cores)::

    python benchmarks/dispatch.py [--config=configs/default.py:base] [--reps=5] \\
        [--impls=dense,sparse] [--capacity_factors=1.25] [--threads=2]

Writes ``benchmarks/results/dispatch.json`` and prints a markdown table (copied into
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from _common import machine, markdown_table, median, write_json  # noqa: E402
from fedalign.config_files import load_config  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/default.py:base")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--impls", default="dense,sparse", help="dropless model.moe_impl values")
  ap.add_argument("--capacity_factors", default="1.25")
  ap.add_argument("--threads", type=int, default=2)
  args = ap.parse_args()

  import torch
  from experiments.compare_pytorch import make_fedalign_round, make_torch_round
  from experiments.pytorch_baseline import export_initial_model
  from fedalign.data.federated import FederatedData

  torch.set_num_threads(args.threads)
  base = load_config(args.config)
  work = pathlib.Path(tempfile.mkdtemp(prefix="fedalign_dispatch_"))
  data = FederatedData(base, work)
  _, _, hf_dir = export_initial_model(base, data.tokenizer, work / "hf_init")

  runners = {}
  # Each variant is built by fedalign.federated.run.build_run on the same data.
  for impl in [x for x in args.impls.split(",") if x]:
    cfg = copy.deepcopy(base)
    cfg.model.moe_impl = impl
    runners[impl] = make_fedalign_round(cfg, data, work)
  for cf in [float(x) for x in args.capacity_factors.split(",") if x]:
    cfg = copy.deepcopy(base)
    cfg.model.moe_impl = "sparse"  # capacity dispatch = sparse + capacity_factor > 0
    cfg.model.capacity_factor = cf
    name = f"capacity {cf:g}"
    runners[name] = make_fedalign_round(cfg, data, work)
  runners[f"pytorch {args.threads} thr"] = make_torch_round(base, data, hf_dir, args.threads)
  names = list(runners)
  t0 = time.time()
  warm = {n: runners[n](0) for n in names}
  rows = []
  for i in range(args.reps):
    order = names[i % len(names) :] + names[: i % len(names)]
    row = {"round": i + 2}
    for n in order:
      row[n] = runners[n](i + 1)
    row["loadavg_1min"] = os.getloadavg()[0]
    rows.append(row)
    print(f"round {i + 2}: " + ", ".join(f"{n} {row[n]:.3f}s" for n in names), flush=True)
  med = {n: median([r[n] for r in rows]) for n in names}
  torch_name = names[-1]
  table = [
      [
          n,
          f"{warm[n]:.2f}",
          f"{med[n]:.3f}",
          f"{median([r[torch_name] / r[n] for r in rows]):.2f}",
          f"{median([r[names[0]] / r[n] for r in rows]):.2f}",
      ]
      for n in names
  ]
  md = markdown_table(
      [
          "variant",
          "round 1 s (compile)",
          "median round s",
          "PyTorch / variant",
          f"{names[0]} / variant",
      ],
      table,
  )
  print(md)
  write_json(
      "dispatch.json",
      {
          "machine": machine(),
          "config": args.config,
          "command": " ".join(["python", *sys.argv]),
          "reps": args.reps,
          "warmup_s": warm,
          "rows": rows,
          "median_s": med,
          "wall_s": time.time() - t0,
          "markdown": md,
          "config_values": base.to_dict(),
      },
  )


if __name__ == "__main__":
  main()
