"""The pre-training of the shipped checkpoint ``fedalign/pretrained/moe-small``.

A fine-grained DeepSeek-MoE-shaped causal LM (the shape of the paper's DeepSeek-MoE-16B, at
CPU scale): hidden 96, 3 layers of which the first is dense (feed-forward 192, DeepSeek's
``first_k_dense=1``), then 2 MoE layers of 16 routed experts (intermediate 32), top-2, plus one
always-on shared expert (intermediate 64); 4 heads (2 key/value heads); a 2,048-token byte-level
BPE trained on the pre-training text with the AG News label words (`` World``, `` Sports``,
`` Business``, `` Tech``) added as tokens (2,052); 0.87M parameters (1.7 MB in bf16).
Trained centrally by :mod:`fedalign.pretrain` on Dolly-15k + MMLU + HellaSwag text (never AG
News: the federated data) as a causal LM with the load-balancing loss (coefficient 0.01):
1,000 steps of 32 windows of 128 tokens (4.1M tokens, 0.56 epochs), AdamW 3e-3 with 100
warm-up steps and cosine decay; ``step_250/``, ``step_500/``, ``step_750/`` snapshots.

Command (``pretrain.data_dir``: the folder with dolly/, mmlu/, hellaswag/)::

    python -m fedalign.pretrain --config=configs/pretrain_small.py \
        --config.pretrain.data_dir=../shared/data --workdir=/tmp/moe-small

then ``python -m fedalign.pretrained.ship`` stores it in bf16 inside the package with its
provenance. Measured: wall time and held-out loss in the shipped
``fedalign/pretrained/moe-small/pretrain_info.json`` and docs/pretraining.md (the sizes were
cut from a first 2.4M-parameter candidate, hidden 128 and 4 layers, whose steps took 2-3.5 s
on the shared cores). ``:short`` is 300 steps (for trying settings), ``:runlocal`` a tiny
variant (seconds; tests).
"""

import pathlib

import ml_collections

from fedalign.config_files import load_module

REPO = pathlib.Path(__file__).resolve().parents[1]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  common = load_module(REPO / "configs" / "common.py")
  c = common.default_config()
  c.data.vocab_size = 2048
  c.data.seq_len = 128
  common.moe_small_model(c)
  c.train.load_balance_coef = 0.01

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.enabled = True
  c.pretrain.dir = ""
  c.pretrain.data_dir = str((REPO.parent / "shared" / "data").resolve())
  c.pretrain.sources = "dolly,mmlu,hellaswag"
  c.pretrain.max_chars = 0
  c.pretrain.added_tokens = (" World", " Sports", " Business", " Tech")
  c.pretrain.steps = 1000
  c.pretrain.batch_size = 32
  c.pretrain.seq_len = 128
  c.pretrain.learning_rate = 3e-3
  c.pretrain.warmup_steps = 100
  c.pretrain.weight_decay = 0.01
  c.pretrain.seed = 0
  c.pretrain.save_every = 250  # intermediate step_N/ checkpoints (not in the cache key)

  variants = [v for v in (arg or "").split(",") if v]
  for v in variants:
    if v == "short":
      c.pretrain.steps = 300
      c.pretrain.warmup_steps = 50
    elif v == "runlocal":
      c.data.vocab_size = 300
      c.model.hidden_size = 32
      c.model.intermediate_size = 64
      c.model.num_layers = 2
      c.model.num_experts = 4
      c.model.moe_intermediate_size = 16
      c.model.shared_expert_intermediate_size = 16
      c.pretrain.max_chars = 100_000
      c.pretrain.steps = 20
      c.pretrain.seq_len = 32
      c.pretrain.batch_size = 8
    else:
      raise ValueError(
          f"configs/pretrain_small.py: unknown variant {v!r}; expected 'short' or 'runlocal'"
      )
  return c
