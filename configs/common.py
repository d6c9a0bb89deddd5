"""What the config files share: the base config and the tiny ``:runlocal`` variants' overrides.

Not a config (no ``get_config``): the config files load it by path, as they load each other
(``configs/`` is a folder of files, not a package)::

    common = load_module(pathlib.Path(__file__).resolve().parent / "common.py")
    c = common.default_config()
    if arg == "runlocal":
      common.small_data(c, max_train_examples=2000, max_test_examples=400, vocab_size=512,
                        seq_len=48)
      common.tiny_model(c, num_experts=4)

Every helper changes ``c`` in place (and returns it); none adds what its caller does not ask
for, so a config reads as the list of its choices.
"""

import pathlib
from typing import Any

import ml_collections

from fedalign.config_files import load_config

CONFIGS = pathlib.Path(__file__).resolve().parent
REPO = CONFIGS.parent


def default_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``configs/default.py``'s ``get_config('base,' + arg)``: the base every other config edits
  (the from-scratch fields, without the default's pre-trained start).

  >>> default_config().train.rounds, default_config('runlocal').train.rounds
  (20, 3)
  """
  return load_config(CONFIGS / "default.py", "base" + (f",{arg}" if arg else ""))


# The most literal reading of the paper for each FedAlign-MoE option it leaves open
# (docs/method.md marks every option [paper] or [ours]); ``configs/default.py:paper``.
FEDALIGN_PAPER = dict(
    lambda_reg=0.1,
    regularizer_form="marginal",
    router_weighting="consistency",
    router_overlap="per_expert",
    adaptive_alpha=True,
    semantic_selection=True,
    semantic_similarity="gate",
    pairwise=True,
    permutation_alignment=False,
    alignment_margin=0.0,
    selection_min_cv=0.0,
)


def fedalign_paper(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """FedAlign-MoE options at the paper's literal reading (:data:`FEDALIGN_PAPER`).

  >>> fedalign_paper(default_config()).fedalign.regularizer_form
  'marginal'
  """
  c.fedalign.update(FEDALIGN_PAPER)
  return c


def small_data(
    c: ml_collections.ConfigDict,
    *,
    max_train_examples: int,
    max_test_examples: int,
    vocab_size: int,
    seq_len: int,
) -> ml_collections.ConfigDict:
  """A subset of the data, a small tokenizer and short sequences (the tiny variants)."""
  c.data.max_train_examples = max_train_examples
  c.data.max_test_examples = max_test_examples
  c.data.vocab_size = vocab_size
  c.data.seq_len = seq_len
  return c


def tiny_model(c: ml_collections.ConfigDict, **model_fields: Any) -> ml_collections.ConfigDict:
  """Width 32 (feed-forward 64) plus ``model_fields`` (e.g. ``num_experts=4``), in that order.

  >>> c = tiny_model(default_config(), num_experts=4)
  >>> c.model.hidden_size, c.model.intermediate_size, c.model.num_experts
  (32, 64, 4)
  """
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  for name, value in model_fields.items():
    c.model[name] = value
  return c


def tiny_federation(
    c: ml_collections.ConfigDict, *, vocab_size: int, seq_len: int
) -> ml_collections.ConfigDict:
  """The paper configs' CPU variant, minus the model sizes (:func:`tiny_model`).

  Random init (no checkpoint), a byte-level BPE tokenizer of ``vocab_size`` trained on the
  clients' text, 4 clients of at least 10 examples, 400 training / 100 test examples of
  ``seq_len`` tokens, 2 rounds of 2 local steps (batch 8, lr 1e-3) with all 4 clients at once,
  a checkpoint every round.

  >>> c = tiny_federation(default_config(), vocab_size=300, seq_len=32)
  >>> c.data.num_clients, c.train.rounds, c.train.local_steps, c.model.hf_checkpoint
  (4, 2, 2, '')
  """
  c.model.hf_checkpoint = ""  # random init from the sizes set by tiny_model
  c.data.tokenizer = "bpe"  # byte-level BPE trained on the clients' text
  c.data.vocab_size = vocab_size
  c.data.num_clients = 4
  c.data.min_client_size = 10
  c.data.max_train_examples = 400
  c.data.max_test_examples = 100
  c.data.seq_len = seq_len
  c.train.rounds = 2
  c.train.clients_per_round = 4
  c.train.local_steps = 2
  c.train.batch_size = 8
  c.train.learning_rate = 1e-3
  c.train.chunk_size = 0
  c.checkpoint.every = 1
  return c


# The architecture of the shipped pre-trained ``fedalign/pretrained/moe-small``
# (configs/pretrain_small.py trains it, configs/default.py fine-tunes it): DeepSeek-MoE-shaped,
# a dense first layer, 16 routed experts top-2 plus one shared expert.
MOE_SMALL_MODEL = dict(
    family="deepseek_moe",
    hidden_size=96,
    intermediate_size=192,  # the dense first layer
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    num_experts=16,
    top_k=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
)


def moe_small_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``c.model`` at the moe-small architecture (:data:`MOE_SMALL_MODEL`).

  >>> moe_small_model(default_config()).model.num_experts
  16
  """
  c.model.update(MOE_SMALL_MODEL)
  return c
