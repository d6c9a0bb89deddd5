"""A markdown table of single runs (validation sweeps) from their run files, nothing typed in.

Each row is one ``fedalign.main`` workdir: its config overrides against a base run's
``config.json``, final / best / last-5 accuracy, the final NLL where the task is language
modelling, optional diagnostics from the aggregation's metrics, and the wall time.

Command::

    python -m experiments.validation_table --base RUN_DIR RUN_DIR [RUN_DIR ...] \\
        [--columns nll,A,floored,perm]
    python -m experiments.validation_table --dir DIR --seeds 0,1,2 \\
        --pair 'FedAlign-MoE=fedalign:fedavg' [--pair ...]   # paired differences of the final NLL

``--pair LABEL=A:B`` compares the runs ``DIR/A_s{seed}`` with ``DIR/B_s{seed}``, seed by seed
(:func:`experiments.reproduce.paired_difference`: mean and 95% Student-t interval).

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

from experiments.plots import read_metrics

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
  rows = read_metrics(run)
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


def final(run: pathlib.Path, key: str = "test_nll") -> float:
  """The last logged value of ``key`` in a run's metrics.jsonl."""
  return [r[key] for r in read_metrics(run) if key in r][-1]


def paired_table(
    directory: pathlib.Path,
    pairs: Sequence[tuple[str, str, str]],
    seeds: Sequence[int],
    key: str = "test_nll",
) -> str:
  """Per (label, a, b): final ``key`` of ``a_s{seed}`` minus ``b_s{seed}``, per seed and as a
  mean with its paired 95% Student-t interval (seeds whose two runs both exist).

  >>> import tempfile, json, pathlib
  >>> d = pathlib.Path(tempfile.mkdtemp())
  >>> for name, nll in (("a_s0", 3.5), ("a_s1", 3.7), ("b_s0", 3.4), ("b_s1", 3.5)):
  ...   (d / name).mkdir()
  ...   _ = (d / name / "metrics.jsonl").write_text(json.dumps({"test_nll": nll}))
  >>> print(paired_table(d, [("A vs B", "a", "b")], [0, 1, 2]).splitlines()[-1])
  | A vs B | `a` - `b` | +0.1000, +0.2000 | +0.1500 [-0.4853, +0.7853] (2) |
  """
  from experiments.reproduce import paired_difference

  lines = [
      f"| comparison | runs | per seed ({key}) | mean [95% CI] (n) |",
      "| --- | --- | --- | --- |",
  ]
  for label, a, b in pairs:
    have = [s for s in seeds if (directory / f"{a}_s{s}").is_dir()]
    have = [s for s in have if (directory / f"{b}_s{s}").is_dir()]
    va = [final(directory / f"{a}_s{s}", key) for s in have]
    vb = [final(directory / f"{b}_s{s}", key) for s in have]
    d = paired_difference(va, vb)
    per = ", ".join(f"{x - y:+.4f}" for x, y in zip(va, vb))
    ci = f"[{d['lo']:+.4f}, {d['hi']:+.4f}]" if d["n"] > 1 else "[-]"
    lines.append(f"| {label} | `{a}` - `{b}` | {per} | {d['mean']:+.4f} {ci} ({d['n']}) |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--base", type=pathlib.Path, help="run whose config is the base")
  p.add_argument("runs", nargs="*", type=pathlib.Path, help="run directories, in row order")
  p.add_argument("--columns", default="", help=f"comma-separated, of {COLUMNS}")
  p.add_argument("--dir", type=pathlib.Path, help="--pair: the directory of the runs")
  p.add_argument("--pair", action="append", default=[], help="LABEL=A:B (runs A_sN, B_sN)")
  p.add_argument("--seeds", default="0,1,2", help="--pair: comma-separated seeds")
  p.add_argument("--key", default="test_nll", help="--pair: the metric compared")
  args = p.parse_args(argv)
  if args.pair:
    if args.dir is None:
      p.error("--pair needs --dir")
    pairs = []
    for spec in args.pair:
      label, sep, ab = spec.partition("=")
      a, sep2, b = ab.partition(":")
      if not (sep and sep2 and a and b):
        p.error(f"--pair {spec!r}: expected LABEL=A:B")
      pairs.append((label, a, b))
    seeds = [int(x) for x in args.seeds.split(",") if x]
    print(paired_table(args.dir, pairs, seeds, args.key))
    return
  if args.base is None or not args.runs:
    p.error("give --base and run directories, or --dir and --pair")
  print(table(args.base, args.runs, [c for c in args.columns.split(",") if c]))


if __name__ == "__main__":
  main()
