"""Prompt formatting and fixed-shape client batches (round trip, determinism, padding)."""

import numpy as np
import pytest

from fedalign.data import batching as B
from fedalign.data import formatting as F
from fedalign.data.tokenize import ByteTokenizer

TOK = ByteTokenizer()


def test_format_classification_label_word_and_head():
  texts = ["short", "x" * 200]
  ex = F.format_classification(texts, [1, 3], TOK, max_len=32)
  assert ex["tokens"].shape == (2, 32) and ex["tokens"].dtype == np.int32
  for i, word in enumerate([" Sports", " Tech"]):
    assert ex["tokens"][i, 0] == TOK.bos_id
    assert TOK.decode(ex["tokens"][i][ex["target_mask"][i]]) == word
    seq = TOK.decode(ex["tokens"][i][ex["mask"][i]])
    assert seq.endswith("\nTopic:" + word)
    assert ex["target_mask"][i, ex["last_index"][i] + 1]
  assert ex["mask"][1].all()  # long text filled to max_len, truncated from the left
  assert TOK.decode(ex["tokens"][0][ex["mask"][0]]) == "short\nTopic: Sports"
  head = F.format_classification(texts, [1, 3], TOK, max_len=32, mode="head")
  assert not head["target_mask"].any() and head["labels"].tolist() == [1, 3]
  assert TOK.decode(head["tokens"][0][head["mask"][0]]) == "short\nTopic:"
  with pytest.raises(ValueError, match="outside 0..3"):
    F.format_classification(["a"], [4], TOK)
  with pytest.raises(ValueError, match="max_len=5 is too small"):
    F.format_classification(["a"], [0], TOK, max_len=5)


def test_format_choices_and_mmlu_prompt():
  mc = F.format_label_word_choices(["abc"], [2], TOK, max_len=20)
  assert mc["tokens"].shape == (1, 4, 20)
  for k, w in enumerate([" World", " Sports", " Business", " Tech"]):
    assert TOK.decode(mc["tokens"][0, k][mc["target_mask"][0, k]]) == w
    assert mc["option_chars"][0, k] == len(w)
  rec = {"subject": "high_school_physics", "question": "Q?", "choices": list("wxyz"), "answer": 3}
  header, body = F.mmlu_prompt(rec)
  assert header + body == (
      "The following are multiple choice questions (with answers) "
      "about high school physics.\n\nQ?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
  )
  m = F.format_mmlu([rec], TOK, max_len=160)
  assert TOK.decode(m["tokens"][0, 3][m["mask"][0, 3]]).endswith("Answer: D")
  hs = F.format_hellaswag(
      [{"activity_label": "A", "ctx": "c", "endings": list("pqrs"), "label": 0}], TOK, max_len=16
  )
  assert TOK.decode(hs["tokens"][0, 1][hs["mask"][0, 1]]) == "A: c q"


def _examples(n=23, t=5):
  rng = np.random.default_rng(0)
  return {
      "tokens": rng.integers(3, 200, (n, t)).astype(np.int32),
      "mask": np.ones((n, t), bool),
      "labels": np.arange(n, dtype=np.int32),
  }


def test_epoch_batches_round_trip_and_shapes():
  ex = _examples()
  clients = [np.arange(0, 11), np.arange(11, 14), np.arange(14, 23)]
  b = B.make_client_batches(ex, clients, 4, seed=0, round=0, epochs=2)
  assert b["tokens"].shape == (3, 6, 4, 5) and b["labels"].shape == (3, 6, 4)
  assert b["step_mask"].sum(1).tolist() == [6, 2, 6]
  assert not b["mask"][~b["example_mask"]].any()  # padded slots carry no tokens
  for c, got in enumerate(B.unpad_client_batches(b)):
    idx = np.sort(got["example_index"])
    assert np.array_equal(idx, np.sort(np.repeat(clients[c], 2)))  # every example, twice
    assert np.array_equal(got["tokens"], ex["tokens"][got["example_index"]])
    assert np.array_equal(got["labels"], got["example_index"])
  b1 = B.make_client_batches(ex, clients, 4, seed=0, round=0, epochs=1)
  for c, got in enumerate(B.unpad_client_batches(b1)):
    assert np.array_equal(np.sort(got["example_index"]), clients[c])
  assert B.padding_fraction(b1) == pytest.approx(1 - 23 / (3 * 3 * 4))
  assert B.padding_fraction(b1) == pytest.approx(B.planned_padding_fraction([11, 3, 9], 4, 1))


def test_fixed_steps_and_determinism():
  ex = _examples()
  clients = [np.arange(0, 11), np.arange(11, 14)]
  b = B.make_client_batches(ex, clients, 4, seed=7, round=3, num_steps=5)
  assert b["tokens"].shape == (2, 5, 4, 5) and b["step_mask"].all() and b["example_mask"].all()
  assert set(b["example_index"][1].ravel()) == {11, 12, 13}
  same = B.make_client_batches(ex, clients, 4, seed=7, round=3, num_steps=5)
  assert np.array_equal(b["example_index"], same["example_index"])
  nxt = B.make_client_batches(ex, clients, 4, seed=7, round=4, num_steps=5)
  assert not np.array_equal(b["example_index"], nxt["example_index"])
  # a client's batches depend on (seed, round, client id), not on who is batched with it
  alone = B.make_client_batches(ex, clients[1:], 4, seed=7, round=3, num_steps=5, client_ids=[1])
  assert np.array_equal(alone["example_index"][0], b["example_index"][1])


def test_grouping_reduces_padding():
  sizes = [2353, 1709, 248, 222, 239, 764, 926, 1716, 1279, 320]
  groups = B.group_clients_by_size(sizes, 2)
  assert sorted(np.concatenate(groups).tolist()) == list(range(10))
  one = B.planned_padding_fraction(sizes, 16, 1)
  grouped = B.planned_padding_fraction(sizes, 16, 1, groups)
  assert one > 0.5 and grouped < 0.15
  with pytest.raises(ValueError, match="exactly one of num_steps"):
    B.make_client_batches(_examples(), [np.arange(3)], 2, seed=0, round=0)
  with pytest.raises(ValueError, match="num_padded_steps=1"):
    B.make_client_batches(
        _examples(), [np.arange(9)], 2, seed=0, round=0, epochs=1, num_padded_steps=1
    )
