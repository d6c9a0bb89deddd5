"""A synthetic MoE setting with ground-truth expert roles (issue 13, the mechanism benchmark).

On real text at CPU scale experts have no recognisable roles, so router/expert misalignment
cannot be measured. Here it can:

* a :class:`Teacher` draws inputs from K Gaussian clusters in D dimensions; each cluster has its
  own random linear map to C class logits (cluster-specific targets), so one expert per
  cluster is the natural solution;
* a student MoE (:func:`init_student`, :func:`student_forward`) in fedalign's parameter layout
  (``layer_i/moe/{router/kernel (D, E), experts/{wi (E, D, F), wo (E, F, D)}}``, a linear
  ``head``), residual MoE blocks with top-k routing and :func:`fedalign.models.routing.
  routing_stats` per block, so every aggregator of :mod:`fedalign.algorithms` runs unchanged;
* :class:`MixtureTask` is the engine's task (``loss(params, batch, rng) -> (loss, aux)``);
* :func:`pretrain` trains the student centrally on all clusters until each expert serves one
  cluster (:func:`cluster_expert_mi` measures it against log K);
* the metrics of the benchmark: accuracy, routing accuracy against the pre-trained roles,
  cross-client routing disagreement.

Example:
  >>> t = Teacher.create(0, num_clusters=4, dim=8, num_classes=3)
  >>> x, y, k = t.sample(np.random.default_rng(0), 5)
  >>> x.shape, y.shape, k.shape
  ((5, 8), (5,), (5,))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedalign.metrics.routing_metrics import expert_specialization_mi
from fedalign.models.routing import routing_stats

PyTree = Any


# ============================================================================================
# Teacher.
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Teacher:
  """K Gaussian input clusters, each with its own linear target map.

  Attributes:
    centers: (K, D) cluster means.
    maps: (K, D, C) per-cluster target maps: label = argmax((x - center_k) @ maps[k]).
    noise: std of the isotropic within-cluster noise.
  """

  centers: np.ndarray
  maps: np.ndarray
  noise: float = 1.0

  @classmethod
  def create(
      cls,
      seed: int,
      num_clusters: int = 8,
      dim: int = 16,
      num_classes: int = 4,
      separation: float = 3.0,
      noise: float = 1.0,
  ) -> "Teacher":
    """A random teacher (deterministic in ``seed``)."""
    rng = np.random.default_rng([seed, 7])
    centers = separation * rng.normal(size=(num_clusters, dim))
    maps = rng.normal(size=(num_clusters, dim, num_classes))
    return cls(centers.astype(np.float32), maps.astype(np.float32), noise)

  @property
  def num_clusters(self) -> int:
    return self.centers.shape[0]

  def shifted(self, seed: int, scale: float) -> "Teacher":
    """The same clusters with target maps moved by ``scale`` * N(0, 1) (a new task to
    fine-tune on: the federated phase's targets differ from the pre-training ones)."""
    rng = np.random.default_rng([seed, 11])
    maps = self.maps + scale * rng.normal(size=self.maps.shape).astype(np.float32)
    return dataclasses.replace(self, maps=maps)

  def label(self, x: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Labels of inputs ``x`` (N, D) drawn from ``clusters`` (N,)."""
    logits = np.einsum("nd,ndc->nc", x - self.centers[clusters], self.maps[clusters])
    return np.argmax(logits, axis=-1).astype(np.int32)

  def sample(
      self, rng: np.random.Generator, n: int, probs: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` examples (x (n, D) float32, y (n,) int32, cluster (n,) int32); clusters drawn
    from ``probs`` (K,) (None = uniform)."""
    k = self.num_clusters
    clusters = rng.choice(k, size=n, p=probs).astype(np.int32)
    x = self.centers[clusters] + self.noise * rng.normal(size=(n, self.centers.shape[1]))
    x = x.astype(np.float32)
    return x, self.label(x, clusters), clusters

  def balanced(self, rng: np.random.Generator, per_cluster: int):
    """``per_cluster`` examples of every cluster (a balanced test or validation set)."""
    probs = None
    clusters = np.repeat(np.arange(self.num_clusters), per_cluster).astype(np.int32)
    x = self.centers[clusters] + self.noise * rng.normal(
        size=(len(clusters), self.centers.shape[1])
    )
    x = x.astype(np.float32)
    del probs
    return x, self.label(x, clusters), clusters


# ============================================================================================
# Student MoE.
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class StudentConfig:
  """Sizes of the student MoE (``num_layers`` residual MoE blocks and a linear head)."""

  dim: int = 16
  num_experts: int = 8
  hidden: int = 32
  num_layers: int = 2
  num_classes: int = 4
  top_k: int = 1


def block_paths(cfg: StudentConfig) -> list[str]:
  """The MoE block paths of the student, e.g. ``['layer_0/moe', 'layer_1/moe']``."""
  return [f"layer_{i}/moe" for i in range(cfg.num_layers)]


def init_student(cfg: StudentConfig, key: jax.Array) -> PyTree:
  """Random student params in fedalign's MoE layout.

  >>> p = init_student(StudentConfig(num_layers=1), jax.random.key(0))
  >>> p['layer_0']['moe']['experts']['wi'].shape, p['head']['kernel'].shape
  ((8, 16, 32), (16, 4))
  """
  d, e, f = cfg.dim, cfg.num_experts, cfg.hidden
  params: dict[str, Any] = {}
  keys = jax.random.split(key, cfg.num_layers + 1)
  for i in range(cfg.num_layers):
    kr, ki, ko = jax.random.split(keys[i], 3)
    params[f"layer_{i}"] = {
        "moe": {
            "router": {"kernel": 0.1 * jax.random.normal(kr, (d, e)) / np.sqrt(d)},
            "experts": {
                "wi": jax.random.normal(ki, (e, d, f)) / np.sqrt(d),
                "wo": 0.5 * jax.random.normal(ko, (e, f, d)) / np.sqrt(f),
            },
        }
    }
  params["head"] = {
      "kernel": jax.random.normal(keys[-1], (d, cfg.num_classes)) / np.sqrt(d),
      "bias": jnp.zeros((cfg.num_classes,)),
  }
  return params


def moe_block(p: Mapping[str, Any], h: jax.Array, top_k: int, mask: jax.Array | None = None):
  """One residual MoE block: ``h + sum_{e in K(h)} g_e(h) expert_e(h)`` (every expert computed
  densely; exact at this size).

  Returns (output (N, D), routing stats, load-balance loss, router z-loss, probs (N, E),
  top-k indices (N, k)).
  """
  logits = jnp.asarray(h, jnp.float32) @ p["router"]["kernel"].astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  top_val, top_idx = jax.lax.top_k(probs, top_k)
  e = probs.shape[-1]
  combine = jnp.sum(jax.nn.one_hot(top_idx, e) * top_val[..., None], axis=-2)  # (N, E)
  hid = jax.nn.relu(jnp.einsum("nd,edf->nef", h, p["experts"]["wi"]))
  out = jnp.einsum("nef,efd->ned", hid, p["experts"]["wo"])
  y = jnp.einsum("ne,ned->nd", combine, out)
  stats = routing_stats(probs, top_idx, h, mask)
  valid = jnp.ones(probs.shape[:1]) if mask is None else mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(valid), 1.0)
  frac = jnp.sum(jax.nn.one_hot(top_idx[:, 0], e) * valid[:, None], axis=0) / n
  mean_p = jnp.sum(probs * valid[:, None], axis=0) / n
  lb = e * jnp.sum(frac * mean_p)
  z = jnp.sum(valid * jax.nn.logsumexp(logits, axis=-1) ** 2) / n
  return h + y, stats, lb, z, probs, top_idx


def student_forward(
    params: PyTree, x: jax.Array, cfg: StudentConfig, mask: jax.Array | None = None
) -> tuple[jax.Array, dict[str, Any]]:
  """Class logits (N, C) and aux: 'routing', 'load_balance_loss', 'router_z_loss' (means over
  blocks), 'router_inputs' ({block: {'x', 'mask'}}), 'top_idx' ({block: (N, k)}).

  >>> cfg = StudentConfig(dim=4, num_experts=2, hidden=3, num_layers=2)
  >>> logits, aux = student_forward(init_student(cfg, jax.random.key(0)), jnp.ones((5, 4)), cfg)
  >>> logits.shape, sorted(aux['routing'])
  ((5, 4), ['layer_0/moe', 'layer_1/moe'])
  """
  h = jnp.asarray(x, jnp.float32)
  routing, inputs, tops = {}, {}, {}
  lbs, zs = [], []
  valid = jnp.ones(h.shape[:1], bool) if mask is None else mask.astype(bool)
  for i, path in enumerate(block_paths(cfg)):
    inputs[path] = {"x": h, "mask": valid}
    h, stats, lb, z, _, top_idx = moe_block(params[f"layer_{i}"]["moe"], h, cfg.top_k, mask)
    routing[path] = stats
    tops[path] = top_idx
    lbs.append(lb)
    zs.append(z)
  logits = h @ params["head"]["kernel"] + params["head"]["bias"]
  aux = {
      "routing": routing,
      "load_balance_loss": jnp.mean(jnp.stack(lbs)),
      "router_z_loss": jnp.mean(jnp.stack(zs)),
      "router_inputs": inputs,
      "top_idx": tops,
  }
  return logits, aux


class MixtureTask:
  """The engine's task on teacher data: cross-entropy of the student's class logits.

  Batch: ``x`` (B, D) float32, ``y`` (B,) int32, optional ``mask`` (B,) bool. ``aux`` holds
  what the engine and every algorithm read: ``routing`` ({block: stats}),
  ``load_balance_loss``, ``router_z_loss``, and ``router_inputs`` ({block: {'x' (B, D) float32
  router inputs, 'mask' (B,) bool}}) for regularizers that condition on the router's input.

  >>> cfg = StudentConfig(dim=4, num_experts=2, hidden=3, num_layers=1)
  >>> batch = {'x': jnp.ones((3, 4)), 'y': jnp.zeros((3,), jnp.int32)}
  >>> loss, aux = MixtureTask(cfg).loss(init_student(cfg, jax.random.key(0)), batch, None)
  >>> bool(loss > 0), aux['router_inputs']['layer_0/moe']['x'].shape
  (True, (3, 4))
  """

  def __init__(self, cfg: StudentConfig):
    self.cfg = cfg

  def loss(
      self, params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array
  ) -> tuple[jax.Array, dict[str, Any]]:
    del rng
    mask = batch.get("mask")
    logits, aux = student_forward(params, batch["x"], self.cfg, mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    w = jnp.ones_like(ce) if mask is None else mask.astype(jnp.float32)
    loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
    aux = {k: v for k, v in aux.items() if k != "top_idx"}
    return loss, aux


# ============================================================================================
# Central pre-training.
# ============================================================================================


def pretrain(
    cfg: StudentConfig,
    teacher: Teacher,
    seed: int,
    steps: int = 1500,
    batch_size: int = 256,
    learning_rate: float = 3e-3,
    load_balance_coef: float = 0.01,
    router_supervision: float = 0.0,
) -> PyTree:
  """Central training on all clusters (uniform), Adam, one jitted ``lax.scan``.

  ``router_supervision`` > 0 adds that weight times the cross-entropy of every block's router
  logits against expert = cluster index (requires E >= K): a shortcut to the one-expert-per-
  cluster solution; 0 (default) lets the load-balancing loss find the roles.
  """
  rng = np.random.default_rng([seed, 3])
  x, y, k = teacher.sample(rng, steps * batch_size)
  data = {
      "x": x.reshape(steps, batch_size, -1),
      "y": y.reshape(steps, batch_size),
      "k": k.reshape(steps, batch_size),
  }
  params = init_student(cfg, jax.random.key(seed))
  opt = optax.adam(learning_rate)
  task = MixtureTask(cfg)

  def loss_fn(p, b):
    loss, aux = task.loss(p, b, None)
    loss = loss + load_balance_coef * aux["load_balance_loss"]
    if router_supervision > 0:
      for i, path in enumerate(block_paths(cfg)):
        h = aux["router_inputs"][path]["x"]
        logits = h @ p[f"layer_{i}"]["moe"]["router"]["kernel"]
        sup = optax.softmax_cross_entropy_with_integer_labels(logits, b["k"])
        loss = loss + router_supervision * jnp.mean(sup)
    return loss

  @jax.jit
  def train(params, data):
    def step(carry, b):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p, b)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), data)
    return params, losses

  params, _ = train(params, data)
  return params


# ============================================================================================
# Metrics.
# ============================================================================================


def routing_table(params: PyTree, cfg: StudentConfig, x: jax.Array, clusters: np.ndarray, k: int):
  """(L, K, E) counts: tokens of cluster k whose block-l top-1 expert is e."""
  _, aux = student_forward(params, x, cfg)
  tables = []
  for path in block_paths(cfg):
    top = np.asarray(aux["top_idx"][path][:, 0])
    t = np.zeros((k, cfg.num_experts))
    np.add.at(t, (clusters, top), 1.0)
    tables.append(t)
  return np.stack(tables)


def cluster_expert_mi(table: np.ndarray) -> float:
  """Mean over blocks of I(cluster; top-1 expert) in nats, from (L, K, E) counts."""
  return float(np.mean([float(expert_specialization_mi(jnp.asarray(t))) for t in table]))


def expert_roles(table: np.ndarray) -> np.ndarray:
  """(L, K) the expert that serves each cluster (argmax of the routing table)."""
  return np.argmax(table, axis=-1)


def accuracy(params: PyTree, cfg: StudentConfig, x: jax.Array, y: np.ndarray) -> float:
  """Top-1 accuracy of the student's class logits."""
  logits, _ = student_forward(params, x, cfg)
  return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def routing_accuracy(
    params: PyTree, cfg: StudentConfig, x: jax.Array, clusters: np.ndarray, roles: np.ndarray
) -> float:
  """Fraction of (token, block) whose top-1 expert is the pre-trained role of its cluster."""
  _, aux = student_forward(params, x, cfg)
  hits = [
      np.asarray(aux["top_idx"][path][:, 0]) == roles[l][clusters]
      for l, path in enumerate(block_paths(cfg))
  ]
  return float(np.mean(hits))


def routing_disagreement(client_params: PyTree, cfg: StudentConfig, x: jax.Array) -> float:
  """Fraction of (token, block, client pair) where two clients' local models (a leading
  client axis on every leaf) send the token to different top-1 experts (expert indices as
  the clients hold them: what index-wise averaging sees)."""
  tops = jax.vmap(lambda p: student_forward(p, x, cfg)[1]["top_idx"])(client_params)
  vals = []
  for path in block_paths(cfg):
    t = np.asarray(tops[path][..., 0])  # (C, N)
    c = t.shape[0]
    if c < 2:
      return 0.0
    diff = t[:, None, :] != t[None, :, :]
    off = ~np.eye(c, dtype=bool)
    vals.append(diff[off].mean())
  return float(np.mean(vals))


def dirichlet_mixtures(seed: int, num_clients: int, num_clusters: int, alpha: float) -> np.ndarray:
  """(N, K) per-client cluster proportions drawn from Dirichlet(alpha) (non-IID clients).

  >>> dirichlet_mixtures(0, 3, 4, 0.1).sum(axis=1).round(6).tolist()
  [1.0, 1.0, 1.0]
  """
  rng = np.random.default_rng([seed, 5])
  p = rng.dirichlet(np.full(num_clusters, alpha), size=num_clients)
  p = np.maximum(p, 0.0)
  return p / p.sum(axis=1, keepdims=True)
