"""Plots of a reproduction grid, read from the entries' ``metrics.jsonl`` files (matplotlib Agg).

* :func:`plot_metric_vs_round`: one line per label (the mean over seeds) with a +-std band, e.g.
  test accuracy, routing divergence or expert-role preservation against the round;
* :func:`plot_routing_heatmaps`: per-client routing distributions (clients x experts), one panel
  per method (e.g. FedAvg vs FedAlign-MoE);
* :func:`make_grid_plots`: all of the above for a grid run by :mod:`experiments.reproduce`.

Per-client routing distributions are read from an entry directory's ``routing_distributions.npz``
(one ``(clients, experts)`` array per MoE block, the key being the block path) or, failing that,
from the last ``metrics.jsonl`` record's ``client_routing`` field (``{block: [[...], ...]}`` or a
single ``[[...], ...]`` matrix). The server does not write either yet: the heatmap is then
skipped with a log line.

Example:
  >>> import numpy as np, tempfile, pathlib
  >>> out = pathlib.Path(tempfile.mkdtemp()) / 'acc.png'
  >>> curves = {'fedavg': [(np.array([1, 2]), np.array([0.3, 0.4])),
  ...                      (np.array([1, 2]), np.array([0.32, 0.45]))]}
  >>> plot_metric_vs_round(curves, 'test accuracy', 'alpha=0.1', out).name
  'acc.png'
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

Curve = tuple[np.ndarray, np.ndarray]  # (rounds, values)


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def read_metrics(entry_dir: str | pathlib.Path) -> list[dict]:
  """The records of an entry's ``metrics.jsonl`` ([] when absent).

  >>> read_metrics('/nonexistent')
  []
  """
  path = pathlib.Path(entry_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metric_curve(records: Sequence[dict], key: str) -> Curve | None:
  """(rounds, values) of the records holding a finite ``key``; None when no record has it.

  >>> metric_curve([{'round': 1, 'a': 0.5}, {'round': 2}], 'a')
  (array([1]), array([0.5]))
  """
  pts = [
      (r["round"], float(r[key]))
      for r in records
      if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])
  ]
  if not pts:
    return None
  rounds, values = zip(*pts)
  return np.asarray(rounds), np.asarray(values)


def mean_std_curve(curves: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean and std (ddof=1 when there are several curves, else 0) over curves, on the rounds
  that every curve has.

  >>> r, m, s = mean_std_curve([(np.array([1, 2]), np.array([0., 1.])),
  ...                           (np.array([2, 3]), np.array([3., 5.]))])
  >>> r.tolist(), m.tolist()
  ([2], [2.0])
  """
  common = set(curves[0][0].tolist())
  for rounds, _ in curves[1:]:
    common &= set(rounds.tolist())
  rounds = np.array(sorted(common))
  if rounds.size == 0:
    return rounds, np.zeros(0), np.zeros(0)
  stacked = np.stack([v[np.searchsorted(r, rounds)] for r, v in curves])
  std = stacked.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(rounds))
  return rounds, stacked.mean(axis=0), std


def plot_metric_vs_round(
    curves: Mapping[str, Sequence[Curve]], ylabel: str, title: str, path: str | pathlib.Path
) -> pathlib.Path | None:
  """One line per label (mean over its curves, e.g. seeds) with a +-std band; None when empty."""
  curves = {k: list(v) for k, v in curves.items() if v}
  if not curves:
    return None
  plt = _pyplot()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for label, cs in curves.items():
    rounds, mean, std = mean_std_curve(cs)
    if rounds.size == 0:
      continue
    (line,) = ax.plot(rounds, mean, marker="o", ms=3, label=f"{label} (n={len(cs)})")
    if len(cs) > 1:
      ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  from matplotlib.ticker import MaxNLocator

  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("round")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def load_client_routing(entry_dir: str | pathlib.Path) -> np.ndarray | None:
  """Per-client routing distributions (clients, experts), averaged over MoE blocks, of an entry.

  Reads ``routing_distributions.npz`` or the last metrics record's ``client_routing`` (see the
  module docstring); None when the run saved neither.

  >>> load_client_routing('/nonexistent') is None
  True
  """
  entry_dir = pathlib.Path(entry_dir)
  npz = entry_dir / "routing_distributions.npz"
  mats: list[np.ndarray] = []
  if npz.exists():
    with np.load(npz) as f:
      mats = [np.asarray(f[k], np.float64) for k in f.files]
  else:
    records = [r for r in read_metrics(entry_dir) if "client_routing" in r]
    if records:
      value = records[-1]["client_routing"]
      mats = [
          np.asarray(v, np.float64)
          for v in (value.values() if isinstance(value, dict) else [value])
      ]
  mats = [m for m in mats if m.ndim == 2]
  if not mats or len({m.shape for m in mats}) != 1:
    return None
  return np.mean(mats, axis=0)


def plot_routing_heatmaps(
    dists: Mapping[str, np.ndarray], title: str, path: str | pathlib.Path
) -> pathlib.Path | None:
  """Side-by-side clients x experts heatmaps, one per label; None when ``dists`` is empty."""
  if not dists:
    return None
  plt = _pyplot()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  vmax = max(float(np.nanmax(d)) for d in dists.values())
  fig, axes = plt.subplots(1, len(dists), figsize=(3.2 * len(dists) + 1, 3.4), squeeze=False)
  im = None
  for ax, (label, d) in zip(axes[0], dists.items()):
    im = ax.imshow(d, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_title(label)
    ax.set_xlabel("expert")
    ax.set_ylabel("client")
  fig.suptitle(title, y=1.04)
  fig.colorbar(im, ax=list(axes[0]), label="routing probability")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def make_grid_plots(
    workdir: str | pathlib.Path,
    groups: Mapping[str, Mapping[str, Sequence[str]]],
    heatmap_labels: Sequence[str] = ("FedAvg", "FedAlign-MoE"),
) -> tuple[list[pathlib.Path], list[str]]:
  """Writes the plots of a grid under ``workdir/plots``.

  Args:
    workdir: the grid directory (entries are its sub-directories).
    groups: panel title (e.g. ``'alpha=0.1'``) -> line label (method) -> entry directory names
      (one per seed) whose successful runs are averaged.
    heatmap_labels: the two line labels compared by the routing heatmap.

  Returns:
    (written plot paths, notes on plots that were skipped).
  """
  workdir = pathlib.Path(workdir)
  out = workdir / "plots"
  written: list[pathlib.Path] = []
  notes: list[str] = []
  keys = [
      ("test_accuracy", "global test accuracy", "accuracy"),
      ("routing_divergence", "routing divergence (JS)", "routing_divergence"),
      ("expert_role_preservation", "expert-role preservation", "role_preservation"),
  ]
  for title, lines in groups.items():
    slug = "_".join("".join(ch if ch.isalnum() or ch == "." else " " for ch in title).split())
    records = {
        label: [
            read_metrics(workdir / name)
            for name in names
            if (workdir / name / "summary.json").exists()
            and not (workdir / name / "FAILED.txt").exists()
        ]
        for label, names in lines.items()
    }
    for key, ylabel, stem in keys:
      curves = {
          label: [c for c in (metric_curve(r, key) for r in recs) if c is not None]
          for label, recs in records.items()
      }
      p = plot_metric_vs_round(curves, ylabel, title, out / f"{stem}_{slug}.png")
      if p is not None:
        written.append(p)
      elif key != "test_accuracy":
        notes.append(f"{stem} ({title}): no '{key}' in metrics.jsonl")
    dists = {}
    for label in heatmap_labels:
      for name in lines.get(label, ()):
        d = load_client_routing(workdir / name)
        if d is not None:
          dists[label] = d
          break
    if len(dists) == len(heatmap_labels):
      written.append(
          plot_routing_heatmaps(
              dists, f"per-client routing, {title}", out / f"routing_heatmap_{slug}.png"
          )
      )
    elif any(label in lines for label in heatmap_labels):
      notes.append(
          f"routing heatmap ({title}): the runs saved no per-client routing "
          "distributions (routing_distributions.npz / 'client_routing'); skipped"
      )
  for n in notes:
    log.info("plots: %s", n)
  return written, notes


DIAGNOSTIC_ARRAYS = (
    ("omega", "omega_i(e): router weight"),
    ("S", "S_i(e): semantic consistency"),
    ("A", "A(e): client selected"),
)


def diagnostic_blocks(records: Sequence[dict]) -> list[str]:
  """The MoE blocks whose per-(client, expert) FedAlign-MoE diagnostics the records hold
  (runs with ``fedalign.detailed_diagnostics=True``: keys ``agg/<block>/omega`` etc.).

  >>> diagnostic_blocks([{'agg/layers_1/mlp/omega': [[0.5]], 'agg/layers_1/mlp/omega_mean': 0.5}])
  ['layers_1/mlp']
  """
  blocks = []
  for r in records:
    for k, v in r.items():
      if k.startswith("agg/") and k.endswith("/omega") and isinstance(v, list):
        blocks.append(k[len("agg/") : -len("/omega")])
  return sorted(set(blocks))


def plot_fedalign_diagnostics(
    records: Sequence[dict], block: str, rounds: Sequence[int], path: str | pathlib.Path
) -> pathlib.Path | None:
  """Heatmaps of omega_i(e), S_i(e) and A(e) (clients x experts) and the bars of tau_e for one
  MoE block at a few rounds (rows), from a run with ``fedalign.detailed_diagnostics=True``;
  None when the records hold none of those rounds.

  >>> import tempfile
  >>> rec = {'round': 1, 'agg/b/omega': [[0.5, 0.2], [0.5, 0.8]], 'agg/b/S': [[1, 0.4], [1, 0.6]],
  ...        'agg/b/A': [[1, 0], [1, 1]], 'agg/b/tau': [0.9, 0.5]}
  >>> plot_fedalign_diagnostics([rec], 'b', [1], pathlib.Path(tempfile.mkdtemp()) / 'd.png').name
  'd.png'
  """
  by_round = {int(r["round"]): r for r in records if f"agg/{block}/omega" in r}
  rows = [r for r in rounds if r in by_round]
  if not rows:
    return None
  plt = _pyplot()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  cols = len(DIAGNOSTIC_ARRAYS) + 1
  fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 2.6 * len(rows)), squeeze=False)
  for i, rnd in enumerate(rows):
    rec = by_round[rnd]
    for j, (key, title) in enumerate(DIAGNOSTIC_ARRAYS):
      ax = axes[i, j]
      value = rec.get(f"agg/{block}/{key}")
      if value is None:
        ax.axis("off")
        continue
      im = ax.imshow(np.asarray(value, np.float64), aspect="auto", cmap="viridis")
      fig.colorbar(im, ax=ax, fraction=0.046)
      ax.set_title(f"round {rnd}: {title}", fontsize=8)
      ax.set_xlabel("expert", fontsize=7)
      ax.set_ylabel("client", fontsize=7)
    ax = axes[i, cols - 1]
    tau = rec.get(f"agg/{block}/tau")
    if tau is not None:
      ax.bar(np.arange(len(tau)), np.asarray(tau, np.float64))
      ax.set_title(f"round {rnd}: tau_e (selection threshold)", fontsize=8)
      ax.set_xlabel("expert", fontsize=7)
    else:
      ax.axis("off")
  fig.suptitle(f"FedAlign-MoE aggregation diagnostics, {block}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_diagnostics(
    run_dir: str | pathlib.Path, rounds: Sequence[int], out_dir: str | pathlib.Path
) -> list[pathlib.Path]:
  """:func:`plot_fedalign_diagnostics` of every MoE block of a run: ``out_dir/diagnostics_<block>.png``."""
  records = read_metrics(run_dir)
  written = []
  for block in diagnostic_blocks(records):
    slug = block.replace("/", "_")
    p = plot_fedalign_diagnostics(
        records, block, rounds, pathlib.Path(out_dir) / f"diagnostics_{slug}.png"
    )
    if p is not None:
      written.append(p)
  return written


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(
      description="Per-(client, expert) FedAlign-MoE diagnostics of a run made with "
      "--config.fedalign.detailed_diagnostics=True, e.g. python -m experiments.plots "
      "--run /tmp/fa --rounds 20,100,200 --out docs/plots/diagnostics"
  )
  parser.add_argument("--run", required=True, help="the run's workdir (metrics.jsonl)")
  parser.add_argument("--rounds", required=True, help="comma-separated evaluated rounds")
  parser.add_argument("--out", required=True, help="output folder")
  args = parser.parse_args()
  paths = write_diagnostics(args.run, [int(r) for r in args.rounds.split(",")], args.out)
  if not paths:
    raise SystemExit(f"{args.run}: no detailed diagnostics at rounds {args.rounds}")
  print("\n".join(str(p) for p in paths))
