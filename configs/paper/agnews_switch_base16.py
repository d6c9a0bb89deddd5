"""Paper setup: federated fine-tuning of Switch-base-16 on AG News (FedAlign-MoE, section 6).

Command (a local copy of google/switch-base-16 is required; nothing is downloaded at run time)::

    python -m fedalign.main --config=configs/paper/agnews_switch_base16.py \\
        --config.model.hf_checkpoint=/path/to/switch-base-16 --workdir=/tmp/agnews_sb16_a0.1

The checkpoint directory is what ``SwitchTransformersForConditionalGeneration.save_pretrained``
plus the tokenizer's ``save_pretrained`` write (``config.json``, ``model.safetensors`` or a
sharded index, ``tokenizer.json``); weights load with :func:`fedalign.models.hf.load_pretrained`,
the tokenizer is the checkpoint's ``tokenizer.json`` (:class:`fedalign.data.tokenize.HFTokenizer`).
Leaving ``model.hf_checkpoint`` unset is an error that names it.

Setup [paper]: Switch-base-16 (T5-base encoder-decoder, 12+12 layers, 16 experts top-1 in every
other feed-forward layer, 619M parameters), 10 clients, Dirichlet label partition alpha = 0.1,
all 10 clients every round, 25 rounds, 1 local epoch, AdamW, learning rate 1e-4, lambda = 0.1.
The IID column of the paper's table is alpha = 1.0: add ``--config.data.alpha=1.0`` (and a new
``--workdir``). Other methods: ``--config.method=fedavg|fedprox|fedmoe|...``.
[ours]: text-to-text classification (encoder input ``"{text}\\nTopic:"`` + ``</s>``, target the
label word ``World``/``Sports``/``Business``/``Tech`` + ``</s>``, evaluated by scoring every
label word sequence as the decoder target), 128 encoder tokens, batch 32, weight decay 0.01,
gradient clipping 1.0, router losses 0.001/0.001 (Switch's own pre-training coefficients),
dropout 0.1 and router jitter 0.01 (the checkpoint's), the embedded AG News subset (9,776 train
rows, balanced 2,000-row test set); the full AG News (120k/7.6k) is
``--config.data.dataset=agnews --config.data.data_dir=DIR``.

Accuracy: not measured here (no accelerator); the paper's ablation rows on this setting are in
``configs/ablation.py``'s docstring.

Accelerator memory and time (estimates from parameter counts and FLOPs, NOT measured: no
Switch-base-16 run has been made with this code yet):

* Full fine-tuning (default, ``train.trainable='full'``), float32: weights 2.5 GB; one client's
  training state (weights + AdamW moments + gradients) ~10 GB, plus ~5-8 GB of activations at
  batch 32 x 128 tokens (the capacity-64 expert buffers dominate: 16 experts x 64 slots per
  row). The round keeps every client's delta (10 x 2.5 GB = 25 GB). Vmapping all 10 clients
  at once would need ~10 x 17 GB + 25 GB: it does not fit one GPU, hence ``train.chunk_size=1``
  here (clients trained one after another inside the same jitted round): ~50-60 GB peak, fits
  one 80 GB H100; an H200 (141 GB) takes ``--config.train.chunk_size=2`` (10 must be a
  multiple of it, else weight-0 padding clients are added). SCAFFOLD keeps 10 control variates
  of the model's size (+25 GB, and the round gathers another copy): use LoRA for it.
* LoRA (``--config.train.trainable=lora --config.model.lora_rank=8``: adapters on attention and
  experts, plus routers): ~14M trainable parameters (55 MB), frozen weights shared by the
  clients; memory is then activations, ~6-8 GB per vmapped client: ``chunk_size=5`` needs
  ~40 GB, ``chunk_size=0`` (all 10 at once) ~80 GB (H200).
* Time: with expert capacity 64 the MoE layers compute 16 x 64 slots per 128-token row (8x a
  dense FFN), ~225 GFLOP per training row, ~2.2 PFLOP per round for 9,776 rows (one epoch over
  all clients). On one H100 that is roughly 15-60 s of compute per round (TF32 vs strict fp32
  matmuls), plus a one-off compilation of a few minutes and ~5 s of evaluation per round:
  ~15-40 minutes for 25 rounds, within a factor ~3. The full AG News (120k rows) is 12x that.

Tiny variant that runs on CPU in seconds (random weights, no checkpoint, byte-level BPE trained
on the clients' text; what tests/test_switch_federated.py runs)::

    python -m fedalign.main --config=configs/paper/agnews_switch_base16.py:runlocal \\
        --workdir=/tmp/agnews_switch_tiny
"""

import pathlib

import ml_collections
from ml_collections import config_dict

from fedalign.config_files import load_module


def _common():
  return load_module(pathlib.Path(__file__).resolve().parents[1] / "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's Switch-base-16 setup; ``get_config('runlocal')`` is the tiny CPU variant."""
  common = _common()
  c = common.fedalign_paper(common.default_config())  # the paper's protocol: its literal reading
  c.method = "fedalign"

  c.data.dataset = "agnews_embedded"
  c.data.num_clients = 10
  c.data.partition = "dirichlet"
  c.data.alpha = 0.1  # the paper's non-IID column; 1.0 = its "IID" column
  c.data.seq_len = 128  # encoder tokens (prompt + </s>)

  c.model.type = "switch"
  # Required: a local google/switch-base-16 directory (sizes, weights and tokenizer come from
  # it). A placeholder: unset is an error naming this field.
  c.model.hf_checkpoint = config_dict.placeholder(str)
  c.model.lora_rank = 0
  c.model.lora_alpha = 16.0
  c.model.dropout_rate = 0.1  # fine-tuning dropout (the checkpoint's value)
  c.model.router_jitter_noise = 0.01  # the checkpoint's value
  # Sizes used only without a checkpoint (the runlocal variant below).
  c.model.d_kv = 0
  c.model.sparse_step = 2
  c.model.expert_capacity = 64

  c.train.rounds = 25
  c.train.clients_per_round = 10
  c.train.local_epochs = 1
  c.train.local_steps = 0
  c.train.batch_size = 32
  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-4
  c.train.weight_decay = 0.01
  c.train.grad_clip = 1.0
  c.train.load_balance_coef = 0.001
  c.train.z_loss_coef = 0.001
  c.train.trainable = "full"
  c.train.chunk_size = 1  # see the docstring: memory of full fine-tuning

  c.fedalign.lambda_reg = 0.1

  c.eval.every = 1
  c.eval.batch_size = 64
  c.checkpoint.every = 5
  c.checkpoint.keep = 2

  if arg == "runlocal":
    common.tiny_federation(c, vocab_size=300, seq_len=32)
    common.tiny_model(  # the switch_tiny sizes
        c,
        num_layers=2,
        num_heads=4,
        d_kv=8,
        num_experts=4,
        sparse_step=2,
        expert_capacity=16,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )
    c.model.dropout_rate = 0.0  # cheap and deterministic: Seq2SeqTask then runs the
    c.model.router_jitter_noise = 0.0  # model with deterministic=True (same function)
    c.eval.batch_size = 50
  return c
