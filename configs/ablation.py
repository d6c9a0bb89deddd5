"""The paper's cumulative ablation rows of FedAlign-MoE, on top of the embedded default.

Command (one row; ROW is one of the names below):

    python -m fedalign.main --config=configs/ablation.py:ROW --workdir=/tmp/ablation_ROW

Rows (cumulative, as in the paper's AG News alpha = 0.1 ablation):

=================  ==========================================================================
direct_averaging   FedAvg (no alignment)
uniform_gating     + gating-distribution regularizer with uniform expert weights (alpha = 1);
                   routers and experts still averaged FedAvg-style
consistency        + routing-consistency router aggregation (s = o * m)
adaptive_alpha     + adaptive expert-level weights alpha = exp(-CV)
semantic           + semantic-aware selective expert aggregation (the full method)
permutation        + expert permutation alignment (the project's addition)
=================  ==========================================================================

Hardware and time: as configs/default.py (2 CPU cores, a few minutes per row). The paper
reports 0.774 / 0.802 / 0.831 / 0.841 / 0.852 on Switch-base-16. On the default config the
grid of docs/results_pretrained.md (``experiments.reproduce``, which applies the rows' switches to
its base config, so there ``semantic`` is configs/default.py's FedAlign-MoE) measured at alpha
= 0.1, last-5 test accuracy over seeds 0-4: 0.763 / 0.763 / 0.762 / 0.759 / 0.743 / 0.763
(direct_averaging, semantic and permutation are the FedAvg, FedAlign-MoE and + perm. align runs;
each row's paired difference against the previous one is in the page's table, none significant).
The same rows on
``configs/cpu_analog.py`` (``python -m experiments.reproduce --config=configs/cpu_analog.py
--ablation``, seeds 0-2, docs/results.md) measured last-5 test accuracy 0.365 / 0.387 / 0.370 /
0.380 / 0.341 / 0.341.
"""

import pathlib

import ml_collections

from fedalign.config_files import load_module

ROWS = (
    "direct_averaging",
    "uniform_gating",
    "consistency",
    "adaptive_alpha",
    "semantic",
    "permutation",
)


def base_config() -> ml_collections.ConfigDict:
  """configs/default.py: what every ablation row changes fields of."""
  common = load_module(pathlib.Path(__file__).resolve().parent / "common.py")
  return common.fedalign_paper(common.default_config())  # the paper's rows: its literal reading


def get_config(row: str = "semantic") -> ml_collections.ConfigDict:
  """The default config with the method switches of ablation ``row``."""
  if row not in ROWS:
    raise ValueError(f"ablation row {row!r} is unknown: expected one of {ROWS}.")
  c = base_config()
  level = ROWS.index(row)
  if level == 0:
    c.method = "fedavg"
    return c
  c.method = "fedalign"
  f = c.fedalign
  f.router_weighting = "consistency" if level >= 2 else "uniform"
  f.adaptive_alpha = level >= 3
  f.semantic_selection = level >= 4
  f.permutation_alignment = level >= 5
  return c
