"""The paper's DeepSeek-MoE-16B + LoRA configs (MMLU, HellaSwag) and federated multiple choice.

The full configs need a local checkpoint (tested: they fail with an error naming
model.hf_checkpoint); their ``runlocal`` variants (tiny random DeepSeek-MoE, LoRA) run end to
end on the shared MMLU / HellaSwag files. Compilation dominates on CPU, so the end-to-end tests
turn off most XLA optimisations while they run (same numbers, faster compiles).
"""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedalign.data import formatting as fmt
from fedalign.data import multiple_choice as mc
from fedalign.data.tokenize import ByteTokenizer
from fedalign.data.federated import FederatedData
from fedalign.federated.config_checks import validate_config
from fedalign.federated.hooks import make_specialization
from fedalign.federated.server import run_experiment
from fedalign.metrics.evaluation import make_multiple_choice_evaluator

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {
    "mmlu": "configs/paper/mmlu_deepseek_moe16b_lora.py",
    "hellaswag": "configs/paper/hellaswag_deepseek_moe16b_lora.py",
}
# Rows of the fixed split: (train pool, held-out test, topic groups).
SPLIT_SIZES = {"mmlu": (11_535, 2_792, 57), "hellaswag": (8_111, 1_931, 192)}


def load_config(dataset, arg=None):
  spec = importlib.util.spec_from_file_location(f"paper_cfg_{dataset}", REPO / CONFIGS[dataset])
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture
def fast_compile():
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


MMLU_REC = {
    "subject": "high_school_math",
    "question": "What is 2+2?",
    "choices": ["1", "4", "3", "5"],
    "answer": 1,
}
HELLASWAG_REC = {
    "activity_label": "Roofing",
    "ctx": "A man is sitting on a roof. he",
    "endings": [
        "is using wrap.",
        "is ripping tiles off.",
        "holds a cube.",
        "starts pulling up roofing on a roof.",
    ],
    "label": 3,
}


@pytest.mark.parametrize(
    "dataset,record,answer",
    [
        ("mmlu", MMLU_REC, " B"),
        ("hellaswag", HELLASWAG_REC, " starts pulling up roofing on a roof."),
    ],
)
def test_train_target_mask_is_exactly_the_answer(dataset, record, answer):
  tok = ByteTokenizer()
  split = mc.MCSplit([record], ["unused"], np.zeros(1, np.int32), ("g",))
  tr = mc.format_train(dataset, split, tok, max_len=256)
  te = mc.format_test(dataset, split, tok, max_len=256)
  tm = tr["target_mask"][0]
  pos = np.flatnonzero(tm)
  assert tok.decode(tr["tokens"][0][tm]) == answer
  assert pos.tolist() == list(range(pos[0], pos[0] + len(answer)))  # one contiguous span ...
  assert pos[-1] == np.flatnonzero(tr["mask"][0])[-1]  # ... ending the sequence
  assert tr["tokens"][0][pos[0] - 1] != tok.pad_id and pos[0] > 1  # after the prompt
  # The training row is the test row of the gold option; the test rows are the standard ones.
  gold = int(tr["answers"][0])
  assert te["tokens"].shape == (1, mc.NUM_OPTIONS, 256) and te["answers"].tolist() == [gold]
  for key in ("tokens", "mask", "target_mask"):
    np.testing.assert_array_equal(tr[key][0], te[key][0, gold])
  ref = (
      fmt.format_mmlu([record], tok, max_len=256)
      if dataset == "mmlu"
      else fmt.format_hellaswag([record], tok, max_len=256)
  )
  for key in ("tokens", "mask", "target_mask", "option_chars"):
    np.testing.assert_array_equal(te[key], ref[key])


@pytest.mark.parametrize("dataset", ["mmlu", "hellaswag"])
def test_split_is_fixed_disjoint_and_stratified(dataset, shared_data):
  train, test = mc.load_splits(dataset, shared_data / dataset)
  n_train, n_test, n_groups = SPLIT_SIZES[dataset]
  assert (len(train), len(test), len(train.groups)) == (n_train, n_test, n_groups)
  assert test.groups == train.groups
  train_ids = [r["uid"] for r in train.records]
  test_ids = [r["uid"] for r in test.records]
  assert len(set(train_ids)) == len(train_ids) and not set(train_ids) & set(test_ids)
  # 20% of every group (n // 5 of its test-file rows) is held out
  field = mc.GROUP_FIELD[dataset]
  from_test_file = [r for r in train.records if not r["uid"].startswith("dev/")]
  rows = np.bincount(
      [train.groups.index(r[field]) for r in from_test_file], minlength=n_groups
  ) + np.bincount(test.label, minlength=n_groups)
  np.testing.assert_array_equal(np.bincount(test.label, minlength=n_groups), rows // 5)
  # the rule has no seed: a second read gives the same split
  again_train, again_test = mc.load_splits(dataset, shared_data / dataset)
  assert [r["uid"] for r in again_test.records] == test_ids
  assert [r["uid"] for r in again_train.records] == train_ids


def test_federated_split_does_not_depend_on_the_seed(tmp_path, shared_data):
  arrays = []
  for seed in (0, 1):
    c = load_config("hellaswag", "runlocal")
    c.seed = seed
    c.data.data_dir = str(shared_data / "hellaswag")
    c.data.tokenizer = "bytes"  # a seed-free tokenizer: compare the arrays themselves
    c.data.max_train_examples = c.data.max_test_examples = 0
    data = FederatedData(c, tmp_path / f"seed{seed}")
    arrays.append(data)
  a, b = arrays
  for key in a.test:
    np.testing.assert_array_equal(a.test[key], b.test[key])
  for key in a.train:
    np.testing.assert_array_equal(a.train[key], b.train[key])
  assert [x.tolist() for x in a.clients] != [x.tolist() for x in b.clients]  # the partition is


@pytest.mark.parametrize("dataset", ["mmlu", "hellaswag"])
def test_runlocal_federated_data(dataset, tmp_path, shared_data):
  c = load_config(dataset, "runlocal")
  assert pathlib.Path(c.data.data_dir) == (shared_data / dataset).resolve()
  data = FederatedData(c, tmp_path)
  n_groups = SPLIT_SIZES[dataset][2]
  t = c.data.seq_len
  assert data.multiple_choice and data.num_classes == n_groups
  assert data.train["tokens"].shape == (c.data.max_train_examples, t)
  assert data.test["tokens"].shape == (c.data.max_test_examples, 4, t)  # 4 choices
  assert set(np.unique(data.test["answers"])) <= {0, 1, 2, 3}
  assert data.test["labels"].max() < n_groups  # group ids: what per-client accuracy reweights
  assert data.label_counts.shape == (c.data.num_clients, n_groups)
  assert int(data.label_counts.sum()) == c.data.max_train_examples
  # every training row scores exactly its answer (1 token for MMLU's letters, an added token)
  n_target = data.train["target_mask"].sum(1)
  assert (n_target >= 1).all() and (n_target <= data.train["mask"].sum(1) - 2).all()
  if dataset == "mmlu":
    assert (n_target == 1).all()
  assert make_specialization(data, None, 512) is None  # (N, 4, T) test tokens: skipped


@pytest.mark.parametrize(
    "dataset,method",
    [
        pytest.param("mmlu", "fedavg", marks=pytest.mark.slow),
        ("mmlu", "fedalign"),
        pytest.param("hellaswag", "fedavg", marks=pytest.mark.slow),
        # 20 s; the multiple-choice path is the same as MMLU's (default run)
        pytest.param("hellaswag", "fedalign", marks=pytest.mark.slow),
    ],
)
def test_runlocal_config_end_to_end(dataset, method, tmp_path, shared_data, fast_compile):
  c = load_config(dataset, "runlocal")
  assert c.model.family == "deepseek_moe" and c.train.trainable == "lora"
  assert c.model.lora_rank >= 1 and not c.model.hf_checkpoint
  c.method = method
  c.train.rounds = 2 if method == "fedalign" else 1
  summary = run_experiment(c, tmp_path)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == list(range(1, c.train.rounds + 1))
  for r in rows:
    assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["train_loss"])
    assert len(r["client_accuracy"]) == c.data.num_clients
    assert 0.0 <= r["mean_client_accuracy"] <= 1.0
    assert not r["excluded_clients"] and "routing_divergence" in r
    assert "expert_specialization" not in r
  for key in ("final_test_accuracy", "best_test_accuracy", "last5_mean_test_accuracy"):
    assert math.isfinite(summary[key]) and 0.0 <= summary[key] <= 1.0
  assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
  assert summary["config"]["data"]["dataset"] == dataset
  assert (tmp_path / "plots" / "partition.png").exists()


def test_full_config_runs_from_a_tiny_bfloat16_checkpoint(tmp_path, shared_data, fast_compile):
  """The full MMLU config's path (checkpoint + its tokenizer, bfloat16, LoRA, dropless sparse,
  chunk_size=1, one local epoch) on a tiny saved DeepSeek-MoE instead of the 16B one."""
  from fedalign.data.tokenize import HFTokenizer, train_bpe
  from fedalign.models.from_config import load_model
  from fedalign.models import MoEModel, family_config, init_params
  from fedalign.models.hf import save_pretrained

  train, _ = mc.load_splits("mmlu", shared_data / "mmlu")
  ckpt = tmp_path / "ckpt"
  train_bpe(train.text[:2000], vocab_size=400, added_tokens=mc.ADDED_TOKENS["mmlu"]).save(ckpt)
  tok = HFTokenizer.from_file(ckpt)
  cfg = family_config(
      "deepseek_moe",
      vocab_size=tok.vocab_size,
      hidden_size=32,
      intermediate_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=4,
      num_experts=8,
      top_k=2,
      moe_intermediate_size=16,
      shared_expert_intermediate_size=32,
  )
  save_pretrained(MoEModel(cfg, init_params(cfg, 0)), ckpt)
  c = load_config("mmlu")
  c.model.hf_checkpoint = str(ckpt)
  c.data.num_clients = c.train.clients_per_round = 2
  c.data.min_client_size = 5
  c.data.max_train_examples, c.data.max_test_examples, c.data.seq_len = 40, 12, 96
  c.train.rounds = 1
  c.eval.batch_size = 16
  mcfg, params = load_model(c, tok)
  assert mcfg.dtype == mcfg.param_dtype == "bfloat16" and mcfg.lora_rank == 8
  assert (mcfg.moe_impl, mcfg.capacity_factor) == ("sparse", None)  # dropless
  lora = [x for path, x in jax.tree_util.tree_leaves_with_path(params) if "lora" in str(path)]
  assert lora and all(x.dtype == jnp.bfloat16 for x in lora)
  summary = run_experiment(c, tmp_path / "run")
  assert 0.0 <= summary["final_test_accuracy"] <= 1.0
  row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
  assert math.isfinite(row["train_loss"]) and not row["excluded_clients"]


@pytest.mark.parametrize("dataset", ["mmlu", "hellaswag"])
@pytest.mark.parametrize(
    "checkpoint,match",
    [
        (None, r"config\.model\.hf_checkpoint is not set.*--config\.model\.hf_checkpoint="),
        ("/nonexistent/deepseek-moe-16b", r"config\.model\.hf_checkpoint='/nonexistent/"),
    ],
)
def test_paper_config_needs_a_checkpoint(dataset, checkpoint, match, tmp_path):
  c = load_config(dataset)
  assert c.model.hf_checkpoint is None and c.model.family == "deepseek_moe"
  assert (c.train.rounds, c.train.local_epochs, c.train.local_steps) == (25, 1, 0)
  assert (c.data.num_clients, c.train.clients_per_round, c.data.alpha) == (10, 10, 0.1)
  assert c.train.learning_rate == 1e-4 and c.fedalign.lambda_reg == 0.1
  assert c.method == "fedalign" and c.train.trainable == "lora" and c.model.lora_rank == 8
  assert c.model.dtype == "bfloat16" and c.data.dataset == dataset
  if checkpoint is not None:
    c.model.hf_checkpoint = checkpoint
  with pytest.raises(ValueError, match=match):
    validate_config(c)
  with pytest.raises(ValueError, match=match):
    run_experiment(c, tmp_path)
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("data.data_dir", "/nonexistent/mmlu", r"config\.data\.data_dir='/nonexistent/mmlu'"),
        ("data.data_dir", "", r"config\.data\.data_dir=''"),
        ("model.type", "switch", r"config\.model\.type='switch'.*'decoder'"),
        ("eval.mc_metric", "f1", r"config\.eval\.mc_metric='f1'"),
        ("model.dtype", "int8", r"config\.model\.dtype='int8'"),
    ],
)
def test_bad_multiple_choice_config(field, value, match, tmp_path):
  c = load_config("mmlu", "runlocal")
  # A bad value is named whether or not the data exists here (field checks come before the
  # filesystem checks), so this test does not need ../shared.
  c.data.data_dir = str(tmp_path / "absent")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=match):
    run_experiment(c, tmp_path)
  assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_data_dir_names_the_field_without_validation(tmp_path):
  c = load_config("mmlu", "runlocal")
  c.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=r"config\.data\.data_dir=.*nowhere"):
    FederatedData(c, tmp_path)


def test_runlocal_data_dir_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
  here = load_config("mmlu", "runlocal").data.data_dir
  monkeypatch.chdir(tmp_path)
  assert load_config("mmlu", "runlocal").data.data_dir == here
  assert pathlib.Path(here) == (REPO / ".." / "shared" / "data" / "mmlu").resolve()


def test_evaluator_scores_answers_with_the_chosen_metric():
  tok = ByteTokenizer()
  # A uniform model: " c" (2 tokens) beats " bb" (3) on summed log-prob; per character the
  # two tie and argmax takes the first. The answer (option 0) sits under "answers";
  # "labels" holds a group id, which the evaluator must not read.
  ex = fmt.format_multiple_choice(["a"], [[" bb", " c"]], [0], tok, max_len=8)
  choices = {k: ex[k] for k in ("tokens", "mask", "target_mask", "option_chars")}
  choices.update(answers=ex["labels"], labels=jnp.array([1]))
  uniform = lambda p, t, m: jnp.zeros(t.shape + (tok.vocab_size,))
  acc = make_multiple_choice_evaluator(uniform, 2, labels_key="answers")(None, choices)
  norm = make_multiple_choice_evaluator(uniform, 2, labels_key="answers", metric="acc_norm")(
      None, choices
  )
  assert float(acc["acc"]) == 0.0 and float(norm["acc"]) == 1.0
  assert float(norm["acc_unnorm"]) == 0.0 and norm["correct"].tolist() == [True]
