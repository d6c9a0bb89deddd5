"""Tasks: how a model turns a batch into a training loss.

A task is the only place that knows the batch format and the model's call signature, so the
engine stays the same for decoder LMs and the Switch encoder-decoder.

Batch format of :class:`CausalLMTask` (one client step; leading axes (B, T)):

* ``tokens`` int32: token ids (BOS, prompt, label word, padding);
* ``mask`` bool: valid (unpadded) tokens, also the attention padding mask;
* ``target_mask`` bool: tokens whose prediction is scored (e.g. the label word).

Batch format of :class:`Seq2SeqTask` (encoder-decoder, text-to-text; from
:func:`fedalign.data.formatting.format_seq2seq_classification`):

* ``tokens`` int32 (B, T) / ``mask`` bool (B, T): encoder input and its padding mask;
* ``target_tokens`` int32 (B, L) / ``target_mask`` bool (B, L): decoder targets (label word
  tokens + EOS, right-padded) and their padding mask.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedalign.metrics.evaluation import scored_positions

PyTree = Any


def shifted_cross_entropy(
    logits: jax.Array, tokens: jax.Array, target_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over target positions and their count.

  logits[:, t] predicts tokens[:, t + 1]; a token counts when target_mask[:, t + 1].
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  w = target_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w)


def gathered_cross_entropy(
    logits: jax.Array, tokens: jax.Array, index: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """:func:`shifted_cross_entropy` from the logits of the scored positions only.

  ``logits`` (B, K, V) are the logits at positions ``index`` (B, K) (which predict
  ``tokens[:, index + 1]``); ``valid`` (B, K) marks the real slots (see
  :func:`fedalign.metrics.evaluation.scored_positions`).

  >>> logits = jnp.zeros((1, 4, 8)); tokens = jnp.arange(4)[None]
  >>> tm = jnp.array([[False, False, True, True]])
  >>> idx, valid = scored_positions(tm, 3)
  >>> gathered_cross_entropy(jnp.take_along_axis(logits, idx[..., None], 1), tokens, idx, valid)[1]
  Array(2., dtype=float32)
  """
  labels = jnp.take_along_axis(tokens, index + 1, axis=1, mode="clip")
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  w = valid.astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w)


class CausalLMTask:
  """Next-token loss on the target tokens of a decoder-only MoE LM.

  Only the scored positions go through the LM head when ``scored_tokens`` is set and
  ``prompt_loss_weight`` is 0: the final hidden states at the (at most ``scored_tokens``)
  positions that predict a target token of each row are gathered, then projected to the
  vocabulary (``MoEDecoderLM(logit_positions=...)``). Same loss and gradients as the full
  head (up to float summation order), without the (B, T, V) logits. ``scored_tokens`` must
  bound every row's number of target tokens (``max_scored_tokens`` of
  :mod:`fedalign.metrics.evaluation` over the training rows, which
  :func:`fedalign.federated.run.build_run` passes): a row with more would lose its extra
  targets. None (the default), or ``prompt_loss_weight`` > 0 (every position is scored): the
  full head.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fedalign.models import MoEConfig, MoEDecoderLM, init_params
    >>> cfg = MoEConfig(vocab_size=16, hidden_size=8, num_heads=2, num_kv_heads=1,
    ...                 num_experts=2, top_k=1, moe_intermediate_size=4)
    >>> task = CausalLMTask(MoEDecoderLM(cfg))
    >>> batch = {'tokens': jnp.ones((2, 4), jnp.int32), 'mask': jnp.ones((2, 4), bool),
    ...          'target_mask': jnp.ones((2, 4), bool)}
    >>> loss, aux = jax.jit(task.loss)(init_params(cfg), batch, jax.random.key(0))
    >>> bool(loss > 0)
    True
  """

  def __init__(
      self,
      module: nn.Module,
      prompt_loss_weight: float = 0.0,
      scored_tokens: int | None = None,
  ):
    """``prompt_loss_weight`` > 0 adds that weight times the mean next-token loss on the
    prompt (every valid non-target token): a label-independent language-modelling signal.
    ``scored_tokens``: see the class docstring (None: full LM head)."""
    if scored_tokens is not None and (
        isinstance(scored_tokens, bool)
        or not isinstance(scored_tokens, (int, np.integer))
        or scored_tokens < 1
    ):
      raise ValueError(
          f"scored_tokens={scored_tokens!r} is invalid: expected None (full LM head) or an "
          "int >= 1 (the most target tokens of a row)."
      )
    self.module = module
    self.prompt_loss_weight = prompt_loss_weight
    self.scored_tokens = None if scored_tokens is None else int(scored_tokens)

  @property
  def gathers_head(self) -> bool:
    """Whether :meth:`loss` runs the LM head on the scored positions only."""
    return self.scored_tokens is not None and not self.prompt_loss_weight

  def logits(self, params: PyTree, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return self.module.apply({"params": params}, tokens, mask)[0]

  def scored_logits(
      self, params: PyTree, tokens: jax.Array, mask: jax.Array, positions: jax.Array
  ) -> jax.Array:
    """(B, K, V) logits at ``positions`` (B, K) only (the LM head skips the others)."""
    return self.module.apply({"params": params}, tokens, mask, logit_positions=positions)[0]

  def loss(
      self, params: PyTree, batch: dict[str, jax.Array], rng: jax.Array
  ) -> tuple[jax.Array, dict[str, Any]]:
    del rng
    target = batch["target_mask"] & batch["mask"]
    if self.gathers_head:
      index, valid = scored_positions(target, self.scored_tokens)
      logits, aux = self.module.apply(
          {"params": params}, batch["tokens"], batch["mask"], logit_positions=index
      )
      total, count = gathered_cross_entropy(logits, batch["tokens"], index, valid)
      return total / jnp.maximum(count, 1.0), aux
    logits, aux = self.module.apply({"params": params}, batch["tokens"], batch["mask"])
    total, count = shifted_cross_entropy(logits, batch["tokens"], target)
    loss = total / jnp.maximum(count, 1.0)
    if self.prompt_loss_weight:
      prompt = batch["mask"] & ~batch["target_mask"]
      p_total, p_count = shifted_cross_entropy(logits, batch["tokens"], prompt)
      loss = loss + self.prompt_loss_weight * p_total / jnp.maximum(p_count, 1.0)
    return loss, aux


class Seq2SeqTask:
  """Teacher-forced target cross-entropy of an encoder-decoder (Switch Transformer).

  The decoder reads ``shift_right(target_tokens)`` (decoder start token, then the targets) and
  the loss is the mean cross-entropy over the valid target tokens of the batch (token-level
  mean, like :class:`CausalLMTask`). ``aux`` is the model's: ``routing`` of every encoder and
  decoder MoE block (padded encoder tokens and padded target positions excluded), and the
  ``load_balance_loss`` / ``router_z_loss`` averaged over the MoE blocks.

  Training mode: the model runs with ``deterministic=False`` (dropout and router jitter drawn
  from the ``'dropout'`` stream keyed by the engine's per-step ``rng``) only when the config has
  randomness to draw, i.e. ``dropout_rate > 0`` or ``router_jitter_noise > 0``. With both 0 the
  training-mode function is exactly the deterministic one (``_dropout`` and the jitter are
  skipped and no rng is consumed), so ``deterministic=True`` is used: same loss and gradients,
  nothing random in the jaxpr. Pass ``deterministic=`` to force either.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fedalign.models import build_module, init_params
    >>> from fedalign.models.switch import switch_tiny
    >>> cfg = switch_tiny()
    >>> task = Seq2SeqTask(build_module(cfg))
    >>> batch = {'tokens': jnp.ones((2, 6), jnp.int32), 'mask': jnp.ones((2, 6), bool),
    ...          'target_tokens': jnp.array([[5, 1], [7, 1]], jnp.int32),
    ...          'target_mask': jnp.ones((2, 2), bool)}
    >>> loss, aux = jax.jit(task.loss)(init_params(cfg), batch, jax.random.key(0))
    >>> bool(loss > 0), sorted(aux['routing'])
    (True, ['decoder/block_1/mlp', 'encoder/block_1/mlp'])
  """

  def __init__(self, module: nn.Module, deterministic: bool | None = None):
    self.module = module
    cfg = module.config
    if deterministic is None:
      deterministic = not (cfg.dropout_rate > 0 or cfg.router_jitter_noise > 0)
    self.deterministic = bool(deterministic)

  def decoder_inputs(self, target_tokens: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Teacher-forcing decoder inputs: [start, targets[:-1]] (padding -> pad id)."""
    from fedalign.models.switch import shift_right

    cfg = self.module.config
    tgt = jnp.where(target_mask, target_tokens, cfg.pad_token_id).astype(jnp.int32)
    return shift_right(tgt, cfg.decoder_start_token_id, cfg.pad_token_id)

  def logits(
      self, params: PyTree, batch: dict[str, jax.Array], rng: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Decoder logits (B, L, V) for the batch's targets (teacher forcing) and the model aux."""
    target_mask = batch["target_mask"].astype(bool)
    dec_in = self.decoder_inputs(batch["target_tokens"], target_mask)
    rngs = None if self.deterministic or rng is None else {"dropout": rng}
    # Decoder position t reads target t-1 and predicts target t: it is a real token exactly
    # where target t is, so target_mask doubles as the decoder padding mask.
    return self.module.apply(
        {"params": params},
        batch["tokens"],
        batch["mask"].astype(bool),
        dec_in,
        target_mask,
        deterministic=self.deterministic or rng is None,
        rngs=rngs,
    )

  def loss(
      self, params: PyTree, batch: dict[str, jax.Array], rng: jax.Array
  ) -> tuple[jax.Array, dict[str, Any]]:
    logits, aux = self.logits(params, batch, rng)
    target_mask = batch["target_mask"].astype(bool)
    tgt = jnp.where(target_mask, batch["target_tokens"], 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
    w = target_mask.astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0), aux
