"""Stores a :mod:`fedalign.pretrain` checkpoint inside the package, in bf16, with provenance.

Command (after ``python -m fedalign.pretrain --config=configs/pretrain_small.py
--workdir=/tmp/moe-small``)::

    python -m fedalign.pretrained.ship --src=/tmp/moe-small --name=moe-small \\
        --command="python -m fedalign.pretrain --config=configs/pretrain_small.py ..."

Writes ``fedalign/pretrained/<name>/``: ``config.json``, ``model.safetensors`` (every tensor
cast to bfloat16; the federated run computes in float32), ``tokenizer.json``,
``pretrain_info.json`` (the source's record plus command, git commit, data sources with their
licences, the held-out loss of the bf16 weights' source, wall time) and ``pretrain_loss.png``;
prints the sha256 of each file to pin in :data:`fedalign.pretrained.SHA256`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from typing import Any

# From /work/shared/data/README.md and each folder's SOURCE.md (the text is never shipped).
DATA_SOURCES: dict[str, dict[str, str]] = {
    "dolly": {
        "dataset": "databricks-dolly-15k (instruction, context, response), 15,011 rows",
        "license": "CC BY-SA 3.0",
        "citation": "Conover et al., Free Dolly, Databricks 2023",
    },
    "mmlu": {
        "dataset": "MMLU test + dev splits (question and the four choices), 14,327 rows",
        "license": "MIT",
        "citation": "Hendrycks et al., Measuring Massive Multitask Language Understanding, "
        "ICLR 2021",
    },
    "hellaswag": {
        "dataset": "HellaSwag validation split (context + the correct ending), 10,042 rows",
        "license": "MIT",
        "citation": "Zellers et al., HellaSwag, ACL 2019",
    },
}


def _git_commit() -> str:
  try:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
        cwd=pathlib.Path(__file__).resolve().parent,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def ship(src: str | os.PathLike, name: str, command: str, note: str = "") -> dict[str, str]:
  """Copies checkpoint ``src`` to ``fedalign/pretrained/<name>`` in bf16; returns {file: sha}."""
  import jax.numpy as jnp
  import numpy as np
  from safetensors import safe_open
  from safetensors.flax import save_file

  from fedalign.pretrained import ROOT, sha256

  src = pathlib.Path(src)
  out = ROOT / name
  out.mkdir(parents=True, exist_ok=True)
  with safe_open(str(src / "model.safetensors"), framework="np") as f:
    tensors = {k: jnp.asarray(np.asarray(f.get_tensor(k)), jnp.bfloat16) for k in f.keys()}
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  shutil.copy(src / "config.json", out / "config.json")
  shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
  if (src / "pretrain_loss.png").exists():
    shutil.copy(src / "pretrain_loss.png", out / "pretrain_loss.png")
  info: dict[str, Any] = json.loads((src / "pretrain_info.json").read_text())
  sources = [s.strip() for s in info["fields"]["pretrain"]["sources"].split(",")]
  info["provenance"] = {
      "command": command,
      "git_commit": _git_commit(),
      "data_sources": {s: DATA_SOURCES[s] for s in sources},
      "data_note": "pinned copies in ../shared/data (README.md, SOURCE.md, SHA256SUMS); "
      "AG News (the federated data) is not in the pre-training text",
      "storage": "every tensor bfloat16 (trained in float32)",
      "note": note,
  }
  info["fields"]["pretrain"].pop("data_dir", None)  # a machine-specific path
  (out / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")
  return {
      f.name: sha256(f)
      for f in sorted(out.iterdir())
      if f.name in ("config.json", "model.safetensors", "tokenizer.json")
  }


def main() -> None:
  import argparse

  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--src", required=True)
  ap.add_argument("--name", default="moe-small")
  ap.add_argument("--command", required=True)
  ap.add_argument("--note", default="")
  args = ap.parse_args()
  print(json.dumps(ship(args.src, args.name, args.command, args.note), indent=1))


if __name__ == "__main__":
  main()
