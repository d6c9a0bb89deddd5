"""The LM head on the scored positions only (issue #12): same numbers as the full head.

Training loss and gradients of :class:`CausalLMTask` with ``scored_tokens`` (the final hidden
states at the target positions gathered before the head), label-word and multiple-choice
evaluation with ``scored_apply_fn``, all against the full (B, T, V) head, on a tiny decoder.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedalign.data import formatting as F
from fedalign.data.tokenize import ByteTokenizer
from fedalign.federated.task import CausalLMTask
from fedalign.metrics import evaluation as E
from fedalign.models import MoEConfig, MoEDecoderLM

TOK = ByteTokenizer()


def tiny(vocab=32, tie=False):
  return MoEConfig(
      vocab_size=vocab,
      hidden_size=16,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=8,
      tie_word_embeddings=tie,
  )


def random_params(module, seq=8, seed=0, std=0.3):
  """normal(0, std) leaves (norm scales around 1): logits far from uniform, large gradients."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, seq), jnp.int32))
  return jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(
          rng.normal(float(str(getattr(p[-1], "key", "")) == "scale"), std, s.shape), s.dtype
      ),
      shapes["params"],
  )


def batch(vocab):
  """Rows with 1, 2 and 0 target tokens, right padding, and a target flag on a padded token."""
  t = 8
  mask = np.ones((4, t), bool)
  mask[1, 6:] = False
  mask[3, 5:] = False
  target = np.zeros((4, t), bool)
  target[0, 7] = True  # 1 target (the last position)
  target[1, 4:6] = True  # 2 targets, then padding
  # row 2: no target at all
  target[3, 3:5] = True  # 2 targets ...
  target[3, 6] = True  # ... and a flag on a padded token: not scored
  tokens = np.random.default_rng(1).integers(1, vocab, (4, t)).astype(np.int32)
  return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask), "target_mask": target}


def test_scored_positions_and_bound():
  tm = np.array([[0, 0, 1, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]], bool)
  idx, valid = E.scored_positions(tm, 3)
  assert idx.tolist() == [[1, 2, 0], [3, 0, 0], [0, 0, 0], [0, 0, 0]]
  assert valid.tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]]
  # position 0 is never scored; the mask removes padded targets; at least 1
  assert E.max_scored_tokens(tm) == 2
  assert E.max_scored_tokens(tm, np.array([[1, 1, 1, 0, 0]] * 4, bool)) == 1
  assert E.max_scored_tokens(np.zeros((2, 3), bool)) == 1
  seen = []
  jax.eval_shape(lambda m: seen.append(E.max_scored_tokens(m)) or m, jnp.zeros((2, 3), bool))
  assert seen == [None]  # traced: unknown, the callers use the full head


@pytest.mark.parametrize("tie", [False, True])
def test_gathered_loss_and_grads_equal_full_head(tie):
  cfg = tiny(tie=tie)
  module = MoEDecoderLM(cfg)
  params = random_params(module)
  assert ("lm_head" in params) != tie
  b = batch(cfg.vocab_size)
  full = CausalLMTask(module)
  gathered = CausalLMTask(module, scored_tokens=E.max_scored_tokens(b["target_mask"], b["mask"]))
  assert gathered.scored_tokens == 2 and gathered.gathers_head and not full.gathers_head

  def both(p):  # one compile for both heads
    vg = lambda task: jax.value_and_grad(
        lambda q: task.loss(q, b, jax.random.key(0)), has_aux=True
    )(p)
    return vg(full), vg(gathered)

  ((l_full, aux_full), g_full), ((l_gat, aux_gat), g_gat) = jax.jit(both)(params)
  # by hand: mean next-token cross-entropy over the 5 scored tokens of the full logits
  logits = np.asarray(jax.jit(full.logits)(params, b["tokens"], b["mask"]), np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  pos = [(0, 6), (1, 3), (1, 4), (3, 2), (3, 3)]
  want = -np.mean([logp[r, p, int(b["tokens"][r, p + 1])] for r, p in pos])
  np.testing.assert_allclose(float(l_full), want, rtol=1e-5)
  np.testing.assert_allclose(float(l_gat), float(l_full), rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6), g_gat, g_full)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_full)) > 1e-2
  # the routing statistics and router inputs are untouched by the head
  jax.tree.map(lambda a, c: np.testing.assert_array_equal(a, c), aux_gat, aux_full)


def test_scored_tokens_config():
  module = MoEDecoderLM(tiny())
  # a prompt loss scores every position: the full head
  assert not CausalLMTask(module, prompt_loss_weight=0.5, scored_tokens=2).gathers_head
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="scored_tokens"):
      CausalLMTask(module, scored_tokens=bad)


def appliers(cfg, seed=0):
  module = MoEDecoderLM(cfg)
  params = random_params(module, seed=seed)
  apply_fn = lambda p, t, m: module.apply({"params": p}, t, m)[0]
  scored = lambda p, t, m, i: module.apply({"params": p}, t, m, logit_positions=i)[0]
  return params, apply_fn, scored


def test_label_word_evaluation_equal():
  params, apply_fn, scored = appliers(tiny(TOK.vocab_size))
  texts = ["Stocks fell", "The team won the cup", "New CPU", "Summit", "Oil rose today"]
  words = ("W", "S", "B", "T")
  ex = F.format_classification(texts, [2, 1, 3, 0, 2], TOK, label_words=words, max_len=16)
  cand = F.single_token_ids(TOK, words)
  full = E.make_classification_evaluator(apply_fn, cand, 2)(params, ex)
  gat = E.make_classification_evaluator(apply_fn, cand, 2, scored_apply_fn=scored)(params, ex)
  np.testing.assert_allclose(gat["logprobs"], full["logprobs"], rtol=1e-6, atol=1e-6)
  assert np.array_equal(gat["pred"], full["pred"]) and float(gat["acc"]) == float(full["acc"])
  assert len(set(np.asarray(full["pred"]).tolist())) > 1  # a model that discriminates


def test_multiple_choice_scores_equal_tied():
  params, apply_fn, scored = appliers(tiny(TOK.vocab_size, tie=True), seed=3)
  contexts = ["The cat sat on the", "2 + 2 =", "Paris is in"]
  options = [[" mat", " dog house", " a"], [" 4", " four", " 22"], [" France", " Texas", " x"]]
  mc = F.format_multiple_choice(contexts, options, [0, 1, 2], TOK, max_len=24)
  assert E.max_scored_tokens(mc["target_mask"]) == len(" dog house")
  full = E.make_multiple_choice_evaluator(apply_fn, 4, metric="acc_norm")(params, mc)
  ev = E.make_multiple_choice_evaluator(apply_fn, 4, metric="acc_norm", scored_apply_fn=scored)
  gat = ev(params, mc)
  np.testing.assert_allclose(gat["logprobs"], full["logprobs"], rtol=1e-6, atol=1e-5)
  for k in ("pred", "pred_norm", "acc", "acc_norm", "acc_unnorm"):
    assert np.array_equal(gat[k], full[k]), k
  ev(params, mc)
  assert ev._cache_size() == 1
