"""Pre-trained checkpoints shipped inside the package (no network, no data directory).

``moe-small``: a fine-grained DeepSeek-MoE-shaped causal LM (16 routed experts, top-2, one
shared expert) pre-trained centrally on Dolly-15k + MMLU + HellaSwag text by
``python -m fedalign.pretrain --config=configs/pretrain_small.py`` and stored in bf16 by
:mod:`fedalign.pretrained.ship`; its ``pretrain_info.json`` holds the provenance (command,
commit, data sources and licences, held-out loss, wall time). docs/pretraining.md reports its
expert specialisation against the same architecture at random init.

Every file is pinned by its sha256 (:data:`SHA256`): :func:`path` verifies them, so a
corrupted or hand-edited checkpoint fails loudly instead of training from wrong weights.

>>> p = path('moe-small')
>>> sorted(f.name for f in p.iterdir() if f.suffix == '.json')[:2]
['config.json', 'pretrain_info.json']
>>> load('moe-small').config.num_experts
16
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent

# name -> {file: sha256}; written by ``python -m fedalign.pretrained.ship``.
SHA256: dict[str, dict[str, str]] = {
    "moe-small": {
        "config.json": "3941ba66253b90590b522536eb5f1a0cfb376d201df48cb68af7521da5e54a9b",
        "model.safetensors": "6e8e02ed3acc011a5a7bbe83538da11c0bf00de0de7ac200b32fd3040bcdad8a",
        "tokenizer.json": "2a10e21015eb84fc288dbb4a49b51e72ede0acef4cc4153a8ae64cf3bec34fec",
    },
}
NAMES = tuple(SHA256)


def sha256(file: str | pathlib.Path) -> str:
  """Hex sha256 of a file."""
  h = hashlib.sha256()
  with open(file, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def path(name: str = "moe-small", verify: bool = True) -> pathlib.Path:
  """The directory of shipped checkpoint ``name`` (config.json, model.safetensors,
  tokenizer.json, pretrain_info.json), its files checked against :data:`SHA256`.

  Raises:
    ValueError: unknown name (the message lists the shipped ones).
    FileNotFoundError: a file is missing (an install without the package data).
    RuntimeError: a file's sha256 differs from the pinned one.
  """
  if name not in SHA256:
    raise ValueError(f"unknown pre-trained checkpoint {name!r}: expected one of {NAMES}")
  directory = ROOT / name
  if verify:
    for file, expected in SHA256[name].items():
      f = directory / file
      if not f.is_file():
        raise FileNotFoundError(
            f"{f} is missing: the package was installed without its data files "
            "(setup.py package_data ships fedalign/pretrained/*/*)"
        )
      got = sha256(f)
      if got != expected:
        raise RuntimeError(
            f"{f} has sha256 {got}, expected the pinned {expected} "
            "(fedalign.pretrained.SHA256): a corrupted or modified checkpoint"
        )
  return directory


def verify_if_shipped(checkpoint: str | pathlib.Path) -> None:
  """Checks the pinned hashes when ``checkpoint`` is a shipped one (a no-op otherwise)."""
  directory = pathlib.Path(checkpoint).resolve()
  if directory.parent == ROOT and directory.name in SHA256:
    path(directory.name)


def load(name: str = "moe-small", dtype: str = "float32", **overrides: Any) -> Any:
  """The shipped checkpoint as a :class:`fedalign.models.api.MoEModel` (hash-checked)."""
  from fedalign.models.hf import load_pretrained

  return load_pretrained(path(name), dtype, **overrides)


def tokenizer(name: str = "moe-small") -> Any:
  """The shipped checkpoint's tokenizer (:class:`fedalign.data.tokenize.HFTokenizer`)."""
  from fedalign.data.tokenize import HFTokenizer

  return HFTokenizer.from_file(path(name))
