"""Golden aggregates: every method's global model after two engine rounds on a tiny MoE.

``python tests/golden_aggregates.py`` writes ``tests/golden/aggregates.npz`` (done once, on the
code before the layout change of issue 11); ``tests/test_golden.py`` recomputes the same runs
and compares at 1e-6. A change that moves these numbers is a behaviour change and must say so.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from fedalign.federated.task import CausalLMTask
from fedalign.models import build_module, family_config, init_params
from fedalign.models.lora import partition, trainable_mask

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "aggregates.npz"
NUM_CLIENTS = 4
ROUNDS = 2

# name -> (method, trainable, config overrides)
CASES = {
    "fedavg": ("fedavg", "full", {}),
    "fedprox": ("fedprox", "full", {}),
    "fedavgm": ("fedavgm", "full", {}),
    "fedadam": ("fedadam", "full", {"server.learning_rate": 0.01}),
    "fedyogi": ("fedyogi", "full", {"server.learning_rate": 0.01}),
    "fedadagrad": ("fedadagrad", "full", {"server.learning_rate": 0.01}),
    "scaffold": ("scaffold", "full", {}),
    "fedmoe": ("fedmoe", "full", {}),
    "fedmoe_lora_adam": (
        "fedmoe",
        "lora",
        {"server.optimizer": "adam", "server.learning_rate": 0.01},
    ),
    "fedalign": ("fedalign", "full", {}),
    "fedalign_linear": ("fedalign", "full", {"fedalign.pairwise": False}),
    "fedalign_centroid": ("fedalign", "full", {"fedalign.semantic_similarity": "centroid_cosine"}),
    "fedalign_perm": ("fedalign", "full", {"fedalign.permutation_alignment": True}),
    "fedalign_lora": ("fedalign", "lora", {}),
    "fedalign_momentum": ("fedalign", "full", {"server.optimizer": "momentum"}),
}


def base_config(method: str, trainable: str, overrides: dict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.server = ml_collections.ConfigDict(
      dict(optimizer="none", learning_rate=1.0, momentum=0.9, b1=0.9, b2=0.99, eps=1e-3)
  )
  c.fedprox = ml_collections.ConfigDict(dict(mu=0.1))
  c.fedalign = ml_collections.ConfigDict(
      dict(
          lambda_reg=0.1,
          beta=1.0,
          semantic_similarity="gate",
          pairwise=True,
          weight_by_n=False,
          router_weighting="consistency",
          adaptive_alpha=True,
          semantic_selection=True,
          permutation_alignment=False,
          centroid_clip=0.0,
          centroid_noise_std=0.0,
      )
  )
  c.train = ml_collections.ConfigDict(dict(trainable=trainable, learning_rate=0.05))
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def model_and_batches(lora: bool):
  cfg = family_config(
      "mixtral",
      vocab_size=64,
      hidden_size=16,
      intermediate_size=32,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=8,
      lora_rank=4 if lora else 0,
      max_position_embeddings=16,
  )
  params = init_params(cfg, jax.random.key(1), seq_len=12)
  if lora:  # non-zero adapters so that LoRA deltas are not trivially tied to the base
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if "lora_b" in jax.tree_util.keystr(p) else x, params
    )
  rng = np.random.default_rng(3)
  steps, batch, seq = 3, 4, 12
  tokens = rng.integers(1, 64, size=(NUM_CLIENTS, steps, batch, seq)).astype(np.int32)
  # Clients see different token ranges so that their routing differs (non-IID).
  tokens = (tokens % 16 + 16 * np.arange(NUM_CLIENTS)[:, None, None, None]).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[1, :, :, 9:] = False
  target = mask.copy()
  step_mask = np.ones((NUM_CLIENTS, steps), bool)
  step_mask[2, 2] = False
  batches = {"tokens": tokens, "mask": mask, "target_mask": target, "step_mask": step_mask}
  return cfg, params, batches


def run_case(name: str, build_round) -> dict[str, np.ndarray]:
  """Runs ``ROUNDS`` rounds of case ``name``; returns the flat final params.

  ``build_round(config, task, params, mask, optimizer, num_clients)`` -> (round_fn, state)
  adapts to the engine's API (the only part that changed with the layout of issue 11).
  """
  method, trainable, overrides = CASES[name]
  config = base_config(method, trainable, overrides)
  cfg, params, batches = model_and_batches(trainable == "lora")
  mask = trainable_mask(params, trainable)
  task = CausalLMTask(build_module(cfg))
  round_fn, state = build_round(config, task, params, mask, optax.sgd(0.05), NUM_CLIENTS)
  weights = jnp.array([10.0, 30.0, 20.0, 40.0])
  for r in range(ROUNDS):
    state, _ = round_fn(state, batches, weights, jnp.arange(NUM_CLIENTS), r)
  flat = traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def build_round_v1(config, task, params, mask, optimizer, num_clients):
  """The engine API before issue 11 (kept to regenerate the file on that code)."""
  from fedalign.federated.algorithms import make_algorithm
  from fedalign.federated.client import make_client_update
  from fedalign.federated.round import init_server_state, make_round_fn

  alg = make_algorithm(config, partition(params, mask)[0], num_clients)
  cu = make_client_update(task, alg, optimizer, learning_rate=0.05)
  rf = jax.jit(make_round_fn(cu, alg, mask, seed=0))
  return rf, init_server_state(params, alg, mask, num_clients)


@functools.lru_cache(maxsize=None)
def aggregator_inputs(lora: bool):
  """Client-stacked deltas and the model's real routing statistics of each client's batch."""
  cfg, params, batches = model_and_batches(lora)
  mask = trainable_mask(params, "lora" if lora else "full")
  trainable, _ = partition(params, mask)
  module = build_module(cfg)
  routing = jax.jit(jax.vmap(lambda t, m: module.apply({"params": params}, t, m)[1]["routing"]))
  stats = routing(jnp.asarray(batches["tokens"][:, 0]), jnp.asarray(batches["mask"][:, 0]))
  keys = iter(jax.random.split(jax.random.key(7), 1000))
  deltas = jax.tree.map(
      lambda x: None
      if x is None
      else 0.01 * jax.random.normal(next(keys), (NUM_CLIENTS,) + x.shape, jnp.float32),
      trainable,
      is_leaf=lambda x: x is None,
  )
  return params, mask, trainable, deltas, stats


def run_aggregator_case(name: str, aggregate_rounds) -> dict[str, np.ndarray]:
  """Two aggregations of fixed deltas/statistics (no client training): the flat params.

  ``aggregate_rounds(config, params, mask, trainable, deltas, stats, weights, rounds)`` ->
  params adapts to the aggregator API. The second round reuses the inputs with client 2
  excluded (weight 0), so state carried between rounds (p_g, centroids, optimizer) matters.
  """
  method, trainable_kind, overrides = CASES[name]
  config = base_config(method, trainable_kind, overrides)
  params, mask, trainable, deltas, stats = aggregator_inputs(trainable_kind == "lora")
  weights = [jnp.array([10.0, 30.0, 20.0, 40.0]), jnp.array([10.0, 30.0, 0.0, 40.0])]
  new = aggregate_rounds(config, params, mask, trainable, deltas, stats, weights)
  flat = traverse_util.flatten_dict(jax.device_get(new), sep="/")
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def aggregate_rounds_v1(config, params, mask, trainable, deltas, stats, weights):
  """The aggregator API before issue 11."""
  from fedalign.federated.algorithms import make_algorithm

  alg = make_algorithm(config, trainable, NUM_CLIENTS)
  state = alg.aggregator.init(params)
  if alg.init_client_state is not None:  # SCAFFOLD: fixed control-variate changes
    stats = dict(stats, _client_state_delta=jax.tree.map(lambda d: 3.0 * d, deltas))
  agg = jax.jit(alg.aggregator.aggregate)
  for w in weights:
    params, state, _ = agg(state, params, deltas, stats, w)
  return params


ENGINE_CASES = ("fedavg", "scaffold", "fedmoe_lora_adam", "fedalign_perm")


def build_round(config, task, params, mask, optimizer, num_clients):
  """The engine API since issue 11."""
  from fedalign.algorithms import make_algorithm
  from fedalign.federated.client import make_client_update
  from fedalign.federated.round import init_server_state, make_round_fn

  alg = make_algorithm(config, partition(params, mask)[0], num_clients)
  cu = make_client_update(task, alg, optimizer)
  rf = jax.jit(make_round_fn(cu, alg, mask, seed=0))
  return rf, init_server_state(params, alg, mask, num_clients)


def aggregate_rounds(config, params, mask, trainable, deltas, stats, weights):
  """The aggregator API since issue 11 (client-state changes as an explicit argument)."""
  from fedalign.algorithms import make_algorithm

  alg = make_algorithm(config, trainable, NUM_CLIENTS)
  state = alg.aggregator.init(params)
  cs_deltas = None
  if alg.init_client_state is not None:
    cs_deltas = jax.tree.map(lambda d: 3.0 * d, deltas)
  agg = jax.jit(alg.aggregator.aggregate)
  for w in weights:
    params, state, _ = agg(state, params, deltas, stats, w, cs_deltas)
  return params


if __name__ == "__main__":
  out = {}
  for case in CASES:
    for key, value in run_aggregator_case(case, aggregate_rounds_v1).items():
      out[f"agg|{case}|{key}"] = value
    if case in ENGINE_CASES:
      for key, value in run_case(case, build_round_v1).items():
        out[f"engine|{case}|{key}"] = value
    print(case)
  GOLDEN.parent.mkdir(exist_ok=True)
  np.savez_compressed(GOLDEN, **out)
  print(GOLDEN, len(out))
