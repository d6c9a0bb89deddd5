"""Central pre-training (fedalign.pretrain), the validation hold-out and per-client routing."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from fedalign import pretrain as pt
from fedalign.data.federated import FederatedData
from fedalign.federated import server
from fedalign.federated.config_checks import validate_config
from fedalign.models.hf import load_pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(arg="runlocal"):
  spec = importlib.util.spec_from_file_location("cpu_analog", REPO / "configs" / "cpu_analog.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_pack_windows():
  w = pt.pack_windows([[5, 6, 7], [8], [9]], 4, bos_id=1, eos_id=2)
  assert w.tolist() == [[1, 5, 6, 7], [2, 1, 8, 2]]  # the tail [1, 9, 2] is dropped


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("sources", "dolly,wiki", "pretrain.sources"),
        ("steps", 0, "pretrain.steps"),
        ("learning_rate", 0.0, "pretrain.learning_rate"),
        ("data_dir", "/nonexistent/data", "pretrain.data_dir"),
    ],
)
def test_bad_pretrain_config(field, value, match):
  cfg = _config()
  cfg.pretrain[field] = value
  with pytest.raises(ValueError, match=match):
    pt.validate_pretrain_config(cfg)


def test_pretrain_text_must_be_disjoint_from_the_task():
  cfg = _config()
  cfg.data.dataset = "mmlu"  # MMLU questions cannot be pre-training text for an MMLU run
  with pytest.raises(ValueError, match="disjoint"):
    pt.validate_pretrain_config(cfg)


def test_pretrain_and_hf_checkpoint_are_exclusive(tmp_path):
  cfg = _config()
  cfg.model.hf_checkpoint = str(tmp_path)
  with pytest.raises(ValueError, match="choose one"):
    pt.maybe_pretrained(cfg, tmp_path)


def test_corpus_has_no_agnews_text(shared_data):
  docs = pt.pretrain_corpus(shared_data, ("dolly", "mmlu", "hellaswag"), max_chars=300_000)
  assert sum(map(len, docs)) >= 300_000
  from fedalign.data.agnews import load_embedded_agnews

  train, test = load_embedded_agnews()
  news = set(train.text[:500]) | set(test.text[:500])
  assert not news & set(docs)
  # interleaved: all three sources contribute to a capped corpus
  assert any("\n" in d and len(d.split("\n")) == 5 for d in docs)  # an MMLU question + 4


def test_pretrain_learns_and_is_cached(tmp_path, shared_data):
  cfg = _config()
  cfg.pretrain.data_dir = str(shared_data)
  cfg.pretrain.steps = 60
  out = pt.ensure_pretrained(cfg, tmp_path)
  assert out == tmp_path / "pretrained"
  info = json.loads((out / "pretrain_info.json").read_text())
  assert info["validation_loss_after"] < info["validation_loss_before"] - 0.3
  model = load_pretrained(out)
  assert model.config.num_experts == cfg.model.num_experts
  assert model.config.hidden_size == cfg.model.hidden_size
  from fedalign.data.tokenize import HFTokenizer

  tok = HFTokenizer.from_file(out)
  for word in cfg.pretrain.added_tokens:  # label words are whole tokens
    assert len(tok.encode([word])[0]) == 1
  stamp = (out / "model.safetensors").stat().st_mtime_ns
  assert pt.ensure_pretrained(cfg, tmp_path) == out  # cached: not trained again
  assert (out / "model.safetensors").stat().st_mtime_ns == stamp
  cfg.pretrain.steps = 61  # another config: trained again
  pt.ensure_pretrained(cfg, tmp_path)
  assert (out / "model.safetensors").stat().st_mtime_ns != stamp
  assert json.loads((out / "pretrain_info.json").read_text())["fields"]["pretrain"]["steps"] == 61


# 49 s: -m slow. The federated start from a pre-trained checkpoint is in the default run through
# the shipped one (tests/test_pretrained.py, the demo notebook's test).
@pytest.mark.slow
def test_federated_run_from_pretrained(tmp_path, shared_data):
  cfg = _config()
  cfg.pretrain.data_dir = str(shared_data)
  cfg.train.rounds = 1
  summary = server.run_experiment(cfg, tmp_path)
  assert summary["checkpoint"] == str(tmp_path / "pretrained")
  assert summary["config"]["pretrain"]["enabled"] is True  # the config as given
  assert 0.0 <= summary["final_test_accuracy"] <= 1.0
  with np.load(tmp_path / "routing_distributions.npz") as f:
    blocks = [k for k in f.files if k not in ("round", "client_ids")]
    assert len(blocks) == cfg.model.num_layers and int(f["round"]) == 1
    for k in blocks:
      p = f[k]
      assert p.shape == (cfg.data.num_clients, cfg.model.num_experts)
      np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
  # the same directory resumes (the config saved is the one given, not the rewritten one)
  cfg.train.rounds = 2
  assert server.run_experiment(cfg, tmp_path)["rounds"] == 2


def test_validation_holdout(tmp_path):
  spec = importlib.util.spec_from_file_location("default", REPO / "configs" / "default.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("runlocal")
  cfg.data.max_train_examples = 0
  cfg.data.max_test_examples = 0
  cfg.data.validation_examples = 500
  data = FederatedData(cfg, tmp_path / "a")
  assert data.client_sizes.sum() == 9776 - 500 and len(data.test["labels"]) == 2000
  cfg.eval.split = "validation"
  cfg.seed = 3  # the hold-out does not depend on the seed
  val = FederatedData(cfg, tmp_path / "b")
  assert len(val.test["labels"]) == 500
  assert val.client_sizes.sum() == 9776 - 500
  cfg.data.validation_examples = 0
  with pytest.raises(ValueError, match="eval.split"):
    validate_config(cfg)
  cfg.eval.split = "train"
  with pytest.raises(ValueError, match="eval.split"):
    validate_config(cfg)
