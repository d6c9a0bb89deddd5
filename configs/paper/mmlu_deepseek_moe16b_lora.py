"""Paper setup: federated LoRA fine-tuning of DeepSeek-MoE-16B on MMLU (FedAlign-MoE, section 6).

Command (a local copy of deepseek-ai/deepseek-moe-16b-base is required; nothing is downloaded
at run time)::

    python -m fedalign.main --config=configs/paper/mmlu_deepseek_moe16b_lora.py \\
        --config.model.hf_checkpoint=/path/to/deepseek-moe-16b-base --workdir=/tmp/mmlu_ds16_a0.1

The checkpoint directory holds ``config.json`` (``model_type`` ``deepseek``, the v1 format),
the safetensors weights (``model.safetensors`` or shards + ``model.safetensors.index.json``) and
``tokenizer.json`` + ``tokenizer_config.json``; weights load with
:func:`fedalign.models.hf.load_pretrained` in bfloat16 (``model.dtype``; routers float32) with
fresh LoRA adapters (B = 0: round 0 starts from the checkpoint's function). Leaving
``model.hf_checkpoint`` unset is an error that names it. ``data.data_dir`` defaults to
``<repo>/../shared/data/mmlu``; another copy: ``--config.data.data_dir=DIR``.

Setup [paper]: DeepSeek-MoE-16B (28 layers, the first dense; 64 fine-grained routed experts,
top-6, + 2 shared experts per MoE layer; 16.4B parameters, ~2.8B active per token) with LoRA,
10 clients, Dirichlet partition alpha = 0.1, all 10 clients every round, 25 rounds, 1 local
epoch, AdamW, learning rate 1e-4, lambda = 0.1. Paper accuracy (FedAvg / FedAlign-MoE): 0.301
/ 0.398 at alpha = 0.1, 0.464 / 0.513 at alpha = 1.0 (add ``--config.data.alpha=1.0`` and a new
``--workdir``). Other methods: ``--config.method=fedavg|fedprox|fedmoe|...``.
[ours] (the paper does not give these): only MMLU's test (14,042 rows) and dev (285) splits
exist offline, so the test split is cut by a fixed, seed-independent rule: the last 20% of each
subject's rows (file order) are held out (2,792 rows), the rest + dev are the federated
training pool (11,535 rows) - see :mod:`fedalign.data.multiple_choice`. The Dirichlet
"label" is the subject (57 groups), not the answer letter; per-client accuracy weights the
per-subject test accuracy by each client's subject mix. Zero-shot prompt (the MMLU header,
question, ``A.``-``D.`` options, ``Answer:``), trained with the LM loss on the answer letter
only, evaluated by scoring ``" A"``..``" D"`` (``acc``). LoRA rank 8, alpha 16 on q/k/v/o and
on every routed expert's three projections (shared experts and the dense layer frozen), routers
trained; 512 tokens (left-truncated; ~2% of prompts are longer at ~4 characters per token),
batch 2, no weight decay,
gradient clipping 1.0, load-balancing loss 0.001 (the checkpoint's ``aux_loss_alpha``),
dropless block-sparse experts (``model.moe_impl='sparse'``, blocks of 64 rows: each token's
top-6 routed experts only and no token dropped, the checkpoint's own function;
``--config.model.capacity_factor=1.25`` gives capacity dispatch instead, see Time below),
evaluation every 5 rounds and after the last (``--config.eval.every=1`` for a per-round
curve, +1-2 h).

Accuracy of this code: not measured here (no accelerator); the paper's numbers are above.

Accelerator memory and time (estimates, NOT measured on an accelerator: no DeepSeek-MoE-16B
run has been made with this code yet; the activation and FLOP figures are XLA's own accounting
of one compiled training step, ``jax.jit(jax.grad(loss)).lower(...).compile()``
``.memory_analysis()`` / ``.cost_analysis()`` on CPU for 2- and 3-layer models with the real
widths, the per-MoE-layer increment times 27):

* Weights: 16.4B parameters x 2 bytes (bfloat16) = 32.8 GB, shared by every client (frozen).
  LoRA adapters: 147.0M parameters (3.7M on attention + 143.3M on the 27 x 64 routed experts:
  the per-expert adapters dominate), 0.29 GB in bfloat16, plus 3.5M float32 router parameters;
  one client's training state (adapters, gradients, 2 AdamW moments) ~1.2 GB; the round keeps
  all 10 clients' deltas (~3 GB). Adapters and their AdamW moments are bfloat16 like the base
  (``load_pretrained``'s dtype applies to every parameter).
* Activations at batch 2 x 512 tokens (1,024 tokens x top-6 = 6,144 routed rows per step,
  held in 159 blocks of 64 rows: 10,176 rows of expert work): 0.72 GB per MoE layer with
  float32 activations (the CPU backend upcasts bfloat16 matmuls, so this is an upper figure;
  bfloat16 activations take less): ~19 GB for the 27 MoE layers + ~1.2 GB for the rest
  (float32 logits 1,024 x 102,400), plus ~4.5 GB (float32) of per-block expert weights,
  transient in the layer being computed (every block gathers its expert's weights; the
  backward pass gathers them again instead of keeping them). Linear in the tokens per step
  (``python benchmarks/paper_memory.py --batch 2 --seq 512``; with capacity dispatch,
  ``--capacity_factor 1.25``: 0.67 GB per MoE layer, no transient weights; batch 4 measured
  1.33 GB per MoE layer with capacity dispatch).
* Peak ~55-65 GB with ``train.chunk_size=1`` (clients trained one after another inside the
  jitted round): one 80 GB H100 (or A100-80GB). ``--config.train.batch_size=4`` needs
  ~80 GB: an H200 (141 GB). Checkpoints hold the full parameters (~33 GB on disk each;
  ``checkpoint.keep=1``).
* Mesh: none (``train.use_mesh=False``, one device). Several GPUs / TPU chips:
  ``--config.train.use_mesh=True --config.train.mesh_shape=clients:1,experts:K`` shards the
  routed experts' weights, adapters and optimizer moments over K devices (a 2-D
  ``('clients', 'experts')`` mesh, docs/scaling.md), each device computing the rows routed to
  its own experts (expert parallelism); everything else is replicated. Per device, XLA's
  memory analysis of one client's step compiled on fake CPU devices (bfloat16 parameters,
  float32 temporaries as above; ``benchmarks/paper_memory.py --batch 2 --seq 512
  --block_size 64 --dtype bfloat16 --experts K``): 1 device 33.1 GB weights + 26.9 GB temp =
  60.0 GB; 8 x H100 (``experts:8``) 6.6 + 20.3 = 26.9 GB; v4-32 / v5e-16 (16 chips,
  ``experts:16``) 4.8 + 20.0 = 24.8 GB: within a v4 chip's 32 GiB, over a v5e chip's 16 GiB
  in this float32 accounting (bfloat16 activations or a smaller batch needed there;
  docs/scaling.md). Alternatively ``use_mesh=True`` without ``mesh_shape`` and
  ``--config.train.chunk_size=N`` shards each chunk of N clients over a ``('clients',)`` mesh
  of N GPUs, each holding the full weights. Mesh paths tested on fake CPU devices only.
* Time, FLOP basis ~2.8B active parameters per token: forward ~7.4 GFLOP per token (2 x 2.8B,
  +1.8 for the 1.66x block padding of the 1.4B routed parameters: 10,176 rows of work for
  6,144 routed rows); training ~2x forward (the frozen base needs activation gradients but no
  weight gradients): XLA counts 14.7 GFLOP per token (12.4 with capacity dispatch at 1.25).
  A round is one epoch over 11,535 x 512 tokens (padding included) = 5.9M tokens,
  ~8.7e16 FLOP: 220-590 s on one H100 at 15-40% of its 989 TFLOP/s bfloat16 peak. Memory
  traffic may dominate instead: every block gathers its expert's weights (159 blocks x 3 x
  2048 x 1408 per MoE layer, forward and again backward), and XLA counts ~970 GB accessed per
  step (float32 accounting; about half in bfloat16) against ~340 GB with capacity dispatch:
  at ~3.3 TB/s ~0.15 s per step, ~14 min per round (5,768 steps), ~3x capacity dispatch's
  ~5 min. Capacity dispatch at 1.25 drops few real tokens here (~70% of the 512 positions
  are padding, which takes no capacity), so if these estimates hold on the accelerator,
  ``--config.model.capacity_factor=1.25`` is the faster choice. An evaluation (2,792 x 4
  options x 512 tokens, 4 sequences per forward, ~7 GFLOP per token) is ~4e16 FLOP,
  100-270 s. 25 rounds + 5 evaluations: ~2-6 h (the upper end if the weight gathers
  dominate), plus the compilation of the unrolled 28-layer round (expect 5-15 min) and
  checkpoint writes; within a factor ~3.

Tiny variant that runs on CPU in seconds (a random 2-layer DeepSeek-MoE with 8 routed experts
+ a shared expert, LoRA rank 4, a byte-level BPE trained on the clients' text, 400 training and
100 test questions, 4 clients, 2 rounds; what tests/test_paper_configs.py runs)::

    python -m fedalign.main --config=configs/paper/mmlu_deepseek_moe16b_lora.py:runlocal \\
        --workdir=/tmp/mmlu_ds_tiny
"""

import pathlib

import ml_collections

from fedalign.config_files import load_module


def _builder():
  return load_module(pathlib.Path(__file__).resolve().parent / "_deepseek_moe16b_lora.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's DeepSeek-MoE-16B MMLU setup; ``get_config('runlocal')`` is the tiny variant.

  >>> c = get_config('runlocal')  # doctest: +SKIP
  >>> c.data.dataset, c.model.family, c.train.trainable  # doctest: +SKIP
  ('mmlu', 'deepseek_moe', 'lora')
  """
  return _builder().build(
      "mmlu",
      arg,
      seq_len=512,
      batch_size=2,
      eval_batch_size=16,
      mc_metric="acc",
      runlocal_seq_len=96,
  )
