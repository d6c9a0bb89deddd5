"""validate_config rejects out-of-range numbers before any compute, naming the run config's
field and the accepted values (each of these used to run, silently or into a raw traceback)."""

from __future__ import annotations

import pytest

from fedalign.config_files import load_config
from fedalign.federated.config_checks import validate_config

BAD_FIELDS = [
    ("seed", -1, r"an integer >= 0"),
    ("data.min_client_size", -5, r"an integer >= 0"),
    ("data.max_train_examples", -5, r"0 = no limit"),
    ("data.max_test_examples", -1, r"0 = no limit"),
    ("data.validation_examples", -1, r"0 = none held out"),
    ("data.seq_len", 0, r"a positive integer"),
    ("train.local_steps", -1, r"0 \(train.local_epochs over the data\) or an integer >= 1"),
    ("train.learning_rate", 0.0, r"a positive float"),
    ("train.learning_rate", -1.0, r"a positive float"),
    ("train.weight_decay", -1.0, r"a float >= 0"),
    ("train.grad_clip", -1.0, r"0 = no clipping"),
    ("train.load_balance_coef", -0.1, r"a float >= 0"),
    ("server.learning_rate", -1.0, r"a positive float \(1.0 = plain averaging\)"),
    ("server.momentum", 2.0, r"a float in \[0, 1\)"),
    ("server.b1", -0.1, r"a float in \[0, 1\)"),
    ("server.b2", 1.5, r"a float in \[0, 1\)"),
    ("server.eps", 0.0, r"a positive float"),
    ("eval.batch_size", 0, r"an integer >= 1"),
    ("eval.batch_size", -1, r"an integer >= 1"),
    ("checkpoint.keep", 0, r"an integer >= 1 \(the newest checkpoints kept"),
    ("checkpoint.keep", -1, r"an integer >= 1"),
    # the model's own checks, under the run config's names (they said MoEConfig.top_k)
    ("model.top_k", 99, r"an integer in \[1, num_experts=4\]"),
    ("model.num_heads", 0, r"a positive integer"),
    ("model.num_kv_heads", 3, r"a divisor of num_heads=4"),
    ("train.z_loss_coef", -1.0, r"a float >= 0"),
]


def _set(cfg, path, value):
  *parents, leaf = path.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize("field,value,accepted", BAD_FIELDS)
def test_out_of_range_fields_are_named_with_the_accepted_values(field, value, accepted):
  cfg = load_config("configs/default.py:runlocal")
  validate_config(cfg)  # the variant itself is valid
  _set(cfg, field, value)
  with pytest.raises(ValueError, match=rf"^config\.{field}={value!r} is invalid: .*{accepted}"):
    validate_config(cfg)


def test_methods_that_align_experts_need_experts():
  cfg = load_config("configs/default.py:runlocal")
  cfg.method, cfg.model.num_experts = "fedalign", 0
  with pytest.raises(ValueError, match=r"config.model.num_experts=0 .*method='fedalign'"):
    validate_config(cfg)
  cfg.method = "fedavg"  # a dense model is fine for FedAvg
  validate_config(cfg)


def test_local_epochs_message_still_names_local_epochs():
  cfg = load_config("configs/default.py:runlocal")
  cfg.train.local_steps, cfg.train.local_epochs = 0, 0
  with pytest.raises(ValueError, match=r"config.train.local_epochs=0 is invalid"):
    validate_config(cfg)


def test_a_seq_len_too_short_for_the_prompt_names_data_seq_len(tmp_path):
  from fedalign.data.federated import FederatedData

  cfg = load_config("configs/default.py:runlocal")
  cfg.data.seq_len = 4
  validate_config(cfg)  # positive: only the formatter knows the prompt's length
  with pytest.raises(ValueError, match=r"^config.data.seq_len=4 is invalid: max_len=4 is too"):
    FederatedData(cfg, str(tmp_path))


def test_a_batch_larger_than_every_client_is_warned_about(tmp_path, caplog):
  import logging

  from fedalign.data.federated import FederatedData

  cfg = load_config("configs/default.py:runlocal")
  cfg.train.batch_size = 100_000
  with caplog.at_level(logging.WARNING):
    data = FederatedData(cfg, str(tmp_path))
  largest = int(data.client_sizes.max())
  assert f"config.train.batch_size=100000 exceeds the largest client's {largest} examples" in (
      caplog.text
  )


def test_a_checkpoint_of_another_family_is_refused_before_its_tokenizer(tmp_path):
  """A BERT or Llama directory (no tokenizer.json needed to tell) is refused by its
  config.json's model_type, naming the supported ones; a supported decoder checkpoint with
  model.type='switch' is pointed at 'decoder'."""
  import json

  cfg = load_config("configs/default.py")
  cfg.model.hf_checkpoint = str(tmp_path)
  for hf_type in ("bert", "llama"):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": hf_type}))
    with pytest.raises(
        ValueError,
        match=rf"config.model.hf_checkpoint=.* model_type='{hf_type}'; supported are "
        r"\['deepseek', 'mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe'\]",
    ):
      validate_config(cfg)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
  cfg.model.type = "switch"
  with pytest.raises(
      ValueError, match=r"config.model.type='switch' is invalid: expected 'decoder'"
  ):
    validate_config(cfg)


def test_run_files_saved_before_a_field_existed_still_count_as_the_same_config():
  """The shipped grids' run files (robustness: 3 x 435 cells, pretrained_grid, cpu_analog...)
  were written before fedalign.selection_min_cv existed: at its default they are the same
  config (finished cells are skipped, workdirs resume), at another value they are not."""
  import json
  import pathlib

  from fedalign.config_files import config_differences, flatten_config

  repo = pathlib.Path(__file__).resolve().parents[1]
  path = repo / "experiments/results/pretrained_grid/fedalign_a0.1_s0/summary.json"
  stored = json.loads(path.read_text())["config"]
  assert "fedalign.selection_min_cv" not in flatten_config(stored)
  now = {**flatten_config(stored), "fedalign.selection_min_cv": 0.0}
  assert config_differences(stored, now) == []
  now["fedalign.selection_min_cv"] = 0.5
  assert config_differences(stored, now) == ["fedalign.selection_min_cv"]
  # the shipped checkpoint from another checkout (the grid stored /work/main/...) is the same
  now["fedalign.selection_min_cv"] = 0.0
  assert flatten_config(stored)["model.hf_checkpoint"].endswith("fedalign/pretrained/moe-small")
  now["model.hf_checkpoint"] = "/elsewhere/site-packages/fedalign/pretrained/moe-small/"
  assert config_differences(stored, now) == []
  now["model.hf_checkpoint"] = "/elsewhere/my-moe"
  assert config_differences(stored, now) == ["model.hf_checkpoint"]
