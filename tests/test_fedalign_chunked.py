"""FedAlignConfig.pairwise_chunk_size: the chunked pairwise gate equals the all-at-once one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedalign.algorithms.fedalign import (
    FedAlignConfig,
    as_fedalign_config,
    fedalign_aggregator,
    pairwise_gate,
)
from fedalign.models.routing import routing_stats

C, E, D, F, K, T = 5, 4, 3, 2, 2, 12  # 5 clients: chunks of 2 leave a padded last chunk
BLOCK = "layer/moe"


def problem(seed=0):
  """Random params/deltas and consistent stats from routing_stats on random router probs."""
  rng = np.random.default_rng(seed)
  params = {
      "embed": rng.normal(size=(3, D)),
      "layer": {
          "moe": {
              "router": {"kernel": rng.normal(size=(D, E)), "bias": 0.1 * rng.normal(size=(E,))},
              "experts": {
                  "wi_0": rng.normal(size=(E, D, F)),
                  "wi_1": rng.normal(size=(E, D, F)),
                  "wo": rng.normal(size=(E, F, D)),
              },
          }
      },
  }
  deltas = jax.tree.map(lambda p: 0.1 * rng.normal(size=(C,) + p.shape), params)
  stats = []
  for i in range(C):
    probs = jax.nn.softmax(jnp.asarray(2.0 * rng.normal(size=(T, E))), axis=-1)
    top = jnp.argsort(-probs, axis=-1)[:, :K]
    x = jnp.asarray(rng.normal(size=(T, D)))
    mask = jnp.asarray(np.arange(T) < T - i)  # clients see different token counts
    stats.append(routing_stats(probs, top, x, mask))
  stats = {BLOCK: jax.tree.map(lambda *xs: jnp.stack(xs), *stats)}
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  weights = jnp.asarray([10.0, 20.0, 0.0, 5.0, 7.0])  # client 2 excluded
  return f32(params), f32(deltas), stats, weights


def aggregate(cfg):
  params, deltas, stats, weights = problem()
  agg = fedalign_aggregator(cfg)
  return jax.jit(agg.aggregate)(agg.init(params), params, deltas, stats, weights)


def test_pairwise_gate_chunks_equal_all_at_once():
  rng = np.random.default_rng(1)
  mu = jnp.asarray(rng.normal(size=(7, E, D)), jnp.float32)
  kernels = jnp.asarray(rng.normal(size=(7, D, E)), jnp.float32)
  biases = jnp.asarray(rng.normal(size=(7, E)), jnp.float32)
  full = pairwise_gate(mu, kernels, biases)
  assert full.shape == (7, 7, E)
  for chunk in (1, 2, 3, 7, 100):
    np.testing.assert_allclose(
        pairwise_gate(mu, kernels, biases, chunk), full, rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_chunked_aggregate_equals_unchunked(chunk):
  base = aggregate(FedAlignConfig(detailed_diagnostics=True))
  chunked = aggregate(FedAlignConfig(detailed_diagnostics=True, pairwise_chunk_size=chunk))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(chunked)):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-6
    )
  scores = base[2][f"{BLOCK}/S"]
  assert np.all(np.isfinite(scores)) and np.any(scores > 0)


def test_chunk_size_is_ignored_by_other_variants():
  for kw in ({"pairwise": False}, {"semantic_similarity": "centroid_cosine"}):
    a = aggregate(FedAlignConfig(**kw))
    b = aggregate(FedAlignConfig(pairwise_chunk_size=2, **kw))
    jax.tree.map(np.testing.assert_array_equal, a[0], b[0])


@pytest.mark.parametrize("bad", [-1, 2.5])
def test_bad_chunk_size_raises(bad):
  with pytest.raises(ValueError, match="pairwise_chunk_size"):
    FedAlignConfig(pairwise_chunk_size=bad)


def test_chunk_size_zero_means_all_at_once():
  assert FedAlignConfig(pairwise_chunk_size=0).pairwise_chunk_size is None


def test_chunk_size_from_mapping():
  assert as_fedalign_config({"pairwise_chunk_size": 16}).pairwise_chunk_size == 16
