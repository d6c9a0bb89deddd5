"""data.task = 'lm' (configs/domain.py): next-token language modelling on the AG News texts,
clients partitioned by topic. Formatting, the evaluator against NumPy, the config checks, and a
run through the public entry point."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedalign.config_files import load_config, load_module
from fedalign.data.federated import FederatedData
from fedalign.data.formatting import format_lm
from fedalign.data.tokenize import ByteTokenizer
from fedalign.federated.config_checks import validate_config
from fedalign.federated.server import run_experiment
from fedalign.metrics.evaluation import lm_eval, make_lm_evaluator

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_format_lm_keeps_the_start_and_scores_every_text_token():
  tok = ByteTokenizer()
  ex = format_lm(["abcdefgh", "xy"], [3, 0], tok, num_labels=4, max_len=6)
  # BOS + the first 5 bytes (cut from the right), BOS + 2 bytes + padding
  assert ex["tokens"][0].tolist() == [tok.bos_id] + tok.encode(["abcde"])[0]
  assert ex["mask"].sum(1).tolist() == [6, 3]
  assert ex["target_mask"].sum(1).tolist() == [5, 2]
  assert not ex["target_mask"][:, 0].any()  # position 0 (BOS) is never a target
  assert (ex["target_mask"] <= ex["mask"]).all()
  assert ex["labels"].tolist() == [3, 0]
  with pytest.raises(ValueError, match="outside 0..3"):
    format_lm(["a"], [4], tok, num_labels=4)
  with pytest.raises(ValueError, match="max_len"):
    format_lm(["a"], [0], tok, num_labels=4, max_len=1)


def test_lm_eval_matches_numpy():
  rng = np.random.default_rng(0)
  n, t, v, k = 7, 5, 11, 3
  tokens = rng.integers(0, v, (n, t)).astype(np.int32)
  mask = np.ones((n, t), bool)
  mask[2, 3:] = False
  target = mask.copy()
  target[:, 0] = False
  target[4, :] = False  # a row without targets counts nowhere
  labels = np.array([0, 1, 2, 0, 1, 2, 0])
  table = rng.normal(size=(v, v)).astype(np.float32)  # logits depend on the current token
  logits_fn = lambda tb, mb: jnp.asarray(table)[tb]
  ex = {"tokens": tokens, "mask": mask, "target_mask": target, "labels": labels}
  r = lm_eval(logits_fn, ex, batch_size=3, num_labels=k)

  logits = table[tokens][:, :-1]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nxt = tokens[:, 1:]
  lp = np.take_along_axis(logp, nxt[..., None], -1)[..., 0]
  w = target[:, 1:]
  hit = logits.argmax(-1) == nxt
  np.testing.assert_allclose(float(r["nll"]), -(lp * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(r["ppl"]), np.exp(-(lp * w).sum() / w.sum()), rtol=1e-5)
  np.testing.assert_allclose(float(r["acc"]), (hit * w).sum() / w.sum(), rtol=1e-6)
  for label in range(k):
    rows = labels == label
    np.testing.assert_allclose(
        float(r["nll_by_label"][label]),
        -(lp * w)[rows].sum() / w[rows].sum(),
        rtol=1e-5,
    )
  np.testing.assert_allclose(
      np.asarray(r["correct"])[[0, 2]], [(hit * w)[i].sum() / w[i].sum() for i in (0, 2)]
  )
  assert float(r["correct"][4]) == 0.0
  # the jitted evaluator of a params tree gives the same numbers
  ev = make_lm_evaluator(lambda p, tb, mb: p["table"][tb], 3, k)
  r2 = ev({"table": jnp.asarray(table)}, {key: jnp.asarray(x) for key, x in ex.items()})
  np.testing.assert_allclose(float(r2["nll"]), float(r["nll"]), rtol=1e-6)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("data.task", "qa", r"data\.task.*one of \('classification', 'lm'\)"),
        ("model.type", "switch", r"data\.task.*'decoder'"),
        ("attack.kind", "label_flip", r"attack\.kind.*data\.task='lm'"),
    ],
)
def test_lm_task_bad_combinations_are_errors(field, value, match):
  c = load_config(REPO / "configs/domain.py", "runlocal")
  section, key = field.split(".")
  c[section][key] = value
  if field == "attack.kind":
    c.attack.fraction = 0.2
  with pytest.raises(ValueError, match=match):
    validate_config(c)


def test_domain_config_trains_a_language_model_on_topic_clients(tmp_path):
  """configs/domain.py:runlocal through the server loop: one topic per client, the metrics
  and summary carry the next-token accuracy, NLL and perplexity, and the LM improves."""
  c = load_config(REPO / "configs/domain.py", "runlocal")
  c.method = "fedalign"
  load_module(REPO / "configs/common.py").tiny_federation(
      c, vocab_size=c.data.vocab_size, seq_len=24
  )
  c.data.max_test_examples = 64
  c.train.local_steps = 3
  c.train.learning_rate = 3e-3
  c.eval.specialization_examples = 64
  validate_config(c)
  summary = run_experiment(c, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in records] == [1, 2]
  last = records[-1]
  assert 0.0 < last["test_accuracy"] < 1.0
  assert last["test_perplexity"] == pytest.approx(np.exp(last["test_nll"]), rel=1e-5)
  assert len(last["test_nll_by_label"]) == 4
  assert records[1]["test_nll"] < records[0]["test_nll"]  # it learns the texts
  assert last["expert_specialization"] > 0.0  # the text is routed (not only BOS)
  assert summary["final_test_nll"] == pytest.approx(last["test_nll"])
  assert summary["final_test_perplexity"] == pytest.approx(np.exp(last["test_nll"]), rel=1e-5)
  # one topic per client (pathological, classes_per_client=1); the tokenizer is the run's
  data = FederatedData(c, tmp_path)
  assert data.lm and [int((row > 0).sum()) for row in data.label_counts] == [1, 1, 1, 1]
  assert sorted(int(np.argmax(row)) for row in data.label_counts) == [0, 1, 2, 3]
