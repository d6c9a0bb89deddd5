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
  """The tiny setting of tests/test_server.py, applied to config ``c``."""
  from test_server import tiny_config

  tiny = tiny_config(c.method, rounds=2)
  c.data.update(tiny.data)
  c.model.update(tiny.model)
  c.train.update(tiny.train)
  c.eval.specialization_examples = 64
  c.eval.every = 1  # the default evaluates every 20 rounds
  return c


def test_fedalign_run_writes_diagnostics(tmp_path):
  c = reduce(load_config("default"))
  c.method = "fedalign"
  c.fedalign.detailed_diagnostics = True  # every FedAlignConfig option is a config field
  summary = run_experiment(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 2 and summary["method"] == "fedalign"
  last = rows[-1]
  for block in ("layers_0/mlp", "layers_1/mlp"):
    for key in (
        "omega_mean",
        "omega_min",
        "omega_max",
        "S_mean",
        "tau_mean",
        "A_size_mean",
        "kept_frac",
    ):
      value = last[f"agg/{block}/{key}"]
      assert math.isfinite(value), (block, key, value)
    assert 0.0 <= last[f"agg/{block}/omega_min"] <= last[f"agg/{block}/omega_max"] <= 1.0
    assert 0.0 <= last[f"agg/{block}/A_size_mean"] <= 3.0
  omega = last["agg/layers_0/mlp/omega"]  # (clients incl. padding, experts) per-client weights
  assert len(omega) == 4 and len(omega[0]) == 4
  assert all(abs(sum(col) - 1.0) < 1e-5 for col in zip(*omega))
  assert 0.0 <= last["agg/routing_divergence"] <= math.log(2)
  assert -1.0 <= last["expert_role_preservation"] <= 1.0
  assert 0.0 <= last["expert_specialization"] <= math.log(4) + 1e-6
  assert set(last["expert_specialization_per_block"]) == {"layers_0/mlp", "layers_1/mlp"}


def test_ablation_rows_select_the_documented_switches():
  rows = {}
  for row in (
      "direct_averaging",
      "uniform_gating",
      "consistency",
      "adaptive_alpha",
      "semantic",
      "permutation",
  ):
    c = load_config("ablation", row)
    f = c.fedalign
    rows[row] = (
        c.method,
        f.router_weighting,
        f.adaptive_alpha,
        f.semantic_selection,
        f.permutation_alignment,
    )
  assert rows["direct_averaging"][0] == "fedavg"
  assert rows["uniform_gating"] == ("fedalign", "uniform", False, False, False)
  assert rows["consistency"] == ("fedalign", "consistency", False, False, False)
  assert rows["adaptive_alpha"] == ("fedalign", "consistency", True, False, False)
  assert rows["semantic"] == ("fedalign", "consistency", True, True, False)
  assert rows["permutation"] == ("fedalign", "consistency", True, True, True)
  with pytest.raises(ValueError, match="ablation row 'nope' is unknown"):
    load_config("ablation", "nope")


def test_fedalign_round_with_lora_updates_only_adapters_and_routers():
  """LoRA fine-tuning: experts are compared and merged through their adapter deltas; the
  frozen base weights are neither vmapped per client nor changed."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  import optax

  from fedalign.algorithms import make_algorithm
  from fedalign.federated.client import make_client_update
  from fedalign.federated.round import init_server_state, make_round_fn
  from fedalign.federated.task import CausalLMTask
  from fedalign.models import MoEConfig, MoEDecoderLM, init_params
  from fedalign.models.lora import partition, trainable_mask

  cfg = MoEConfig(
      vocab_size=32,
      hidden_size=16,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=8,
      lora_rank=2,
  )
  params = init_params(cfg, 0)
  mask = trainable_mask(params, "lora")
  conf = load_config("default")
  conf.method = "fedalign"
  alg = make_algorithm(conf, partition(params, mask)[0], num_clients=3)
  cu = make_client_update(CausalLMTask(MoEDecoderLM(cfg)), alg, optax.sgd(0.5))
  round_fn = jax.jit(make_round_fn(cu, alg, mask, seed=0))
  rng = np.random.default_rng(0)
  batches = {
      "tokens": jnp.asarray(rng.integers(0, 32, (3, 2, 4, 6)), jnp.int32),
      "mask": jnp.ones((3, 2, 4, 6), bool),
      "target_mask": jnp.ones((3, 2, 4, 6), bool),
      "step_mask": jnp.ones((3, 2), bool),
  }
  state = init_server_state(params, alg, mask, 3)
  new, out = round_fn(state, batches, jnp.array([1.0, 2.0, 3.0]), jnp.arange(3), 0)
  experts_old = params["layers_0"]["mlp"]["experts"]
  experts_new = new["params"]["layers_0"]["mlp"]["experts"]
  for name in ("wi_0", "wi_1", "wo"):
    np.testing.assert_array_equal(experts_new[name], experts_old[name])  # frozen base
  changed = [
      not np.allclose(experts_new[f"{n}_lora_b"], experts_old[f"{n}_lora_b"])
      for n in ("wi_0", "wi_1", "wo")
  ]
  assert any(changed)  # adapters (zero-initialised B) moved
  assert not np.allclose(
      new["params"]["layers_0"]["mlp"]["router"]["kernel"],
      params["layers_0"]["mlp"]["router"]["kernel"],
  )
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new["params"]))
  diag = out["diagnostics"]
  assert 0.0 <= float(diag["layers_0/mlp/omega_min"]) <= float(diag["layers_0/mlp/omega_max"])
  assert not bool(np.asarray(out["excluded"]).any())
