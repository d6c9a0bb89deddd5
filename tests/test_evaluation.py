"""Evaluation: multiple-choice and label-word scoring against hand computations (numpy)."""

import jax
import numpy as np
import pytest

from fedalign.data import formatting as F
from fedalign.data import sources
from fedalign.data.tokenize import ByteTokenizer
from fedalign.metrics import evaluation as E

TOK = ByteTokenizer()
V = TOK.vocab_size


def bigram_params(seed=0, d=8):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"emb": jax.random.normal(k1, (V, d)), "out": jax.random.normal(k2, (d, V))}


def bigram_apply(params, tokens, mask):
  """Tiny pure-JAX LM: logits[t] = emb[tokens[t]] @ out (predicts token t + 1)."""
  del mask
  return params["emb"][tokens] @ params["out"]


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def hand_scores(params, mc):
  """Summed option log-probs, computed token by token in numpy."""
  emb, out = np.asarray(params["emb"], np.float64), np.asarray(params["out"], np.float64)
  logp = np_log_softmax(emb @ out)  # bigram: row = previous token
  n, k, _ = mc["tokens"].shape
  s = np.zeros((n, k))
  for i in range(n):
    for j in range(k):
      toks = mc["tokens"][i, j]
      for t in np.flatnonzero(mc["target_mask"][i, j]):
        s[i, j] += logp[toks[t - 1], toks[t]]
  return s


def test_multiple_choice_matches_hand_computation():
  params = bigram_params()
  contexts = ["The cat sat on the", "2 + 2 =", "Paris is in"]
  options = [
      [" mat", " dog house", " a", " roof top"],
      [" 4", " four", " 22", " 5"],
      [" France", " Texas", " the moon", " Europe!"],
  ]
  mc = F.format_multiple_choice(contexts, options, [0, 0, 0], TOK, max_len=32)
  res = E.multiple_choice_eval(lambda t, m: bigram_apply(params, t, m), mc, batch_size=5)
  want = hand_scores(params, mc)
  np.testing.assert_allclose(np.asarray(res["logprobs"]), want, rtol=1e-4, atol=1e-4)
  chars = np.array([[len(o) for o in opts] for opts in options])
  assert np.array_equal(np.asarray(res["pred"]), want.argmax(1))
  assert np.array_equal(np.asarray(res["pred_norm"]), (want / chars).argmax(1))
  assert float(res["acc"]) == pytest.approx(np.mean(want.argmax(1) == 0))
  assert float(res["acc_norm"]) == pytest.approx(np.mean((want / chars).argmax(1) == 0))
  # fixed-size batching: the result does not depend on the batch size
  res1 = E.multiple_choice_eval(lambda t, m: bigram_apply(params, t, m), mc, batch_size=12)
  np.testing.assert_allclose(np.asarray(res1["logprobs"]), np.asarray(res["logprobs"]), rtol=1e-5)


def test_classification_one_pass_equals_label_word_choices():
  params = bigram_params(1)
  texts = ["Stocks fell", "The team won", "New CPU", "Summit held", "Oil rose"]
  labels = [2, 1, 3, 0, 2]
  words = ("W", "S", "B", "T")  # single byte tokens
  ex = F.format_classification(texts, labels, TOK, label_words=words, max_len=24)
  cand = F.single_token_ids(TOK, words)
  fn = lambda t, m: bigram_apply(params, t, m)
  one = E.classification_eval(fn, ex, cand, batch_size=2)
  mc = F.format_label_word_choices(texts, labels, TOK, label_words=words, max_len=24)
  full = E.multiple_choice_eval(fn, mc, batch_size=4)
  np.testing.assert_allclose(
      np.asarray(one["logprobs"]), np.asarray(full["logprobs"]), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
      np.asarray(full["logprobs"]), hand_scores(params, mc), rtol=1e-4, atol=1e-4
  )
  assert np.array_equal(np.asarray(one["pred"]), np.asarray(full["pred"]))
  with pytest.raises(ValueError, match="not single tokens"):
    F.single_token_ids(TOK, (" World", "S"))


def test_evaluators_jit_once():
  texts, labels = ["a b", "c", "d e f"], [0, 1, 3]
  words = ("W", "S", "B", "T")
  mc = F.format_label_word_choices(texts, labels, TOK, label_words=words, max_len=16)
  ev = E.make_multiple_choice_evaluator(bigram_apply, batch_size=4)
  r0 = ev(bigram_params(0), mc)
  r1 = ev(bigram_params(1), mc)
  assert ev._cache_size() == 1
  assert not np.allclose(np.asarray(r0["logprobs"]), np.asarray(r1["logprobs"]))
  ex = F.format_classification(texts, labels, TOK, label_words=words, max_len=16)
  cev = E.make_classification_evaluator(bigram_apply, F.single_token_ids(TOK, words), 2)
  cev(bigram_params(0), ex)
  out = cev(bigram_params(2), ex)
  assert cev._cache_size() == 1 and out["logprobs"].shape == (3, 4)


def test_client_and_global_accuracy():
  labels = np.repeat(np.arange(4), 5)  # balanced test set
  correct = np.zeros(20, bool)
  correct[:5] = True  # class 0 all right
  correct[5:7] = True  # class 1: 2/5
  counts = np.array([[10, 0, 0, 0], [1, 1, 1, 1], [0, 3, 1, 0]])
  acc = np.asarray(E.client_accuracy(correct, labels, counts))
  np.testing.assert_allclose(acc, [1.0, np.mean(correct), 0.75 * 0.4 + 0.25 * 0.0], rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(E.per_class_accuracy(correct, labels, 4)), [1.0, 0.4, 0.0, 0.0]
  )
  sets = E.sample_client_test_sets(labels, counts, size=50, seed=0)
  assert set(labels[sets[0]]) == {0} and set(labels[sets[2]]) <= {1, 2}
  assert np.array_equal(sets[1], E.sample_client_test_sets(labels, counts, 50, 0)[1])


def test_mmlu_and_hellaswag_end_to_end(shared_data):
  params = bigram_params()
  fn = lambda t, m: bigram_apply(params, t, m)
  test = sources.read_mmlu(shared_data / "mmlu", "test").records[:6]
  dev = sources.read_mmlu(shared_data / "mmlu", "dev").records
  mm = F.format_mmlu(test, TOK, max_len=384, num_shots=1, dev_records=dev)
  assert mm["tokens"].shape == (6, 4, 384) and mm["option_tokens"].max() == 2
  r = E.multiple_choice_eval(fn, mm, batch_size=8)
  np.testing.assert_allclose(
      np.asarray(r["logprobs"]), hand_scores(params, mm), rtol=1e-4, atol=1e-3
  )
  hs = sources.read_hellaswag(shared_data / "hellaswag").records[:4]
  h = F.format_hellaswag(hs, TOK, max_len=256)
  r = E.multiple_choice_eval(fn, h, batch_size=8)
  assert 0.0 <= float(r["acc_norm"]) <= 1.0
  np.testing.assert_allclose(
      np.asarray(r["logprobs"]), hand_scores(params, h), rtol=1e-4, atol=1e-3
  )
