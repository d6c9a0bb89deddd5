"""Switch Transformer in the federated engine: seq2seq task, every aggregator, the paper config.

Compilation dominates these tests on CPU, so the ``fast_compile`` fixture turns off most XLA
optimisations (``jax_disable_most_optimizations``) while they run: the numbers are the same,
compiling is 2-4x faster, and the setting is restored afterwards.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedalign.data.formatting import (format_seq2seq_classification, seq2seq_label_candidates)
from fedalign.data.tokenize import ByteTokenizer, train_bpe
from fedalign.algorithms import make_algorithm
from fedalign.federated.client import make_client_update
from fedalign.federated.round import init_server_state, make_round_fn
from fedalign.data.federated import FederatedData
from fedalign.federated.server import run_experiment
from fedalign.models.from_config import load_model
from fedalign.federated.task import Seq2SeqTask
from fedalign.metrics.evaluation import make_seq2seq_classification_evaluator
from fedalign.models import MoEModel, build_module, init_params
from fedalign.models.lora import partition, trainable_mask
from fedalign.models.switch import SwitchTransformer, shift_right, switch_tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("fedavg", "fedprox", "fedadam", "scaffold", "fedmoe", "fedalign")
# One encoder and one decoder layer, both MoE: the smallest Switch with routers in both stacks.
# switch_tiny keeps router_jitter_noise=0.01, so training draws the per-step 'dropout' rng.
MICRO = dict(
    vocab_size=32,
    d_model=16,
    d_kv=4,
    num_heads=2,
    d_ff=16,
    num_layers=1,
    num_decoder_layers=1,
    encoder_sparse_step=1,
    decoder_sparse_step=1,
    expert_capacity=4,
    relative_attention_num_buckets=4,
    relative_attention_max_distance=8,
)
BLOCKS = ("encoder/block_0/mlp", "decoder/block_0/mlp")


@pytest.fixture(autouse=True)
def fast_compile():
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def load_config(rel, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{rel.replace('/', '_')}", REPO / rel)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def micro_batches(c=2, s=2, b=2, t=6, length=3, seed=0):
  """(C, S, B, ...) seq2seq batches with encoder/target padding and one padded step."""
  rng = np.random.default_rng(seed)
  mask = np.ones((c, s, b, t), bool)
  mask[..., -2:] = rng.random((c, s, b, 2)) < 0.5
  mask = np.cumprod(mask, axis=-1).astype(bool)  # right padding only
  tmask = np.ones((c, s, b, length), bool)
  tmask[:, :, 0, -1] = False  # first row's target is shorter
  step_mask = np.ones((c, s), bool)
  step_mask[1, 1] = False  # client 1 has one real step
  return {
      "tokens": rng.integers(2, 32, (c, s, b, t)).astype(np.int32),
      "mask": mask,
      "target_tokens": rng.integers(2, 32, (c, s, b, length)).astype(np.int32),
      "target_mask": tmask,
      "step_mask": step_mask,
  }


# The default run keeps FedAlign-MoE (the method whose per-expert statistics the Switch routers
# feed); every aggregator's round on the decoder is in tests/test_golden.py, so the other
# aggregators on the Switch model (10-16 s each) run with -m slow.
@pytest.mark.parametrize(
    "method", [m if m == "fedalign" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_one_round_per_aggregator_updates_experts_and_routers(method):
  cfg = switch_tiny(**MICRO)
  module = build_module(cfg)
  params = init_params(cfg, 0)
  config = load_config("configs/default.py")
  config.method = method
  config.train.learning_rate = 1e-2  # the client optimizer's (SCAFFOLD's control update)
  if method == "fedadam":
    config.server.learning_rate = 1e-2
  mask = trainable_mask(params, "full")
  alg = make_algorithm(config, partition(params, mask)[0], 2)
  cu = make_client_update(Seq2SeqTask(module), alg, optax.adamw(1e-2), load_balance_coef=0.01)
  round_fn = jax.jit(make_round_fn(cu, alg, mask, seed=0))
  state = init_server_state(params, alg, mask, 2)
  batches = micro_batches()
  new, out = round_fn(state, batches, jnp.array([3.0, 1.0]), jnp.arange(2), 0)

  assert np.isfinite(float(out["train_loss"])) and not np.any(out["excluded"])
  for leaf in jax.tree.leaves(new["params"]):
    assert np.all(np.isfinite(np.asarray(leaf)))
  changed = jax.tree.map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, new["params"]
  )
  assert all(jax.tree.leaves(changed)), changed
  for block in BLOCKS:
    for leaf in ("router/kernel", "experts/wi", "experts/wo"):
      assert _get(changed, f"{block}/{leaf}"), (block, leaf)
  # Routing statistics count exactly the real tokens of the real steps (padding excluded).
  real = batches["step_mask"][:, :, None, None]
  enc, dec = out["routing_stats"][BLOCKS[0]], out["routing_stats"][BLOCKS[1]]
  np.testing.assert_array_equal(enc["token_count"], (batches["mask"] & real).sum((1, 2, 3)))
  np.testing.assert_array_equal(dec["token_count"], (batches["target_mask"] & real).sum((1, 2, 3)))


def test_multi_token_label_words_are_scored_as_whole_sequences():
  tok = ByteTokenizer()  # every label word is 2+ tokens
  words = ["ab", "cde"]
  cfg = switch_tiny(
      **dict(MICRO, vocab_size=tok.vocab_size, expert_capacity=8),
      pad_token_id=tok.pad_id,
      eos_token_id=tok.eos_id,
      decoder_start_token_id=tok.pad_id,
      router_jitter_noise=0.0,
  )  # no randomness: training == eval
  params = init_params(cfg, 1)
  ex = format_seq2seq_classification(
      ["hello there", "x" * 40],
      [1, 0],
      tok,
      label_words=words,
      template="{text} Topic:",
      max_len=16,
  )
  cand, cmask = seq2seq_label_candidates(tok, words)
  # Targets are whole words + EOS (never truncated); long text is cut from its left.
  assert cand.tolist() == [[100, 101, 2, 0], [102, 103, 104, 2]]
  np.testing.assert_array_equal(ex["target_tokens"], cand[[1, 0]])
  assert tok.decode(ex["tokens"][1][ex["mask"][1]]) == "x" * 8 + " Topic:"
  with pytest.raises(ValueError, match="target_len=3 is too small for label word 'cde'"):
    format_seq2seq_classification(["a"], [0], tok, label_words=words, target_len=3)

  ev = make_seq2seq_classification_evaluator(cfg, (cand, cmask), batch_size=2)
  res = ev(params, {k: jnp.asarray(ex[k]) for k in ("tokens", "mask", "labels")})
  # By hand: teacher-force each candidate, sum log p of its real tokens one by one.
  apply = jax.jit(lambda p, *a: SwitchTransformer(cfg).apply({"params": p}, *a)[0])
  expected = np.zeros((2, 2))
  for k in range(2):
    ids = np.repeat(cand[k : k + 1], 2, axis=0)
    dec_in = shift_right(jnp.asarray(ids), cfg.decoder_start_token_id, cfg.pad_token_id)
    logits = apply(params, ex["tokens"], ex["mask"], dec_in)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for i in range(2):
      expected[i, k] = sum(logp[i, t, ids[i, t]] for t in range(int(cmask[k].sum())))
  np.testing.assert_allclose(np.asarray(res["logprobs"]), expected, rtol=1e-5, atol=1e-5)
  assert set(res) >= {"acc", "correct", "pred", "logprobs"}
  np.testing.assert_array_equal(res["pred"], expected.argmax(1))
  # The training loss is the mean negative log-likelihood of the same target tokens.
  task = Seq2SeqTask(build_module(cfg))
  assert task.deterministic
  loss, _ = jax.jit(task.loss)(
      params,
      {k: jnp.asarray(ex[k]) for k in ("tokens", "mask", "target_tokens", "target_mask")},
      jax.random.key(0),
  )
  labels = ex["labels"]
  nll = -sum(expected[i, labels[i]] for i in range(2)) / ex["target_mask"].sum()
  np.testing.assert_allclose(float(loss), nll, rtol=1e-5)


def test_runlocal_paper_config_end_to_end(tmp_path):
  c = load_config("configs/paper/agnews_switch_base16.py", "runlocal")
  assert c.model.type == "switch" and c.method == "fedalign"
  summary = run_experiment(c, tmp_path)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == list(range(1, c.train.rounds + 1))
  for r in rows:
    assert 0.0 <= r["test_accuracy"] <= 1.0 and np.isfinite(r["train_loss"])
    assert "routing_divergence" in r and not r["excluded_clients"]
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["final_test_accuracy"] == summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
  assert saved["config"]["model"]["type"] == "switch"


@pytest.mark.parametrize(
    "checkpoint,match",
    [
        (None, r"config\.model\.hf_checkpoint is not set.*--config\.model\.hf_checkpoint="),
        (
            "/nonexistent/switch-base-16",
            r"config\.model\.hf_checkpoint='/nonexistent/switch-base-16'",
        ),
    ],
)
def test_paper_config_needs_a_checkpoint(tmp_path, checkpoint, match):
  c = load_config("configs/paper/agnews_switch_base16.py")
  assert c.model.hf_checkpoint is None and c.train.rounds == 25 and c.data.alpha == 0.1
  assert c.train.learning_rate == 1e-4 and c.data.num_clients == 10
  if checkpoint is not None:
    c.model.hf_checkpoint = checkpoint
  with pytest.raises(ValueError, match=match):
    run_experiment(c, tmp_path)
  assert not (tmp_path / "metrics.jsonl").exists()


def _checkpoint_config(tmp_path, model_type):
  """runlocal config whose hf_checkpoint is a saved tiny model + its own tokenizer.json."""
  c = load_config("configs/paper/agnews_switch_base16.py", "runlocal")
  ckpt = tmp_path / "ckpt"
  tok = train_bpe(["the news of the day " * 3, "sports and business"] * 10, vocab_size=280)
  tok.save(ckpt)
  if model_type == "switch":
    cfg = switch_tiny(vocab_size=tok.vocab_size + 3)
    from fedalign.models.hf_switch import save_switch_pretrained

    save_switch_pretrained(MoEModel(cfg, init_params(cfg, 3)), ckpt)
  else:
    from fedalign.models import family_config
    from fedalign.models.hf import save_pretrained

    cfg = family_config(
        "mixtral",
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        num_experts=4,
        top_k=2,
        moe_intermediate_size=8,
        intermediate_size=8,
    )
    save_pretrained(MoEModel(cfg, init_params(cfg, 3)), ckpt)
  c.model.type = model_type
  c.model.hf_checkpoint = str(ckpt)
  return c, cfg, tok


@pytest.mark.parametrize("model_type", ["switch", "decoder"])
def test_hf_checkpoint_gives_model_and_tokenizer(tmp_path, model_type):
  c, cfg, tok = _checkpoint_config(tmp_path, model_type)
  data = FederatedData(c, tmp_path / "work")
  assert data.tokenizer.vocab_size == tok.vocab_size  # not a freshly trained BPE
  assert data.tokenizer.encode(["news"]) == tok.encode(["news"])
  mcfg, params = load_model(c, data.tokenizer)
  assert type(mcfg) is type(cfg) and mcfg.vocab_size == cfg.vocab_size
  np.testing.assert_array_equal(
      np.asarray(jax.tree.leaves(params)[0]), np.asarray(jax.tree.leaves(init_params(cfg, 3))[0])
  )
  keys = set(data.round_batches(c, np.arange(2), 0))
  if model_type == "switch":
    assert keys == {"tokens", "mask", "target_tokens", "target_mask", "step_mask"}
    c.model.type = "decoder"
  else:
    assert keys == {"tokens", "mask", "target_mask", "step_mask"}
    c.model.type = "switch"
  with pytest.raises(ValueError, match="config.model.type="):
    load_model(c, data.tokenizer)
