"""Tasks: how a model turns a batch into a training loss.

A task is the only place that knows the batch format and the model's call signature, so the
engine stays the same for decoder LMs and the Switch encoder-decoder.

Batch format of :class:`CausalLMTask` (one client step; leading axes (B, T)):

* ``tokens`` int32: token ids (BOS, prompt, label word, padding);
* ``mask`` bool: valid (unpadded) tokens, also the attention padding mask;
* ``target_mask`` bool: tokens whose prediction is scored (e.g. the label word).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any


def shifted_cross_entropy(logits: jax.Array, tokens: jax.Array, target_mask: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over target positions and their count.

  logits[:, t] predicts tokens[:, t + 1]; a token counts when target_mask[:, t + 1].
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  w = target_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w)


class CausalLMTask:
  """Next-token loss on the target tokens of a decoder-only MoE LM.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fedalign.models import MoEConfig, MoEDecoderLM, init_params
    >>> cfg = MoEConfig(vocab_size=16, hidden_size=8, num_heads=2, num_kv_heads=1,
    ...                 num_experts=2, top_k=1, moe_intermediate_size=4)
    >>> task = CausalLMTask(MoEDecoderLM(cfg))
    >>> batch = {'tokens': jnp.ones((2, 4), jnp.int32), 'mask': jnp.ones((2, 4), bool),
    ...          'target_mask': jnp.ones((2, 4), bool)}
    >>> loss, aux = task.loss(init_params(cfg), batch, jax.random.key(0))
    >>> bool(loss > 0)
    True
  """

  def __init__(self, module: nn.Module):
    self.module = module

  def logits(self, params: PyTree, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return self.module.apply({"params": params}, tokens, mask)[0]

  def loss(self, params: PyTree, batch: dict[str, jax.Array], rng: jax.Array
           ) -> tuple[jax.Array, dict[str, Any]]:
    del rng
    logits, aux = self.module.apply({"params": params}, batch["tokens"], batch["mask"])
    total, count = shifted_cross_entropy(logits, batch["tokens"],
                                         batch["target_mask"] & batch["mask"])
    return total / jnp.maximum(count, 1.0), aux
