"""A markdown table of single runs (validation sweeps) from their run files, nothing typed in.

Each row is one ``fedalign.main`` workdir: its config overrides against a base run's
``config.json``, final / best / last-5 accuracy, the final NLL where the task is language
modelling, optional diagnostics from the aggregation's metrics, and the wall time.

Command::

    python -m experiments.validation_table --base RUN_DIR RUN_DIR [RUN_DIR ...] \\
        [--columns nll,A,floored,perm]

Example (the tables of experiments/results/default_sweep/README.md and
experiments/results/domain_grid/validation/README.md are printed this way)::

    >>> import tempfile, json, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name, beta, accs in (("base", 1.0, [0.5, 0.6]), ("beta3", 3.0, [0.4, 0.7])):
    ...   (d / name).mkdir()
    ...   _ = (d / name / "config.json").write_text(json.dumps({"fedalign": {"beta": beta}}))
    ...   _ = (d / name / "metrics.jsonl").write_text(
    ...       "\\n".join(json.dumps({"round": i, "test_accuracy": a}) for i, a in enumerate(accs)))
    ...   _ = (d / name / "summary.json").write_text(json.dumps({"wall_time_s": 12.0}))
    >>> print(table(d / "base", [d / "base", d / "beta3"]))
    | name | overrides | final | best | last-5 | wall (s) |
    | --- | --- | --- | --- | --- | --- |
    | base | (none: the base run) | 0.600 | 0.600 | 0.550 | 12 |
    | beta3 | `fedalign.beta=3.0` | 0.700 | 0.700 | 0.550 | 12 |
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any, Iterable, Sequence

COLUMNS = ("nll", "A", "floored", "perm")
HEADERS = {
    "nll": "final NLL",
    "A": "A(e) size (last round)",
    "floored": "floored experts (mean over rounds)",
    "perm": "perm moved",
}


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
  """A nested config dict as ``{'a.b': value}``.

  >>> flat({'a': {'b': 1}, 'c': 2})
  {'a.b': 1, 'c': 2}
  """
  out: dict[str, Any] = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _mean(values: Sequence[float]) -> float:
  return sum(values) / len(values)


def row(
    run: pathlib.Path,
    base: dict[str, Any],
    columns: Sequence[str] = (),
    base_label: str = "the base run",
) -> list[str]:
  """The cells of one run's row; ``base``: the flattened config it is compared with."""
  cfg = flat(json.loads((run / "config.json").read_text()))
  # a key the base run's config lacks (an option added after it ran) counts as an override
  over = [f"`{k}={cfg[k]}`" for k in sorted(cfg) if k not in base or cfg[k] != base[k]]
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "test_accuracy" in r]
  acc = [r["test_accuracy"] for r in evals]
  cells = [
      run.name,
      " ".join(over) or f"(none: {base_label})",
      f"{acc[-1]:.3f}",
      f"{max(acc):.3f}",
      f"{_mean(acc[-5:]):.3f}",
  ]
  for col in columns:
    if col == "nll":
      nll = [r["test_nll"] for r in evals if "test_nll" in r]
      cells.append(f"{nll[-1]:.4f}" if nll else "")
    elif col == "A":  # per layer: mean |A(e)| / mean |P(e)| at the last logged round
      last = next((r for r in reversed(rows) if any(k.endswith("A_size_mean") for k in r)), {})
      layers = sorted(k[: -len("A_size_mean")] for k in last if k.endswith("A_size_mean"))
      cells.append(
          ", ".join(f"{last[k + 'A_size_mean']:.1f}/{last[k + 'P_size_mean']:.1f}" for k in layers)
      )
    elif col == "floored":
      fl = [v for r in rows for k, v in r.items() if k.endswith("floored_frac")]
      cells.append(f"{_mean(fl):.2f}" if fl else "")
    elif col == "perm":
      moved = [v for r in rows for k, v in r.items() if "perm_moved_frac" in k]
      cells.append(f"{min(moved):.2f}-{max(moved):.2f}" if moved else "")
    else:
      raise ValueError(f"--columns: unknown column {col!r}; expected some of {COLUMNS}")
  wall = json.loads((run / "summary.json").read_text()).get("wall_time_s", 0.0)
  cells.append(f"{wall:.0f}")
  return cells


def table(
    base: pathlib.Path,
    runs: Iterable[pathlib.Path],
    columns: Sequence[str] = (),
    base_label: str = "the base run",
) -> str:
  """The markdown table of ``runs`` (workdirs), overrides shown against ``base``'s config."""
  base_cfg = flat(json.loads((pathlib.Path(base) / "config.json").read_text()))
  head = ["name", "overrides", "final", "best", "last-5"]
  head += [HEADERS[c] if c in HEADERS else c for c in columns] + ["wall (s)"]
  lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
  lines += [
      "| " + " | ".join(row(pathlib.Path(r), base_cfg, columns, base_label)) + " |" for r in runs
  ]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--base", required=True, type=pathlib.Path, help="run whose config is the base")
  p.add_argument("runs", nargs="+", type=pathlib.Path, help="run directories, in row order")
  p.add_argument("--columns", default="", help=f"comma-separated, of {COLUMNS}")
  args = p.parse_args(argv)
  print(table(args.base, args.runs, [c for c in args.columns.split(",") if c]))


if __name__ == "__main__":
  main()
