"""Config files: they load, share configs/common.py, and their docstrings give a command and
what it measured (or that it was not measured)."""

import pathlib

import pytest

from fedalign.config_files import load_config, load_module

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {
    "configs/default.py": (None, "runlocal"),
    "configs/cpu_analog.py": (None, "runlocal"),
    "configs/domain.py": (None, "runlocal", "drift,paper"),
    "configs/pretrain_small.py": (None, "runlocal"),
    "configs/ablation.py": ("direct_averaging", "permutation"),
    "configs/paper/agnews_switch_base16.py": (None, "runlocal"),
    "configs/paper/mmlu_deepseek_moe16b_lora.py": (None, "runlocal"),
    "configs/paper/hellaswag_deepseek_moe16b_lora.py": (None, "runlocal"),
}


@pytest.mark.parametrize("path", sorted(CONFIGS))
def test_config_loads_and_documents_command_and_number(path):
  for arg in CONFIGS[path]:
    c = load_config(REPO / path, arg)
    assert c.method in ("fedavg", "fedalign")
  doc = load_module(REPO / path).__doc__
  assert "python -m " in doc, f"{path}: no command in the docstring"
  assert (
      "easured" in doc
  ), f"{path}: the docstring says neither what was measured nor 'not measured'"


def test_common_helpers_are_what_the_runlocal_variants_use():
  common = load_module(REPO / "configs" / "common.py")
  assert not hasattr(common, "get_config")  # a helper module, not a config
  tiny = load_config(REPO / "configs" / "default.py", "runlocal")
  base = common.default_config()
  common.small_data(
      base, max_train_examples=2000, max_test_examples=400, vocab_size=512, seq_len=48
  )
  common.tiny_model(base, moe_intermediate_size=32, num_experts=4)
  base.train.rounds = 3
  assert base.to_json() == tiny.to_json()
  switch = load_config(REPO / "configs" / "paper" / "agnews_switch_base16.py", "runlocal")
  assert (switch.data.num_clients, switch.train.rounds, switch.model.hf_checkpoint) == (4, 2, "")
  assert switch.model.relative_attention_num_buckets == 8


def test_paper_preset_is_the_literal_reading_and_the_paper_protocols_use_it():
  from fedalign.config_files import load_config, load_module

  common = load_module(REPO / "configs" / "common.py")
  paper = load_config(REPO / "configs" / "default.py", "paper")
  both = load_config(REPO / "configs" / "default.py", "runlocal,paper")
  for key, value in common.FEDALIGN_PAPER.items():
    assert paper.fedalign[key] == value and both.fedalign[key] == value, key
  assert both.train.rounds == 3  # runlocal applied too
  for spec in (
      "configs/cpu_analog.py",
      "configs/ablation.py:semantic",
      "configs/paper/agnews_switch_base16.py:runlocal",
  ):
    c = load_config(REPO / spec.split(":")[0], (spec.split(":") + [None])[1])
    assert c.fedalign.regularizer_form == common.FEDALIGN_PAPER["regularizer_form"], spec
    assert c.fedalign.router_overlap == common.FEDALIGN_PAPER["router_overlap"], spec
  with pytest.raises(ValueError, match=r"unknown variant\(s\) \['papr'\]"):
    load_config(REPO / "configs" / "default.py", "papr")
