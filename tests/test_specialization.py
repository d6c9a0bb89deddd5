"""Expert specialization: per-class selection tables add up to the unmasked counts."""

import jax
import jax.numpy as jnp
import numpy as np

from fedalign.metrics.routing_metrics import expert_specialization_mi
from fedalign.metrics.specialization import make_expert_specialization_fn
from fedalign.models import MoEConfig, MoEDecoderLM, init_params


def test_class_tables_partition_the_selection_counts():
  cfg = MoEConfig(
      vocab_size=20,
      hidden_size=8,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=4,
  )
  module = MoEDecoderLM(cfg)
  params = init_params(cfg, 3)
  tokens = jax.random.randint(jax.random.key(1), (6, 5), 0, 20)
  mask = jnp.ones((6, 5), bool).at[0, 3:].set(False)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  routing_fn = lambda p, t, m: module.apply({"params": p}, t, m)[1]["routing"]
  mi, tables = make_expert_specialization_fn(routing_fn, 3)(params, tokens, mask, labels)
  # Causal attention: an example's tokens never see other rows, so masking other classes
  # leaves each example's routing as in the full pass.
  full = routing_fn(params, tokens, mask)
  for path, table in tables.items():
    assert table.shape == (3, 4)
    np.testing.assert_allclose(table.sum(0), full[path]["select_count"])
    np.testing.assert_allclose(table.sum(), 2 * int(mask.sum()))  # top-2
    np.testing.assert_allclose(mi[path], expert_specialization_mi(table), rtol=1e-6)
