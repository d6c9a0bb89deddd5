"""Evaluation of classification and multiple-choice tasks as pure, jittable functions.

Every scorer takes ``logits_fn(tokens[B, T] int32, mask[B, T] bool) -> logits[B, T, V]``, a
pure callable whose logits at position t predict token t + 1 (a causal LM), and optionally
``scored_logits_fn(tokens, mask, positions[B, K] int32) -> logits[B, K, V]``: the same logits
at the given positions only (``MoEDecoderLM(logit_positions=...)``: the LM head runs on K
positions instead of T). With it the scorers compute only what they read: the position before
the label word (:func:`classification_eval`), the positions before each option's tokens
(:func:`multiple_choice_eval`, K = the most option tokens of a row, from the data; see
:func:`scored_positions`); the scores are the same up to float summation order. Inputs come from
:mod:`fedalign.data.formatting`. Evaluation runs over fixed-size batches with ``jax.lax.map``
(the last batch is filled by repeating row 0, then dropped), so one ``jax.jit`` of the whole
evaluation compiles once per data shape; :func:`make_multiple_choice_evaluator` and
:func:`make_classification_evaluator` return such jitted functions of ``params``.

* :func:`multiple_choice_eval` - log-likelihood of each option after its context:
  ``acc`` = argmax of the summed log-prob, ``acc_norm`` = argmax of summed log-prob / number
  of characters of the option (lm-evaluation-harness; equals the byte length for ASCII).
  Used for MMLU (options " A".." D"), HellaSwag (" " + ending) and label-word classification
  with multi-token label words (:func:`~fedalign.data.formatting.format_label_word_choices`).
* :func:`classification_eval` - label-word scoring in one pass when every label word is a
  single token: log-prob of each candidate id at the position before the label word.
* :func:`seq2seq_classification_eval` - label-word scoring for encoder-decoder (text-to-text)
  models: every candidate label word sequence (+ EOS) is scored as the decoder target, summed
  log-prob, argmax = prediction; multi-token label words are scored whole.
  :func:`make_seq2seq_classification_evaluator` returns the jitted evaluator with the same
  output dict as :func:`make_classification_evaluator`, so the server treats both alike.
* :func:`lm_eval` - next-token language modelling (``data.task = 'lm'``): ``acc`` = top-1
  next-token accuracy over every target token, ``nll`` = mean next-token negative
  log-likelihood (nats per token), ``ppl`` = exp(nll), per example and per topic.
  :func:`make_lm_evaluator` returns it jitted, with the same ``acc`` / ``correct`` keys as the
  classifiers, so the server, the hooks and the experiment tables treat it alike.
* :func:`client_accuracy` - each client's accuracy on its own label distribution, by
  reweighting per-class accuracy on a balanced test set; :func:`sample_client_test_sets` is the
  sampling alternative. Global accuracy on the balanced test set is ``mean(correct)``.

Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from fedalign.data.formatting import format_multiple_choice
    >>> from fedalign.data.tokenize import ByteTokenizer
    >>> mc = format_multiple_choice(["a"], [[" b", " cc"]], [0], ByteTokenizer(), max_len=8)
    >>> logits_fn = lambda t, m: jnp.zeros(t.shape + (259,))  # uniform model
    >>> r = multiple_choice_eval(logits_fn, mc, batch_size=2)
    >>> np.round(np.asarray(r["logprobs"]) / np.log(1 / 259), 3).tolist()
    [[2.0, 3.0]]
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
#: ``scored_logits_fn(tokens (B, T), mask (B, T), positions (B, K)) -> logits (B, K, V)``
ScoredLogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
#: ``score_fn(enc_ids (B, T), enc_mask (B, T), choice_ids (K, L), choice_mask (K, L)) -> (B, K)``
ChoiceScoreFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
ApplyFn = Callable[..., jax.Array]
Array = jax.Array | np.ndarray


def token_logprobs(logits: Array, tokens: Array) -> jax.Array:
  """(B, T) log p(token_t | tokens_<t) from (B, T, V) logits; position 0 gets 0.

  >>> np.round(np.asarray(token_logprobs(jnp.zeros((1, 2, 4)), jnp.array([[0, 3]]))), 4)
  array([[ 0.    , -1.3863]], dtype=float32)
  """
  logits = jnp.asarray(logits, jnp.float32)[:, :-1]
  nxt = jnp.asarray(tokens)[:, 1:]
  picked = jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0]
  lp = picked - jax.nn.logsumexp(logits, axis=-1)
  return jnp.pad(lp, ((0, 0), (1, 0)))


def sequence_logprob(logits: Array, tokens: Array, target_mask: Array) -> jax.Array:
  """(B,) sum of the log-probs of the target tokens (``target_mask``; position 0 ignored)."""
  lp = token_logprobs(logits, tokens)
  tm = jnp.asarray(target_mask).at[:, 0].set(False)
  return jnp.sum(jnp.where(tm, lp, 0.0), axis=-1)


def scored_positions(target_mask: Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The positions whose logits score the target tokens, in a static number ``k`` per row.

  Position p predicts token p + 1, so row b needs the logits at every p with
  ``target_mask[b, p + 1]`` (a target at position 0 is never scored). Returns ``(index (B, k)
  int32, valid (B, k) bool)``: the first ``k`` such positions of each row in order, then fill
  slots (index 0, valid False) that must get weight 0. ``k`` must bound the targets of every
  row: extra ones are dropped.

  >>> idx, valid = scored_positions(jnp.array([[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], bool), 2)
  >>> idx.tolist(), valid.tolist()
  ([[1, 2], [0, 0], [0, 0]], [[True, True], [True, False], [False, False]])
  """
  pred = jnp.asarray(target_mask, bool)[:, 1:]
  index = jax.vmap(lambda r: jnp.nonzero(r, size=k, fill_value=0)[0])(pred).astype(jnp.int32)
  valid = jnp.arange(k)[None, :] < jnp.sum(pred, axis=1, keepdims=True)
  return index, valid


def gathered_sequence_logprob(
    logits: Array, tokens: Array, index: Array, valid: Array
) -> jax.Array:
  """:func:`sequence_logprob` from the (B, K, V) logits at the positions ``index`` (B, K) only
  (``valid`` marks the real slots; :func:`scored_positions`)."""
  logits = jnp.asarray(logits, jnp.float32)
  nxt = jnp.take_along_axis(jnp.asarray(tokens), index + 1, axis=1, mode="clip")
  picked = jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0]
  lp = picked - jax.nn.logsumexp(logits, axis=-1)
  return jnp.sum(jnp.where(valid, lp, 0.0), axis=-1)


def max_scored_tokens(target_mask: Array, mask: Array | None = None) -> int | None:
  """The most scored tokens of one row (targets after position 0, and valid where ``mask``
  is given), at least 1: the static ``K`` of :func:`scored_positions`. Read on the host;
  None when an array is not concrete (traced under ``jit``: the caller falls back to the
  full head).

  >>> max_scored_tokens(np.array([[[0, 1, 1]], [[1, 0, 0]]], bool))
  2
  """
  if isinstance(target_mask, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
    return None
  tm = np.asarray(target_mask, bool)
  if mask is not None:
    tm = tm & np.asarray(mask, bool)
  tm = tm.reshape(-1, tm.shape[-1])[:, 1:]
  return max(1, int(tm.sum(axis=1).max(initial=0)))


def _batched(arrays: Sequence[Array], batch_size: int) -> tuple[list[jax.Array], int]:
  """Pads the leading axis to a multiple of batch_size (repeating row 0), -> (nb, B, ...)."""
  n = arrays[0].shape[0]
  nb = max(1, -(-n // batch_size))
  idx = jnp.concatenate([jnp.arange(n), jnp.zeros(nb * batch_size - n, jnp.int32)])
  out = [jnp.asarray(a)[idx].reshape((nb, batch_size) + a.shape[1:]) for a in arrays]
  return out, n


def score_sequences(
    logits_fn: LogitsFn,
    tokens: Array,
    mask: Array,
    target_mask: Array,
    batch_size: int,
    *,
    scored_logits_fn: ScoredLogitsFn | None = None,
    num_scored: int | None = None,
) -> jax.Array:
  """(N,) summed target log-prob of N sequences, in fixed batches of ``batch_size``.

  With ``scored_logits_fn`` and ``num_scored`` (static: at least the most target tokens of a
  row, e.g. :func:`max_scored_tokens`) only the ``num_scored`` positions before each row's
  targets are computed; otherwise ``logits_fn``'s full (B, T, V) logits.
  """
  (t, m, tm), n = _batched([tokens, mask, target_mask], batch_size)
  gather = scored_logits_fn is not None and num_scored is not None

  def body(x):
    tb, mb, tmb = x
    if gather:
      index, valid = scored_positions(tmb, num_scored)
      return gathered_sequence_logprob(scored_logits_fn(tb, mb, index), tb, index, valid)
    return sequence_logprob(logits_fn(tb, mb), tb, tmb)

  return jax.lax.map(body, (t, m, tm)).reshape(-1)[:n]


def multiple_choice_eval(
    logits_fn: LogitsFn,
    choices: Mapping[str, Array],
    batch_size: int,
    *,
    scored_logits_fn: ScoredLogitsFn | None = None,
    num_scored: int | None = None,
) -> dict[str, jax.Array]:
  """Scores (N, K, T) option sequences (``format_multiple_choice`` output).

  ``scored_logits_fn`` / ``num_scored``: the LM head on the option positions only (see
  :func:`score_sequences`; ``num_scored`` defaults to :func:`max_scored_tokens` of the
  choices when they are concrete, else the full head).

  Returns:
    ``logprobs`` (N, K) summed option log-probs; ``pred``, ``pred_norm`` (N,);
    ``correct``, ``correct_norm`` (N,) bool; ``acc``, ``acc_norm`` scalars.
  """
  tokens = jnp.asarray(choices["tokens"])
  n, k, t = tokens.shape
  flat = lambda a: jnp.asarray(a).reshape(n * k, t)
  if scored_logits_fn is not None and num_scored is None:
    num_scored = max_scored_tokens(choices["target_mask"])
  s = score_sequences(
      logits_fn,
      flat(tokens),
      flat(choices["mask"]),
      flat(choices["target_mask"]),
      batch_size,
      scored_logits_fn=scored_logits_fn,
      num_scored=num_scored,
  ).reshape(n, k)
  chars = jnp.maximum(jnp.asarray(choices["option_chars"], jnp.float32), 1.0)
  labels = jnp.asarray(choices["labels"])
  pred = jnp.argmax(s, axis=1)
  pred_norm = jnp.argmax(s / chars, axis=1)
  correct, correct_norm = pred == labels, pred_norm == labels
  return {
      "logprobs": s,
      "pred": pred,
      "pred_norm": pred_norm,
      "correct": correct,
      "correct_norm": correct_norm,
      "acc": jnp.mean(correct),
      "acc_norm": jnp.mean(correct_norm),
  }


def classification_eval(
    logits_fn: LogitsFn,
    examples: Mapping[str, Array],
    candidate_ids: Array,
    batch_size: int,
    *,
    scored_logits_fn: ScoredLogitsFn | None = None,
) -> dict[str, jax.Array]:
  """One-pass label-word scoring for single-token label words.

  ``examples`` is ``format_classification`` output (either mode): the target tokens are
  removed from the input (token 0, mask False) so nothing of the label leaks even for a
  non-causal model, and the log-softmax at ``last_index`` (the last prompt token) is read at
  each ``candidate_ids`` (K,) (from ``formatting.single_token_ids``). With
  ``scored_logits_fn`` only that position goes through the LM head.

  Returns:
    ``logprobs`` (N, K), ``pred`` (N,), ``correct`` (N,) bool, ``acc`` scalar.
  """
  tokens = jnp.asarray(examples["tokens"])
  tm = jnp.asarray(examples["target_mask"])
  tok_in = jnp.where(tm, 0, tokens)
  mask_in = jnp.asarray(examples["mask"]) & ~tm
  cand = jnp.asarray(candidate_ids, jnp.int32)
  (t, m, last), n = _batched([tok_in, mask_in, jnp.asarray(examples["last_index"])], batch_size)

  def body(x):
    tb, mb, lb = x
    if scored_logits_fn is not None:
      row = jnp.asarray(scored_logits_fn(tb, mb, lb[:, None]), jnp.float32)[:, 0]  # (B, V)
    else:
      logits = jnp.asarray(logits_fn(tb, mb), jnp.float32)
      row = jnp.take_along_axis(logits, lb[:, None, None], axis=1)[:, 0]  # (B, V)
    return jax.nn.log_softmax(row, axis=-1)[:, cand]

  s = jax.lax.map(body, (t, m, last)).reshape(-1, cand.shape[0])[:n]
  pred = jnp.argmax(s, axis=1)
  correct = pred == jnp.asarray(examples["labels"])
  return {"logprobs": s, "pred": pred, "correct": correct, "acc": jnp.mean(correct)}


def lm_eval(
    logits_fn: LogitsFn,
    examples: Mapping[str, Array],
    batch_size: int,
    num_labels: int,
) -> dict[str, jax.Array]:
  """Next-token accuracy and log-likelihood of the target tokens of a causal LM.

  ``examples``: :func:`fedalign.data.formatting.format_lm` output (``tokens``, ``mask``,
  ``target_mask``, ``labels`` in ``[0, num_labels)``). Token ``t`` counts when
  ``target_mask[t]``, predicted from the logits at ``t - 1``.

  Returns:
    ``acc`` (correct target tokens / target tokens), ``nll`` (mean negative log-likelihood per
    target token, nats), ``ppl`` (exp(nll)), ``correct`` (N,) (each row's token accuracy, what
    :func:`client_accuracy` reweights by topic), ``row_nll`` (N,), and per topic ``nll_by_label``
    and ``acc_by_label`` (K,) (token-weighted; 0 for an absent topic).

  >>> import jax.numpy as jnp
  >>> ex = {"tokens": jnp.array([[0, 1, 2]]), "mask": jnp.ones((1, 3), bool),
  ...       "target_mask": jnp.array([[False, True, True]]), "labels": jnp.array([0])}
  >>> r = lm_eval(lambda t, m: jnp.zeros(t.shape + (4,)), ex, batch_size=2, num_labels=2)
  >>> round(float(r["nll"]), 4), round(float(r["ppl"]), 4)
  (1.3863, 4.0)
  """
  tm = jnp.asarray(examples["target_mask"]) & jnp.asarray(examples["mask"])
  (t, m, tmb), n = _batched(
      [jnp.asarray(examples["tokens"]), jnp.asarray(examples["mask"]), tm], batch_size
  )

  def body(x):
    tb, mb, tgt = x
    logits = jnp.asarray(logits_fn(tb, mb), jnp.float32)[:, :-1]
    nxt = tb[:, 1:]
    w = tgt[:, 1:].astype(jnp.float32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits, axis=-1) == nxt).astype(jnp.float32)
    return jnp.stack([-jnp.sum(lp * w, 1), jnp.sum(hit * w, 1), jnp.sum(w, 1)], axis=1)

  rows = jax.lax.map(body, (t, m, tmb)).reshape(-1, 3)[:n]  # (N, [nll sum, hits, count])
  nll_sum, hits, count = rows[:, 0], rows[:, 1], rows[:, 2]
  total = jnp.maximum(jnp.sum(count), 1.0)
  onehot = jax.nn.one_hot(jnp.asarray(examples["labels"]), num_labels, dtype=jnp.float32)
  per = onehot.T @ rows  # (K, 3)
  nll = jnp.sum(nll_sum) / total
  return {
      "acc": jnp.sum(hits) / total,
      "nll": nll,
      "ppl": jnp.exp(nll),
      "correct": hits / jnp.maximum(count, 1.0),
      "row_nll": nll_sum / jnp.maximum(count, 1.0),
      "nll_by_label": per[:, 0] / jnp.maximum(per[:, 2], 1.0),
      "acc_by_label": per[:, 1] / jnp.maximum(per[:, 2], 1.0),
  }


def make_lm_evaluator(
    apply_fn: ApplyFn, batch_size: int, num_labels: int
) -> Callable[[object, Mapping[str, Array]], dict[str, jax.Array]]:
  """``jax.jit`` of ``(params, examples) -> lm_eval(...)`` (one compile per data shape)."""

  @jax.jit
  def evaluate(params, examples):
    return lm_eval(lambda t, m: apply_fn(params, t, m), examples, batch_size, num_labels)

  return evaluate


def seq2seq_classification_eval(
    score_fn: ChoiceScoreFn,
    examples: Mapping[str, Array],
    candidates: tuple[Array, Array],
    batch_size: int,
) -> dict[str, jax.Array]:
  """Rank classification with an encoder-decoder: scores every label word sequence.

  ``examples``: ``format_seq2seq_classification`` output (``tokens``, ``mask``, ``labels``;
  the targets are not read). ``candidates``: ``(ids (K, L), mask (K, L))`` from
  ``formatting.seq2seq_label_candidates``. ``score_fn`` returns the summed log-prob (B, K) of
  each candidate as the decoder target of each input (e.g. ``switch.score_choices``).

  Returns:
    ``logprobs`` (N, K), ``pred`` (N,), ``correct`` (N,) bool, ``acc`` scalar.
  """
  cand_ids = jnp.asarray(candidates[0], jnp.int32)
  cand_mask = jnp.asarray(candidates[1], bool)
  (t, m), n = _batched([jnp.asarray(examples["tokens"]), jnp.asarray(examples["mask"])], batch_size)
  s = jax.lax.map(lambda x: score_fn(x[0], x[1], cand_ids, cand_mask), (t, m))
  s = s.reshape(-1, cand_ids.shape[0])[:n]
  pred = jnp.argmax(s, axis=1)
  correct = pred == jnp.asarray(examples["labels"])
  return {"logprobs": s, "pred": pred, "correct": correct, "acc": jnp.mean(correct)}


def per_class_accuracy(correct: Array, labels: Array, num_classes: int) -> jax.Array:
  """(K,) accuracy per true class (0 for a class absent from ``labels``).

  >>> per_class_accuracy(jnp.array([1, 0, 1]), jnp.array([0, 0, 1]), 3).tolist()
  [0.5, 1.0, 0.0]
  """
  onehot = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32)
  hits = onehot.T @ jnp.asarray(correct, jnp.float32)
  count = onehot.sum(0)
  return jnp.where(count > 0, hits / jnp.maximum(count, 1.0), 0.0)


def client_accuracy(correct: Array, labels: Array, client_label_counts: Array) -> jax.Array:
  """(C,) accuracy of the same predictions under each client's label distribution.

  acc_c = sum_k p_c(k) acc_k, with p_c the client's training label distribution (rows of
  ``client_label_counts`` (C, K), e.g. ``partition.label_counts``) and acc_k the per-class
  accuracy on the (balanced) test set - an importance-weighted estimate of accuracy on a
  test set drawn like the client's data. Classes absent from the test set are dropped and
  p_c renormalised. Global accuracy is ``mean(correct)``.

  >>> client_accuracy(jnp.array([1, 0, 1, 1]), jnp.array([0, 0, 1, 1]),
  ...                 jnp.array([[10, 0], [5, 5]])).tolist()
  [0.5, 0.75]
  """
  counts = jnp.asarray(client_label_counts, jnp.float32)
  k = counts.shape[1]
  acc_k = per_class_accuracy(correct, labels, k)
  present = jax.nn.one_hot(jnp.asarray(labels), k).sum(0) > 0
  w = counts * present
  w = w / jnp.maximum(w.sum(1, keepdims=True), 1e-12)
  return w @ acc_k


def sample_client_test_sets(
    test_labels: np.ndarray,
    client_label_counts: np.ndarray,
    size: int,
    seed: int,
) -> list[np.ndarray]:
  """Per-client test index sets of ``size`` rows drawn (with replacement) from the test set
  with each client's training label distribution: the sampling alternative to
  :func:`client_accuracy`. Deterministic from ``seed``."""
  y = np.asarray(test_labels)
  counts = np.asarray(client_label_counts, dtype=np.float64)
  by_class = [np.flatnonzero(y == k) for k in range(counts.shape[1])]
  out = []
  for c, row in enumerate(counts):
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), c]))
    p = np.array([row[k] if len(by_class[k]) else 0.0 for k in range(len(row))])
    if p.sum() <= 0:
      raise ValueError(f"client {c} has no training label present in the test set")
    ks = rng.choice(len(p), size=size, p=p / p.sum())
    out.append(np.array([rng.choice(by_class[k]) for k in ks], dtype=np.int64))
  return out


def make_multiple_choice_evaluator(
    apply_fn: ApplyFn,
    batch_size: int,
    *,
    labels_key: str = "labels",
    metric: str = "acc",
    scored_apply_fn: ApplyFn | None = None,
) -> Callable[[object, Mapping[str, Array]], dict[str, jax.Array]]:
  """``jax.jit`` of ``(params, choices) -> multiple_choice_eval(...)`` with
  ``logits_fn = lambda t, m: apply_fn(params, t, m)``: compiles once per data shape.

  Args:
    apply_fn: ``(params, tokens, mask) -> logits``.
    scored_apply_fn: optional ``(params, tokens, mask, positions (B, K)) -> logits (B, K, V)``:
      the LM head on the option positions only. K (static) is :func:`max_scored_tokens` of
      ``choices['target_mask']``, read on the host at each call (one compile per data shape
      and K); when ``choices`` is traced (the evaluator called inside ``jit``) the full head.
    batch_size: sequences (not questions) per forward pass.
    labels_key: the key of ``choices`` holding the correct option index (e.g. ``"answers"``
      when ``"labels"`` holds something else, such as a topic group).
    metric: ``"acc"`` or ``"acc_norm"``: which score fills ``acc``, ``correct`` and ``pred``
      (both ``acc_norm`` and ``acc_unnorm`` are always in the output too).

  >>> from fedalign.data.formatting import format_multiple_choice
  >>> from fedalign.data.tokenize import ByteTokenizer
  >>> mc = format_multiple_choice(["a"], [[" b", " cc"]], [0], ByteTokenizer(), max_len=8)
  >>> ev = make_multiple_choice_evaluator(lambda p, t, m: jnp.zeros(t.shape + (259,)), 2,
  ...                                     metric="acc_norm")
  >>> out = ev(None, mc)
  >>> sorted(k for k in out if k.startswith("acc")), bool(out["acc"] == out["acc_norm"])
  (['acc', 'acc_norm', 'acc_unnorm'], True)
  """
  if metric not in ("acc", "acc_norm"):
    raise ValueError(f"metric={metric!r} is invalid: expected 'acc' or 'acc_norm'.")

  @functools.partial(jax.jit, static_argnames="num_scored")
  def jitted(params, choices, num_scored=None):
    choices = {**choices, "labels": choices[labels_key]}
    scored = None
    if scored_apply_fn is not None and num_scored is not None:
      scored = lambda t, m, i: scored_apply_fn(params, t, m, i)
    out = multiple_choice_eval(
        lambda t, m: apply_fn(params, t, m),
        choices,
        batch_size,
        scored_logits_fn=scored,
        num_scored=num_scored,
    )
    out["acc_unnorm"] = out["acc"]
    if metric == "acc_norm":
      out.update(acc=out["acc_norm"], correct=out["correct_norm"], pred=out["pred_norm"])
    return out

  if scored_apply_fn is None:
    return jitted

  def evaluate(params, choices):
    return jitted(params, choices, num_scored=max_scored_tokens(choices["target_mask"]))

  evaluate._cache_size = jitted._cache_size  # compiles: one per data shape and K
  return evaluate


def make_classification_evaluator(
    apply_fn: ApplyFn,
    candidate_ids: Array,
    batch_size: int,
    *,
    scored_apply_fn: ApplyFn | None = None,
) -> Callable[[object, Mapping[str, Array]], dict[str, jax.Array]]:
  """``jax.jit`` of ``(params, examples) -> classification_eval(...)`` (one compile).

  ``scored_apply_fn``: optional ``(params, tokens, mask, positions (B, K)) -> logits
  (B, K, V)``; the LM head then runs on the ``last_index`` position only."""
  cand = np.asarray(candidate_ids, np.int32)

  @jax.jit
  def evaluate(params, examples):
    scored = None
    if scored_apply_fn is not None:
      scored = lambda t, m, i: scored_apply_fn(params, t, m, i)
    return classification_eval(
        lambda t, m: apply_fn(params, t, m), examples, cand, batch_size, scored_logits_fn=scored
    )

  return evaluate


def make_seq2seq_classification_evaluator(
    model: object, candidates: tuple[Array, Array], batch_size: int
) -> Callable[[object, Mapping[str, Array]], dict[str, jax.Array]]:
  """``jax.jit`` of ``(params, examples) -> seq2seq_classification_eval(...)`` (one compile).

  Args:
    model: a :class:`~fedalign.models.switch.SwitchConfig` (scored with
      :func:`fedalign.models.switch.score_choices`: each input is encoded once and the K
      candidates decoded against it), or a function ``score_fn(params, enc_ids, enc_mask,
      choice_ids, choice_mask) -> (B, K)`` summed log-probs.
    candidates: ``(ids (K, L), mask (K, L))`` label-word targets
      (``formatting.seq2seq_label_candidates``); padded positions do not count.
    batch_size: inputs per scoring batch.

  Returns the same dict as :func:`make_classification_evaluator` (``acc``, ``correct``,
  ``pred``, ``logprobs``).

  >>> import jax.numpy as jnp, numpy as np
  >>> from fedalign.models import init_params
  >>> from fedalign.models.switch import switch_tiny
  >>> cfg = switch_tiny()
  >>> ev = make_seq2seq_classification_evaluator(
  ...     cfg, (np.array([[5, 1, 0], [6, 7, 1]]), np.array([[1, 1, 0], [1, 1, 1]], bool)), 2)
  >>> ex = {'tokens': jnp.ones((3, 5), jnp.int32), 'mask': jnp.ones((3, 5), bool),
  ...       'labels': jnp.array([0, 1, 0])}
  >>> ev(init_params(cfg), ex)['logprobs'].shape
  (3, 2)
  """
  ids = np.asarray(candidates[0], np.int32)
  mask = np.asarray(candidates[1], bool)
  if ids.ndim != 2 or ids.shape != mask.shape:
    raise ValueError(
        f"candidates must be (ids (K, L), mask (K, L)); got shapes {ids.shape} " f"and {mask.shape}"
    )
  if not mask.any(axis=1).all():
    raise ValueError("every candidate needs at least one target token (mask row all False)")
  if type(model).__name__ == "SwitchConfig":
    from fedalign.models.switch import score_choices

    config = model
    score = lambda p, t, m, ci, cm: score_choices(p, config, t, m, ci, cm)
  elif callable(model):
    score = model
  else:
    raise TypeError(f"model must be a SwitchConfig or a score function, got {type(model)}")

  @jax.jit
  def evaluate(params, examples):
    return seq2seq_classification_eval(
        lambda t, m, ci, cm: score(params, t, m, ci, cm), examples, (ids, mask), batch_size
    )

  return evaluate
