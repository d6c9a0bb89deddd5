"""Every method's aggregate is unchanged by the layout change of issue 11 (golden numbers).

tests/golden/aggregates.npz was written by ``python tests/golden_aggregates.py`` on the code
before the change (commit "Golden aggregates of every method ..."). Differences must be
explained by a bug fix of that issue; none of the cases below hits one.
"""

import numpy as np
import pytest

import golden_aggregates as g

GOLDEN = np.load(g.GOLDEN)


def check(prefix, case, got):
  keys = sorted(k.split("|", 2)[2] for k in GOLDEN.files if k.startswith(f"{prefix}|{case}|"))
  assert keys and sorted(got) == keys
  for k in keys:
    np.testing.assert_allclose(
        got[k], GOLDEN[f"{prefix}|{case}|{k}"], rtol=1e-6, atol=1e-6, err_msg=f"{case}: {k}"
    )


# The default run keeps one case per aggregator family and per bug-fix area; the rest run with
# `python -m pytest -m slow` (they are variants of the same code paths).
FAST = (
    "fedavg",
    "fedadam",
    "scaffold",
    "fedmoe",
    "fedmoe_lora_adam",
    "fedalign",
    "fedalign_perm",
    "fedalign_momentum",
)


def cases(names, fast):
  return [c if c in fast else pytest.param(c, marks=pytest.mark.slow) for c in names]


@pytest.mark.parametrize("case", cases(g.CASES, FAST))
def test_aggregator_golden(case):
  check("agg", case, g.run_aggregator_case(case, g.aggregate_rounds))


@pytest.mark.parametrize("case", cases(g.ENGINE_CASES, ("scaffold", "fedalign_perm")))
def test_engine_golden(case):
  check("engine", case, g.run_case(case, g.build_round))
