"""Mixture-of-Experts block: float32 top-k router, stacked experts, shared experts.

Parameter layout (MaxText / vmoe / flaxformer convention, see docs/architecture.md)::

    router:  kernel (D, E) [, bias (E,)]          float32
    experts: wi_0 (E, D, F), wi_1 (E, D, F), wo (E, F, D)
             [+ LoRA: wi_0_lora_a (E, D, r), wi_0_lora_b (E, r, F), ..., wo_lora_b (E, r, D)]
    shared_expert:      wi_0/wi_1/wo {kernel}      (optional, Qwen2-MoE / DeepSeek-MoE)
    shared_expert_gate: kernel (D, 1)              (optional, Qwen2-MoE)

Every leaf under ``experts`` has the expert axis first, so permuting that axis together with
the router kernel's last axis leaves the block's function unchanged.

Expert compute (``MoEConfig.moe_impl``): ``'sparse'`` (default) runs each token's top-k experts
only, dropless in blocks of ``moe_block_size`` rows of one expert each (:func:`sparse_layout`)
or, with ``capacity_factor`` > 0, as capacity dispatch into (E, C, D) buffers
(:func:`capacity_slots`); ``'dense'`` runs every expert on every token (the exact reference);
``'ragged'`` uses ``jax.lax.ragged_dot`` (one model only: not vmappable over clients).

Expert parallelism (``MoEConfig.expert_shards`` = S > 1, dropless ``'sparse'``): the E experts
form S contiguous shards of E / S; each shard lays out only the rows routed to its own experts
(:func:`sharded_sparse_layout`) and multiplies them with its own (E / S, ...) weights, and the
S partial outputs are summed. With the expert leaves sharded over a mesh's ``'experts'`` axis
(``train.mesh_shape``), XLA partitions the shard axis: every device computes its experts' rows
with the weights it holds, and the only collective is a sum of the (tokens, D) outputs.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedalign.models.config import MoEConfig
from fedalign.models.layers import LoRADense, dtype_of
from fedalign.models.routing import routing_stats

Array = jax.Array
EXPERT_WEIGHTS = ("wi_0", "wi_1", "wo")


class Router(nn.Module):
  """Linear router in float32: probabilities, top-k weights and indices."""

  num_experts: int
  top_k: int
  use_bias: bool = False
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array, Array]:
    kernel = self.param(
        "kernel",
        nn.initializers.normal(self.init_std),
        (x.shape[-1], self.num_experts),
        jnp.float32,
    )
    logits = x.astype(jnp.float32) @ kernel
    if self.use_bias:
      logits = logits + self.param("bias", nn.initializers.zeros, (self.num_experts,), jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_w, top_idx = jax.lax.top_k(probs, self.top_k)
    if self.norm_topk_prob:
      top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    top_w = top_w * self.routed_scaling_factor
    return logits, probs, top_w, top_idx


class Experts(nn.Module):
  """E gated (SwiGLU) experts stored as stacked tensors, with optional stacked LoRA."""

  num_experts: int
  intermediate_size: int
  lora_rank: int = 0
  lora_alpha: float = 16.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02

  def weight_shapes(self, d_model: int) -> dict[str, tuple[int, int, int]]:
    """Stacked expert weights (E, in, out); subclasses (Switch) override only this."""
    e, f = self.num_experts, self.intermediate_size
    return {"wi_0": (e, d_model, f), "wi_1": (e, d_model, f), "wo": (e, f, d_model)}

  def setup_params(self, d_model: int) -> dict[str, Array]:
    e, r = self.num_experts, self.lora_rank
    shapes = self.weight_shapes(d_model)
    w = {
        name: self.param(name, nn.initializers.normal(self.init_std), shape, self.param_dtype)
        for name, shape in shapes.items()
    }
    if r > 0:
      for name, (_, d_in, d_out) in shapes.items():
        w[f"{name}_lora_a"] = self.param(
            f"{name}_lora_a",
            nn.initializers.normal(1.0 / d_in**0.5),
            (e, d_in, r),
            self.param_dtype,
        )
        w[f"{name}_lora_b"] = self.param(
            f"{name}_lora_b", nn.initializers.zeros, (e, r, d_out), self.param_dtype
        )
    return jax.tree.map(lambda a: a.astype(self.dtype), w)

  def _proj(self, w: dict[str, Array], name: str, x: Array, spec: str) -> Array:
    """x @ W_e (+ LoRA) with an einsum spec such as 'ecd,edf->ecf'."""
    y = jnp.einsum(spec, x, w[name])
    if self.lora_rank > 0:
      lhs, rhs_out = spec.split("->")
      a_in, w_spec = lhs.split(",")
      # x @ A: replace the output letter of W with 'r'; then (.. r) @ B.
      a_spec = f"{a_in},{w_spec[:-1]}r->{rhs_out[:-1]}r"
      b_spec = f"{rhs_out[:-1]}r,{w_spec[0]}r{w_spec[-1]}->{rhs_out}"
      xa = jnp.einsum(a_spec, x, w[f"{name}_lora_a"])
      y = y + (self.lora_alpha / self.lora_rank) * jnp.einsum(b_spec, xa, w[f"{name}_lora_b"])
    return y

  def _block_proj(self, w: dict[str, Array], name: str, x: Array, block_expert: Array) -> Array:
    """Per-block matmul x (N, B, in) @ W[block_expert] (N, in, out) (+ LoRA, gathered alike)."""
    y = _gathered_matmul(x, w[name], block_expert)
    if self.lora_rank > 0:
      xa = _gathered_matmul(x, w[f"{name}_lora_a"], block_expert)
      y = y + (self.lora_alpha / self.lora_rank) * _gathered_matmul(
          xa, w[f"{name}_lora_b"], block_expert
      )
    return y

  def _ragged_proj(self, w: dict[str, Array], name: str, x: Array, group_sizes: Array) -> Array:
    """Grouped matmul of expert-sorted tokens (+ LoRA): ``jax.lax.ragged_dot``."""
    y = jax.lax.ragged_dot(x, w[name], group_sizes)
    if self.lora_rank > 0:
      xa = jax.lax.ragged_dot(x, w[f"{name}_lora_a"], group_sizes)
      y = y + (self.lora_alpha / self.lora_rank) * jax.lax.ragged_dot(
          xa, w[f"{name}_lora_b"], group_sizes
      )
    return y

  @nn.compact
  def __call__(
      self,
      x: Array,
      mode: str = "dense",
      group_sizes: Array | None = None,
      block_expert: Array | None = None,
  ) -> Array:
    """Applies the experts.

    Modes:
      * ``dense``: every expert on every token, x (T, D) -> (T, E, D);
      * ``grouped``: expert-major inputs x (E, C, D) -> (E, C, D) (capacity dispatch);
      * ``sparse``: blocks of rows of one expert each, x (N, B, D) with ``block_expert`` (N,)
        -> (N, B, D) (block-sparse dropless dispatch, :func:`sparse_layout`);
      * ``sharded``: the same per expert shard, x (S, N, B, D) with shard-local
        ``block_expert`` (S, N) and each shard's own (E / S, ...) weights
        (:func:`sharded_sparse_layout`);
      * ``ragged``: tokens sorted by expert x (N, D) with ``group_sizes`` (E,) -> (N, D),
        a grouped matmul (``jax.lax.ragged_dot``).
    """
    w = self.setup_params(x.shape[-1])
    x = x.astype(self.dtype)
    if mode in ("sparse", "sharded"):

      def mlp(ws, xs, be):
        proj = lambda name, inp: self._block_proj(ws, name, inp, be)
        return proj("wo", nn.silu(proj("wi_0", xs)) * proj("wi_1", xs))

      if mode == "sparse":
        return mlp(w, x, block_expert)
      s = x.shape[0]  # (E, ...) -> (S, E / S, ...): shard s holds its contiguous experts
      ws = jax.tree.map(lambda a: a.reshape((s, a.shape[0] // s) + a.shape[1:]), w)
      return jax.vmap(mlp)(ws, x, block_expert)
    if mode == "ragged":
      proj = lambda name, inp: self._ragged_proj(w, name, inp, group_sizes)
      return proj("wo", nn.silu(proj("wi_0", x)) * proj("wi_1", x))
    if mode == "grouped":
      spec_in, spec_out = "ecd,edf->ecf", "ecf,efd->ecd"
    elif mode == "dense":
      spec_in, spec_out = "td,edf->tef", "tef,efd->ted"
    else:
      raise ValueError(
          f"Experts mode={mode!r}: expected 'dense', 'grouped', 'sparse', 'sharded' or 'ragged'."
      )
    h = nn.silu(self._proj(w, "wi_0", x, spec_in)) * self._proj(w, "wi_1", x, spec_in)
    return self._proj(w, "wo", h, spec_out)


class MLP(nn.Module):
  """Gated dense MLP (SwiGLU): wo(silu(wi_0 x) * wi_1 x)."""

  intermediate_size: int
  lora_rank: int = 0
  lora_alpha: float = 16.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(
        lora_rank=self.lora_rank,
        lora_alpha=self.lora_alpha,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        init_std=self.init_std,
    )
    gate = LoRADense(self.intermediate_size, name="wi_0", **kw)(x)
    up = LoRADense(self.intermediate_size, name="wi_1", **kw)(x)
    return LoRADense(x.shape[-1], name="wo", **kw)(nn.silu(gate) * up)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """ceil(capacity_factor * tokens * k / E), at least 1."""
  return max(1, int(math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def capacity_slots(
    top_idx: Array, valid: Array, num_experts: int, capacity: int
) -> tuple[Array, Array]:
  """Switch/GShard capacity positions: each (token, choice)'s slot in its expert's buffer.

  Slots are filled in priority order: every token's first choice before any second choice,
  tokens in sequence order within a choice; padded tokens take no room. Linear in the number
  of tokens (no (T, E, C) tensor).

  Returns:
    slot (T, k) int32 in [0, capacity] (``capacity`` = dropped) and keep (T, k) bool.

  >>> slot, keep = capacity_slots(jnp.array([[0], [0], [1]]), jnp.ones(3), 2, capacity=1)
  >>> slot[:, 0].tolist(), keep[:, 0].tolist()
  ([0, 1, 0], [True, False, True])
  """
  t, k = top_idx.shape
  onehot = jax.nn.one_hot(top_idx, num_experts, dtype=jnp.int32) * (
      valid[:, None, None] > 0
  ).astype(jnp.int32)
  flat = jnp.swapaxes(onehot, 0, 1).reshape(k * t, num_experts)  # choice-major order
  position = jnp.sum((jnp.cumsum(flat, axis=0) - 1) * flat, axis=-1)
  keep = (jnp.sum(flat, axis=-1) > 0) & (position < capacity)
  slot = jnp.where(keep, position, capacity)
  return (
      jnp.swapaxes(slot.reshape(k, t), 0, 1).astype(jnp.int32),
      jnp.swapaxes(keep.reshape(k, t), 0, 1),
  )


def capacity_dispatch(
    top_idx: Array, top_w: Array, valid: Array, num_experts: int, capacity: int
) -> tuple[Array, Array]:
  """The one-hot form of :func:`capacity_slots` (what the Switch model uses per batch row).

  Returns:
    dispatch (T, E, C) 0/1 and combine (T, E, C) = dispatch * top-k weight.
  """
  slot, _ = capacity_slots(top_idx, valid, num_experts, capacity)
  slots = (
      jax.nn.one_hot(top_idx, num_experts, dtype=jnp.float32)[..., None]
      * jax.nn.one_hot(slot, capacity, dtype=jnp.float32)[..., None, :]
  )  # (T, k, E, C)
  return jnp.sum(slots, axis=1), jnp.sum(slots * top_w[:, :, None, None], axis=1)


def scatter_to_experts(
    tokens: Array, top_idx: Array, slot: Array, num_experts: int, capacity: int
) -> Array:
  """(T, D) tokens -> (E, C, D) expert buffers (dropped choices, slot == C, are skipped)."""
  t, k = top_idx.shape
  upd = jnp.broadcast_to(tokens[:, None, :], (t, k, tokens.shape[-1]))
  buf = jnp.zeros((num_experts, capacity, tokens.shape[-1]), tokens.dtype)
  return buf.at[top_idx, slot].set(upd, mode="drop")


def gather_from_experts(expert_out: Array, top_idx: Array, slot: Array, weight: Array) -> Array:
  """(E, C, D) expert outputs -> (T, D): the weighted sum over each token's kept choices."""
  y = expert_out.at[top_idx, slot].get(mode="fill", fill_value=0)  # (T, k, D)
  return jnp.einsum("tkd,tk->td", y, weight.astype(y.dtype))


def sparse_blocks(num_rows: int, num_experts: int, block_size: int) -> tuple[int, int]:
  """(rows per block, number of blocks) of the block-sparse layout of ``num_rows`` routed rows.

  Rows per block ``b = min(block_size, num_rows)``. An expert with c >= 1 rows takes
  ceil(c / b) = floor((c - 1) / b) + 1 blocks; over the n' experts that receive rows this sums
  to at most n' + floor((rows - n') / b), which grows with n' <= n = min(E, rows). So
  ``floor((rows - n) / b) + n`` blocks (a static number; reached when n experts get
  1 mod b rows each) hold every row whatever the routing: no row is ever dropped. The padded
  work is ``blocks * b`` rows, at most ``rows + n * (b - 1)``.

  >>> sparse_blocks(3072, 8, 64)  # the default model: 1,536 tokens x top-2, 8 experts
  (64, 55)
  >>> sparse_blocks(6, 4, 64)  # fewer rows than a block: one block per expert
  (6, 4)
  """
  b = max(1, min(int(block_size), num_rows))
  n = min(num_experts, num_rows)
  return b, max(1, (num_rows - n) // b + n)


def sparse_layout(
    top_idx: Array, num_experts: int, block_size: int, valid: Array | None = None
) -> tuple[Array, Array, Array]:
  """Block-sparse dropless layout of the routed (token, choice) rows.

  Rows are grouped by expert and each expert's group is padded up to a multiple of the block
  size, in a buffer of :func:`sparse_blocks` blocks of one expert each. Only one-hot counts, a
  scatter of int32 positions and comparisons: differentiable around it, vmappable, shardable.

  Args:
    top_idx: (T, k) expert of each (token, choice).
    num_experts: E.
    block_size: requested rows per block (see :func:`sparse_blocks`).
    valid: optional (T, k) bool: only these rows are laid out (the others get dest = the
      buffer's size, out of range); the buffer keeps the size for T * k rows.

  Returns:
    dest (T, k) int32: each (token, choice)'s row in the padded buffer (all distinct);
    src (blocks * b,) int32: the token held by each buffer row (T for a padding row);
    block_expert (blocks,) int32: the expert of each block (E - 1 for trailing unused blocks,
    whose rows are all padding).

  >>> dest, src, block_expert = sparse_layout(jnp.array([[0], [1], [0]]), 2, block_size=2)
  >>> dest[:, 0].tolist(), src.tolist(), block_expert.tolist()
  ([0, 2, 1], [0, 2, 1, 3], [0, 1])
  """
  t, k = top_idx.shape
  rows = t * k
  b, nb = sparse_blocks(rows, num_experts, block_size)
  flat = top_idx.reshape(rows)
  onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)  # (T*k, E)
  if valid is not None:
    onehot = onehot * valid.reshape(rows, 1).astype(jnp.int32)
  rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # row within its expert
  padded = -(-jnp.sum(onehot, axis=0) // b) * b  # (E,) rows per expert, padded to blocks
  end = jnp.cumsum(padded)
  dest = ((end - padded)[flat] + rank).astype(jnp.int32)
  if valid is not None:
    dest = jnp.where(valid.reshape(rows), dest, nb * b)
  src = (
      jnp.full((nb * b,), t, jnp.int32)
      .at[dest]
      .set(jnp.arange(rows, dtype=jnp.int32) // k, mode="drop")
  )
  first_row = jnp.arange(nb, dtype=jnp.int32) * b
  block_expert = jnp.sum(end[None, :] <= first_row[:, None], axis=-1)
  return dest.reshape(t, k), src, jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32)


def sharded_sparse_layout(
    top_idx: Array, num_experts: int, shards: int, block_size: int
) -> tuple[Array, Array, Array]:
  """:func:`sparse_layout` per expert shard: shard s holds experts [s E / S, (s + 1) E / S).

  Each shard's buffer is laid out over its own E / S experts from the rows routed to them
  (its block experts are shard-local indices); the buffer keeps room for every row (any
  routing is dropless), so a shard's padded work is at most one device's whole layout.

  Returns:
    dest (S, T, k): each (token, choice)'s row in its shard's buffer, out of range in the
    other shards; src (S, rows): the token of each buffer row (T = padding);
    block_expert (S, blocks): the local expert of each block.

  >>> dest, src, block_expert = sharded_sparse_layout(jnp.array([[0], [3], [1]]), 4, 2, 2)
  >>> dest[:, :, 0].tolist(), src.tolist(), block_expert.tolist()
  ([[0, 4, 2], [4, 0, 4]], [[0, 3, 2, 3], [1, 3, 3, 3]], [[0, 1], [1, 1]])
  """
  per = num_experts // shards
  shard, local = top_idx // per, top_idx % per
  return jax.vmap(lambda s: sparse_layout(local, per, block_size, valid=shard == s))(
      jnp.arange(shards)
  )


@jax.custom_vjp
def _gathered_matmul(x: Array, w: Array, idx: Array) -> Array:
  """x (N, B, in) @ w[idx] (N, in, out): one matmul per block with its expert's weights.

  The backward pass gathers the (N, in, out) block weights again instead of keeping the
  forward pass's copy (it is ~N / E times the expert weights: 1.8 GB per projection and
  layer at DeepSeek-MoE-16B's sizes, float32).
  """
  return jnp.einsum("nbd,ndf->nbf", x, w[idx])


def _gathered_matmul_fwd(x: Array, w: Array, idx: Array) -> tuple[Array, tuple]:
  return _gathered_matmul(x, w, idx), (x, w, idx)


def _gathered_matmul_bwd(res: tuple, dy: Array) -> tuple[Array, Array, None]:
  x, w, idx = res
  # The index depends on the cotangent (it equals idx unless dy's first entry is NaN, and
  # then the gradient is NaN anyway), so XLA can neither merge this gather with the forward
  # one nor hoist it into the forward pass; either would keep every layer's gathered weights
  # alive until the backward pass (measured with XLA:CPU; jax.checkpoint and optimization
  # barriers did not prevent it).
  idx = jnp.where(jnp.isnan(dy.reshape(-1)[0]), 0, idx)
  dx = jnp.einsum("nbf,ndf->nbd", dy, w[idx])
  dw = jnp.zeros_like(w).at[idx].add(jnp.einsum("nbd,nbf->ndf", x, dy).astype(w.dtype))
  return dx.astype(x.dtype), dw, None


_gathered_matmul.defvjp(_gathered_matmul_fwd, _gathered_matmul_bwd)


class MoEBlock(nn.Module):
  """Routed experts (+ optional shared expert). Returns (output, routing stats, losses)."""

  config: MoEConfig

  @nn.compact
  def __call__(
      self, x: Array, mask: Array | None = None
  ) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    b, t, d = x.shape
    tokens = x.reshape(b * t, d)
    valid = (
        jnp.ones((b * t,), jnp.float32) if mask is None else mask.reshape(b * t).astype(jnp.float32)
    )
    logits, probs, top_w, top_idx = Router(
        cfg.num_experts,
        cfg.top_k,
        cfg.router_bias,
        cfg.norm_topk_prob,
        cfg.routed_scaling_factor,
        cfg.initializer_range,
        name="router",
    )(tokens)
    lora_r = cfg.lora_rank if "experts" in cfg.lora_targets else 0
    experts = Experts(
        cfg.num_experts,
        cfg.moe_intermediate_size,
        lora_r,
        cfg.lora_alpha,
        dtype,
        pdtype,
        cfg.initializer_range,
        name="experts",
    )
    e = cfg.num_experts
    if cfg.capacity_factor is not None:
      # Scatter into (E, C, D) buffers, grouped matmuls, gather back: linear in the tokens
      # (a one-hot (T, E, C) dispatch einsum would be quadratic: C grows with T).
      cap = expert_capacity(b * t, e, cfg.top_k, cfg.capacity_factor)
      slot, keep = capacity_slots(top_idx, valid, e, cap)
      expert_in = scatter_to_experts(tokens.astype(dtype), top_idx, slot, e, cap)
      expert_out = experts(expert_in, mode="grouped")
      out = gather_from_experts(expert_out, top_idx, slot, top_w * keep)
    elif cfg.moe_impl == "sparse" and cfg.expert_shards > 1:
      # Expert parallel: each shard's rows with its own experts' weights, outputs summed
      # (over the 'experts' mesh axis when the expert leaves are sharded over it).
      dest, src, block_expert = sharded_sparse_layout(
          top_idx, e, cfg.expert_shards, cfg.moe_block_size
      )
      rows = jax.vmap(lambda i: tokens.astype(dtype).at[i].get(mode="fill", fill_value=0))(src)
      s, nb = block_expert.shape
      y = experts(rows.reshape(s, nb, -1, d), mode="sharded", block_expert=block_expert)
      y = jax.vmap(lambda ys, i: ys.at[i].get(mode="fill", fill_value=0))(
          y.reshape(s, -1, d), dest
      )  # (S, T, k, D): zero where the row is another shard's
      out = jnp.sum(jnp.einsum("stkd,tk->std", y, top_w.astype(y.dtype)), axis=0)
    elif cfg.moe_impl == "sparse":
      # Block-sparse, dropless: rows grouped by expert into blocks of one expert each, one
      # batched matmul over the blocks, the top-k weighted sum gathered back.
      dest, src, block_expert = sparse_layout(top_idx, e, cfg.moe_block_size)
      x_blocks = tokens.astype(dtype).at[src].get(mode="fill", fill_value=0)
      y = experts(
          x_blocks.reshape(block_expert.shape[0], -1, d), mode="sparse", block_expert=block_expert
      ).reshape(-1, d)
      out = jnp.einsum("tkd,tk->td", y[dest], top_w.astype(y.dtype))
    elif cfg.moe_impl == "ragged":
      flat_idx = top_idx.reshape(-1)
      order = jnp.argsort(flat_idx, stable=True)
      token_of = order // cfg.top_k
      group_sizes = jnp.bincount(flat_idx, length=e).astype(jnp.int32)
      y_sorted = experts(tokens[token_of], mode="ragged", group_sizes=group_sizes)
      w_sorted = top_w.reshape(-1)[order].astype(y_sorted.dtype)
      out = jnp.zeros((b * t, d), y_sorted.dtype).at[token_of].add(y_sorted * w_sorted[:, None])
    else:
      combine = jnp.sum(
          jax.nn.one_hot(top_idx, e, dtype=jnp.float32) * top_w[..., None], axis=-2
      )  # (T, E)
      expert_out = experts(tokens)  # (T, E, D)
      out = jnp.einsum("te,ted->td", combine.astype(expert_out.dtype), expert_out)

    if cfg.shared_expert_intermediate_size > 0:
      shared_r = cfg.lora_rank if "shared_expert" in cfg.lora_targets else 0
      shared = MLP(
          cfg.shared_expert_intermediate_size,
          shared_r,
          cfg.lora_alpha,
          dtype,
          pdtype,
          cfg.initializer_range,
          name="shared_expert",
      )(tokens)
      if cfg.shared_expert_gate:
        gate = LoRADense(
            1,
            dtype=dtype,
            param_dtype=pdtype,
            init_std=cfg.initializer_range,
            name="shared_expert_gate",
        )(tokens)
        shared = jax.nn.sigmoid(gate.astype(jnp.float32)).astype(shared.dtype) * shared
      out = out + shared

    stats = routing_stats(probs, top_idx, tokens, valid)
    n = jnp.maximum(stats["token_count"], 1.0)
    # Load balance E * sum_e f_e P_e (f_e: fraction of tokens selecting e, P_e: mean prob);
    # gradients reach the router through P_e only, as in Switch / Mixtral.
    lb = e * jnp.sum((stats["select_count"] / n) * (stats["prob_sum"] / n))
    z = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * valid) / n
    # The router's input per token (for regularizers that re-apply a router to the client's own
    # tokens, e.g. FedAlign-MoE's conditional form); dropped by XLA when nobody reads it.
    losses = {
        "load_balance_loss": lb,
        "router_z_loss": z,
        "router_input": {"x": tokens.astype(jnp.float32), "mask": valid},
    }
    return out.reshape(b, t, d).astype(x.dtype), stats, losses
