"""A small model handle: a Flax module plus its params, callable on token ids.

Everything federated works with ``(module, params)`` and pure ``module.apply``; this handle is
for users and for :func:`fedalign.models.hf.load_pretrained`.

Example:
  >>> import jax.numpy as jnp
  >>> from fedalign.models import MoEConfig
  >>> model = MoEModel.random(MoEConfig(vocab_size=32, hidden_size=16, num_heads=2,
  ...                                   num_kv_heads=1, num_experts=4, top_k=1))
  >>> logits, aux = model(jnp.zeros((1, 3), jnp.int32))
  >>> logits.shape
  (1, 3, 32)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedalign.models.config import MoEConfig

PyTree = Any


def build_module(config: Any) -> nn.Module:
  """The Flax module for a model config (decoder MoE LM or Switch encoder-decoder)."""
  if isinstance(config, MoEConfig):
    from fedalign.models.decoder import MoEDecoderLM

    return MoEDecoderLM(config.validate())
  if type(config).__name__ == "SwitchConfig":
    from fedalign.models.switch import SwitchTransformer

    return SwitchTransformer(config.validate())
  raise TypeError(
      f"unsupported model config type {type(config).__name__}: expected "
      "MoEConfig or SwitchConfig."
  )


def init_params(config: Any, rng: jax.Array | int = 0, seq_len: int = 8) -> PyTree:
  """Random parameters of the model described by ``config``."""
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  module = build_module(config)
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return jax.jit(module.init)(rng, ids)["params"]


@dataclasses.dataclass
class MoEModel:
  """A model config and its params; ``model(input_ids, attention_mask) -> (logits, aux)``."""

  config: Any
  params: PyTree

  @classmethod
  def random(cls, config: Any, seed: int = 0) -> "MoEModel":
    return cls(config, init_params(config, seed))

  @property
  def module(self) -> nn.Module:
    return build_module(self.config)

  def apply(self, params: PyTree, *args: Any, **kwargs: Any) -> tuple[jax.Array, dict]:
    return self.module.apply({"params": params}, *args, **kwargs)

  def __call__(
      self, input_ids: Any, attention_mask: Any = None, **kwargs: Any
  ) -> tuple[jax.Array, dict]:
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask).astype(bool)
    return _jitted_apply(self.module)(self.params, input_ids, attention_mask, **kwargs)


@functools.lru_cache(maxsize=32)
def _jitted_apply(module: nn.Module):
  """One jitted apply per module (modules with equal configs are equal), so repeated calls
  of a model handle reuse the compiled forward."""
  return jax.jit(lambda p, i, m, **kw: module.apply({"params": p}, i, m, **kw))
