"""End-to-end FedAlign-MoE on the embedded default (reduced): diagnostics reach metrics.jsonl."""
import importlib.util
import json
import math
import pathlib

import pytest

from fedalign.federated.server import run_experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg is not None else mod.get_config()


def reduce(c):
  c.data.num_clients = 4
  c.data.max_train_examples = 600
  c.data.max_test_examples = 200
  c.data.min_client_size = 10
  c.data.seq_len = 24
  c.data.vocab_size = 300
  c.model.hidden_size = 16
  c.model.intermediate_size = 32
  c.model.moe_intermediate_size = 16
  c.model.num_experts = 4
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.train.clients_per_round = 3
  c.train.local_steps = 2
  c.train.batch_size = 8
  c.train.rounds = 2
  c.eval.specialization_examples = 64
  return c


def test_fedalign_run_writes_diagnostics(tmp_path):
  c = reduce(load_config("default"))
  c.method = "fedalign"
  summary = run_experiment(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 2 and summary["method"] == "fedalign"
  last = rows[-1]
  for block in ("layers_0/mlp", "layers_1/mlp"):
    for key in ("omega_mean", "omega_min", "omega_max", "S_mean", "tau_mean", "A_size_mean",
                "kept_frac"):
      value = last[f"agg/{block}/{key}"]
      assert math.isfinite(value), (block, key, value)
    assert 0.0 <= last[f"agg/{block}/omega_min"] <= last[f"agg/{block}/omega_max"] <= 1.0
    assert 0.0 <= last[f"agg/{block}/A_size_mean"] <= 3.0
  assert 0.0 <= last["agg/routing_divergence"] <= math.log(2)
  assert -1.0 <= last["expert_role_preservation"] <= 1.0
  assert 0.0 <= last["expert_specialization"] <= math.log(4) + 1e-6
  assert set(last["expert_specialization_per_block"]) == {"layers_0/mlp", "layers_1/mlp"}


def test_ablation_rows_select_the_documented_switches():
  rows = {}
  for row in ("direct_averaging", "uniform_gating", "consistency", "adaptive_alpha",
              "semantic", "permutation"):
    c = load_config("ablation", row)
    f = c.fedalign
    rows[row] = (c.method, f.router_weighting, f.adaptive_alpha, f.semantic_selection,
                 f.permutation_alignment)
  assert rows["direct_averaging"][0] == "fedavg"
  assert rows["uniform_gating"] == ("fedalign", "uniform", False, False, False)
  assert rows["consistency"] == ("fedalign", "consistency", False, False, False)
  assert rows["adaptive_alpha"] == ("fedalign", "consistency", True, False, False)
  assert rows["semantic"] == ("fedalign", "consistency", True, True, False)
  assert rows["permutation"] == ("fedalign", "consistency", True, True, True)
  with pytest.raises(ValueError, match="ablation row 'nope' is unknown"):
    load_config("ablation", "nope")
