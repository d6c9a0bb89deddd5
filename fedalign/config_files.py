"""Loading ``get_config()`` files by path (``configs/`` is a folder of files, not a package).

One loader for the CLIs, the experiment scripts, the benchmarks and the config files that
build on each other (``configs/cpu_analog.py`` starts from ``configs/default.py``...).

>>> load_config('configs/default.py:runlocal').train.rounds
3
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import pathlib
import re
import sys
import types
from typing import Any, Mapping

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_module(path: str | os.PathLike) -> types.ModuleType:
  """Executes a Python file as a fresh module (named after its stem)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_fedalign_cfg_{path.stem}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_config(
    spec: str | os.PathLike, arg: str | None = None, relative_to: str | os.PathLike | None = None
) -> ml_collections.ConfigDict:
  """``'path/to/config.py[:arg]'`` -> its ``get_config(arg)``.

  A relative path is looked up under ``relative_to`` (e.g. the calling config's folder) when
  given, else the working directory, then the repository root. ``arg`` overrides the part
  after ``:``.
  """
  path, _, spec_arg = str(spec).partition(":")
  arg = arg if arg is not None else (spec_arg or None)
  p = pathlib.Path(path)
  if not p.is_absolute():
    bases = [pathlib.Path(relative_to)] if relative_to is not None else []
    bases += [pathlib.Path.cwd(), REPO]
    p = next((b / p for b in bases if (b / p).exists()), bases[0] / p)
  mod = load_module(p)
  return mod.get_config(arg) if arg else mod.get_config()


def flatten_config(
    d: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = ""
) -> dict[str, Any]:
  """Nested dicts (or a ConfigDict, through its JSON) -> ``{'a.b': leaf}``, dotted like flags.

  Args:
    d: a nested mapping, e.g. ``json.loads(config.to_json())``, or a ConfigDict.
    prefix: prepended to every key (used by the recursion).

  Returns:
    One entry per non-dict value, keyed by the dotted path; an empty dict has no entry.

  >>> flatten_config({'a': {'b': 1, 'c': {'d': 'x'}}, 'e': [2]})
  {'a.b': 1, 'a.c.d': 'x', 'e': [2]}
  """
  if isinstance(d, ml_collections.ConfigDict):
    d = json.loads(d.to_json())
  out: dict[str, Any] = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def unknown_field_message(
    config: ml_collections.ConfigDict, path: str, flag_name: str = "config"
) -> str | None:
  """Why ``--config.PATH=...`` names no field of ``config`` (None if it names one).

  The message names the missing part, the fields at that level, and the closest full paths
  (the dotted paths that end in the same name first: ``rounds`` -> ``train.rounds``).

  >>> c = ml_collections.ConfigDict({'seed': 0, 'train': {'rounds': 3, 'local_steps': 1}})
  >>> print(unknown_field_message(c, 'rounds'))
  --config.rounds: the config has no field 'rounds' at the top level (its fields: seed, train). Did you mean --config.train.rounds?
  >>> unknown_field_message(c, 'train.rounds') is None
  True
  """
  node, parts = config, path.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      return None  # an index into a tuple/list field: ml_collections' own parser decides
    if part in node:
      node = node[part]
      continue
    where = "at the top level" if i == 0 else f"in {'.'.join(parts[:i])}"
    fields = ", ".join(sorted(node.keys()))
    every = flatten_config(config)
    every.update({p: None for k in every for p in _parents(k)})
    same_name = [p for p in sorted(every) if p.split(".")[-1] == parts[-1] and p != path]
    close = same_name + [
        p
        for p in difflib.get_close_matches(path, list(every), n=3, cutoff=0.75)
        if p not in same_name
    ]
    flag = f"--{flag_name}."
    hint = " Did you mean " + " or ".join(flag + p for p in close[:3]) + "?" if close else ""
    return f"{flag}{path}: the config has no field {part!r} {where} (its fields: {fields}).{hint}"
  return None


def _parents(path: str) -> list[str]:
  """'a.b.c' -> ['a', 'a.b'] (the ConfigDict fields that hold it)."""
  parts = path.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def define_config_flag(
    name: str = "config",
    help_string: str = "Path to a get_config() file.",
    lock_config: bool = True,
) -> Any:
  """``config_flags.DEFINE_config_file(name, None, help_string, lock_config=...)`` for our CLIs,
  with a clear error for an override of a field that does not exist.

  ml_collections raises a bare AttributeError from inside absl's flag parsing for
  ``--config.no_such_field=1`` (a traceback, however far the typo is from a real field).
  Here the flag's parse turns it into absl's IllegalFlagValueError with
  :func:`unknown_field_message`, which absl reports as one ``FATAL Flags parsing error`` line
  (exit status 1). Returns the flag holder.
  """
  from absl import flags
  from ml_collections import config_flags

  # absl files a flag under the module that defines it: this one is the CLI's (--helpshort)
  flags.disclaim_key_flags()
  holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=lock_config)
  flag = flags.FLAGS[name]
  parse = flag._parse  # the bound parse of ml_collections' _ConfigFlag  # pylint: disable=protected-access

  def checked_parse(argument):
    try:
      return parse(argument)
    except (AttributeError, KeyError) as e:
      prefix = f"--{name}."
      paths = [a[len(prefix) :].split("=")[0] for a in sys.argv[1:] if a.startswith(prefix)]
      try:
        config = load_config(argument)
      except Exception:  # noqa: BLE001 - the original error is the better one then
        raise e from None
      for path in paths:
        message = unknown_field_message(config, path, name)
        if message is not None:
          raise flags.IllegalFlagValueError(f"flag --{name}={argument}: {message}") from None
      raise

  flag._parse = checked_parse  # pylint: disable=protected-access
  return holder


# Fields added after runs had been saved, as {switch: (value before it existed, the fields that
# only matter when the switch is on)}. A saved config without these fields is the same run as
# one with the switch at that value, whatever its dependent fields say: old workdirs resume and
# finished grid entries are not run again.
LATER_FIELDS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "train.lanes": (0, ("train.lanes_min_useful",)),
    "server.robust": (
        "none",
        (
            "server.robust_norm_bound",
            "server.trim_fraction",
            "server.krum_byzantine",
            "server.krum_select",
        ),
    ),
    "server.robust_stats": (False, ("server.robust_stats_quantile",)),
    "attack.kind": ("none", ("attack.fraction", "attack.scale")),
    "dp.clip_norm": (0.0, ("dp.noise_multiplier", "dp.delta", "dp.stats_clip_norm")),
    "faults.drop_prob": (0.0, ()),
    "server.lr_schedule": ("constant", ("server.lr_final_fraction",)),
    "train.mesh_shape": ("", ()),
    "data.task": ("classification", ()),
    "fedalign.selection_min_cv": (0.0, ()),
}


# A checkpoint shipped inside the package, wherever the package is installed (it is verified
# by its pinned hashes when loaded): run files from another checkout name the same one.
_SHIPPED_CHECKPOINT = re.compile(r"(?:^|/)fedalign/pretrained/([A-Za-z0-9._-]+)/?$")


def _located(flat: dict[str, Any]) -> dict[str, Any]:
  value = flat.get("model.hf_checkpoint")
  match = _SHIPPED_CHECKPOINT.search(value) if isinstance(value, str) else None
  if match:
    flat = {**flat, "model.hf_checkpoint": f"fedalign/pretrained/{match.group(1)}"}
  return flat


def config_differences(
    old: Mapping[str, Any] | ml_collections.ConfigDict,
    new: Mapping[str, Any] | ml_collections.ConfigDict,
    ignore: tuple[str, ...] = (),
) -> list[str]:
  """The dotted fields whose values differ between two configs (nested or flat), sorted.

  A field of :data:`LATER_FIELDS` missing from ``old`` (saved before it existed) counts as
  its value from then, and its dependent fields as unchanged while it is at that value. A
  checkpoint shipped in the package (``.../fedalign/pretrained/<name>``) compares by its name,
  wherever the package is installed.

  >>> config_differences({'seed': 0}, {'seed': 0, 'faults': {'drop_prob': 0.0}})
  []
  >>> config_differences({'seed': 0}, {'seed': 1, 'faults': {'drop_prob': 0.5}})
  ['faults.drop_prob', 'seed']
  """
  old, new = _located(flatten_config(old)), _located(flatten_config(new))
  skip = set(ignore)
  for switch, (before, dependents) in LATER_FIELDS.items():
    if switch not in old and new.get(switch, before) == before:
      skip.add(switch)
      skip.update(d for d in dependents if d not in old)
  return sorted(k for k in set(old) | set(new) if k not in skip and old.get(k) != new.get(k))
