"""The table of ``README.md`` "beta, lambda and the alignment margin", from the run files.

    python experiments/results/default_sweep/knobs_table.py

Each row: the overrides against ``knobs/base_now`` (the current default), the final / best /
last-5 validation accuracy, the range of ``perm_moved_frac`` over the logged rounds and layers,
the mean fraction of experts the selection floor kept whole, and the wall time (:mod:`experiments.validation_table`).
"""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent / "knobs"
sys.path.insert(0, str(HERE.parents[3]))

from experiments.validation_table import table  # noqa: E402

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
    "floor01",
)

if __name__ == "__main__":
  print(
      table(
          HERE / "base_now", [HERE / n for n in ORDER], ["perm", "floored"], "the current default"
      )
  )
