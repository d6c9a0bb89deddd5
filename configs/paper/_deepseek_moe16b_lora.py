"""Shared builder of the paper's DeepSeek-MoE-16B + LoRA configs (MMLU and HellaSwag).

Not a config on its own: ``mmlu_deepseek_moe16b_lora.py`` and
``hellaswag_deepseek_moe16b_lora.py`` call :func:`build` (their docstrings give the commands,
the memory and time estimates and the mesh). Everything the two share is here; the
per-dataset numbers (sequence length, batch size, evaluation metric) are arguments.
"""

import pathlib

import ml_collections
from ml_collections import config_dict

from fedalign.config_files import load_module

REPO = pathlib.Path(__file__).resolve().parents[2]


def _common():
  return load_module(REPO / "configs" / "common.py")


def shared_data_dir(dataset: str) -> str:
  """``<repo>/../shared/data/<dataset>``: the benchmark files next to the repository.

  Resolved from this file's location, so it does not depend on the working directory; a
  missing directory is reported by ``validate_config`` as an error naming config.data.data_dir.
  """
  return str((REPO / ".." / "shared" / "data" / dataset).resolve())


def build(
    dataset: str,
    arg: str | None,
    *,
    seq_len: int,
    batch_size: int,
    eval_batch_size: int,
    mc_metric: str,
    runlocal_seq_len: int
) -> ml_collections.ConfigDict:
  """The DeepSeek-MoE-16B LoRA setup on ``dataset``; ``arg='runlocal'``: the tiny variant."""
  common = _common()
  c = common.fedalign_paper(common.default_config())  # the paper's protocol: its literal reading
  c.method = "fedalign"

  c.data.dataset = dataset  # fixed 80/20 split per topic group, see
  c.data.data_dir = shared_data_dir(dataset)  # fedalign/data/multiple_choice.py
  c.data.num_clients = 10
  c.data.partition = "dirichlet"  # over topic groups (MMLU subject, HellaSwag activity)
  c.data.alpha = 0.1  # the paper's non-IID column; 1.0 = its "IID" column
  c.data.min_client_size = 20
  c.data.seq_len = seq_len
  c.data.max_train_examples = 0
  c.data.max_test_examples = 0

  c.model.type = "decoder"
  c.model.family = "deepseek_moe"
  # Required: a local deepseek-ai/deepseek-moe-16b-base directory (sizes, weights and
  # tokenizer come from it). A placeholder: unset is an error naming this field.
  c.model.hf_checkpoint = config_dict.placeholder(str)
  c.model.dtype = "bfloat16"  # parameters and compute (routers stay float32)
  c.model.lora_rank = 8
  c.model.lora_alpha = 16.0
  # Dropless block-sparse experts: each token's top-6 of 64 routed experts only, nothing
  # dropped (the checkpoint's function); --config.model.capacity_factor=1.25 switches to
  # capacity dispatch (see the time estimate of mmlu_deepseek_moe16b_lora.py).
  c.model.moe_impl = "sparse"
  c.model.moe_block_size = 64
  c.model.capacity_factor = 0.0

  c.train.rounds = 25
  c.train.clients_per_round = 10
  c.train.local_epochs = 1
  c.train.local_steps = 0  # one local epoch per round
  c.train.batch_size = batch_size
  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-4
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.load_balance_coef = 0.001  # DeepSeek-MoE's own aux_loss_alpha
  c.train.z_loss_coef = 0.0
  c.train.trainable = "lora"  # adapters (attention + every routed expert) + routers
  c.train.chunk_size = 1  # clients one after another inside the jitted round
  c.train.use_mesh = False

  c.fedalign.lambda_reg = 0.1

  c.eval.every = 5  # and after the last round
  c.eval.batch_size = eval_batch_size  # questions x 4 options: batch_size // 4 per forward
  c.eval.mc_metric = mc_metric  # acc | acc_norm (per-character, HellaSwag's usual)
  c.checkpoint.every = 5
  c.checkpoint.keep = 1  # a checkpoint holds the full params (~33 GB)

  if arg == "runlocal":
    common.tiny_federation(c, vocab_size=512, seq_len=runlocal_seq_len)
    # A tiny DeepSeek-MoE: layer 0 dense (first_k_dense=1), layer 1 MoE with 8 fine-grained
    # routed experts (top-2) + an ungated shared expert.
    common.tiny_model(
        c,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        num_experts=8,
        top_k=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        lora_rank=4,
    )
    c.model.dtype = "float32"
    c.eval.every = 1
    c.eval.batch_size = 64
  return c
