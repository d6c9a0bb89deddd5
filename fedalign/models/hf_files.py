"""The files of a Hugging Face checkpoint directory: config.json and safetensors tensors.

Shared by the decoder families' loader (:mod:`fedalign.models.hf`) and the Switch loader
(:mod:`fedalign.models.hf_switch`).

Example:
  >>> import numpy as np
  >>> store = TensorStore.from_arrays({'w': np.ones((2, 3), np.float32)})
  >>> store.shape('w')
  (2, 3)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some exports carry; not parameters


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or written: names the file, tensor or field."""


class TensorStore:
  """Read-only view of the safetensors file(s) of a checkpoint directory, tracking use.

  Also accepts a plain mapping of arrays (``TensorStore.from_arrays``) for in-memory state
  dicts.
  """

  def __init__(
      self,
      locations: dict[str, str],
      handles: dict[str, Any] | None = None,
      arrays: Mapping[str, np.ndarray] | None = None,
  ):
    self.locations = locations
    self._handles = handles or {}
    self._arrays = arrays
    self.used: set[str] = set()
    self._stack = contextlib.ExitStack()

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, Any], name: str = "<state dict>") -> "TensorStore":
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    return cls({k: name for k in arrays}, arrays=arrays)

  @classmethod
  def open(cls, directory: str | os.PathLike) -> "TensorStore":
    directory = pathlib.Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
      files = [single]
      listed = None
    elif index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{index}: not a safetensors index ({err!r}): expected a JSON "
            "object with a 'weight_map'."
        ) from None
      files = [directory / name for name in sorted(set(weight_map.values()))]
      for file in files:
        if not file.is_file():
          raise CheckpointError(f"{index}: lists shard {file.name!r}, which is missing.")
      listed = weight_map
    else:
      others = sorted(p.name for p in directory.glob("*.bin")) if directory.is_dir() else []
      raise CheckpointError(
          f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME} found"
          + (f" (found {others}: only safetensors checkpoints are read)" if others else "")
          + "."
      )
    store = cls({})
    try:
      for file in files:
        try:
          handle = store._stack.enter_context(safe_open(str(file), framework="np"))
        except Exception as err:  # safetensors raises its own error types
          raise CheckpointError(f"{file}: not a readable safetensors file ({err}).") from None
        store._handles[str(file)] = handle
        for key in handle.keys():
          if key in store.locations:
            raise CheckpointError(
                f"tensor {key!r} is in both {store.locations[key]} and " f"{file}."
            )
          store.locations[key] = str(file)
      if listed is not None:
        for key, name in listed.items():
          where = store.locations.get(key)
          if where is None or pathlib.Path(where).name != name:
            raise CheckpointError(
                f"{index}: lists tensor {key!r} in {name!r}, but that " "shard does not hold it."
            )
    except BaseException:
      store.close()
      raise
    return store

  def close(self) -> None:
    self._stack.close()

  def __contains__(self, key: str) -> bool:
    return key in self.locations

  def keys(self) -> list[str]:
    return list(self.locations)

  def shape(self, key: str) -> tuple[int, ...]:
    if self._arrays is not None:
      return tuple(self._arrays[key].shape)
    return tuple(self._handles[self.locations[key]].get_slice(key).get_shape())

  def get(self, key: str, shape: tuple[int, ...], what: str = "") -> np.ndarray:
    """The tensor ``key``; raises naming the file(s) when missing or of another shape."""
    if key not in self.locations:
      files = sorted(set(self.locations.values()))
      raise CheckpointError(
          f"tensor {key!r} (shape {tuple(shape)}{what}) is missing from "
          f"{', '.join(files) if files else 'the checkpoint'}."
      )
    actual = self.shape(key)
    if actual != tuple(shape):
      raise CheckpointError(
          f"{self.locations[key]}: tensor {key!r} has shape {actual}, "
          f"expected {tuple(shape)}{what}."
      )
    self.used.add(key)
    if self._arrays is not None:
      return self._arrays[key]
    file = self.locations[key]
    handle = self._handles[file]
    dtype = handle.get_slice(key).get_dtype()
    if dtype not in ("F32", "F16", "BF16", "F64"):
      raise CheckpointError(
          f"{file}: tensor {key!r} has dtype {dtype}: expected a float "
          "dtype (F32, F16, BF16 or F64)."
      )
    if dtype == "BF16":  # numpy has no bfloat16: go through JAX (ml_dtypes)
      if ("flax", file) not in self._handles:
        self._handles[("flax", file)] = self._stack.enter_context(safe_open(file, framework="flax"))
      return np.asarray(self._handles[("flax", file)].get_tensor(key))
    return handle.get_tensor(key)

  def unused(self) -> list[str]:
    return sorted(
        k for k in self.locations if k not in self.used and not k.endswith(IGNORED_SUFFIXES)
    )


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """The parsed ``config.json`` of a checkpoint directory."""
  file = pathlib.Path(path) / CONFIG_NAME
  if not file.is_file():
    raise CheckpointError(f"{file} not found: expected a Hugging Face checkpoint directory.")
  try:
    raw = json.loads(file.read_text())
  except ValueError as err:
    raise CheckpointError(f"{file}: not valid JSON ({err}).") from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{file}: expected a JSON object.")
  return raw
