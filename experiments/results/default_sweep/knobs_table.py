"""The table of ``README.md`` "beta, lambda and the alignment margin", from the run files.

    python experiments/results/default_sweep/knobs_table.py

Each row: the overrides against ``knobs/base_now`` (the current default), the final / best /
last-5 validation accuracy, the range of ``perm_moved_frac`` over the logged rounds and layers,
and the wall time.
"""

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent / "knobs"
ORDER = (
    "fedavg_lr3",
    "base_now",
    "beta3",
    "lambda0",
    "perm_m0",
    "perm_m005",
    "beta0",
    "lambda1",
    "perm_m001",
    "old_code_efd0b33",
)


def flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def row(name: str, base: dict) -> str:
  d = HERE / name
  cfg = flat(json.loads((d / "config.json").read_text()))
  over = [f"`{k}={cfg[k]}`" for k in sorted(cfg) if k in base and cfg[k] != base[k]]
  rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
  acc = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
  moved = [v for r in rows for k, v in r.items() if "perm_moved_frac" in k]
  perm = f"{min(moved):.2f}-{max(moved):.2f}" if moved else ""
  wall = json.loads((d / "summary.json").read_text()).get("wall_time_s", 0.0)
  cells = [
      name,
      " ".join(over) or "(none: the current default)",
      f"{acc[-1]:.3f}",
      f"{max(acc):.3f}",
      f"{sum(acc[-5:]) / 5:.3f}",
      perm,
      f"{wall:.0f}",
  ]
  return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
  base = flat(json.loads((HERE / "base_now" / "config.json").read_text()))
  print("| name | overrides | final | best | last-5 | perm moved | wall (s) |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for n in ORDER:
    print(row(n, base))
