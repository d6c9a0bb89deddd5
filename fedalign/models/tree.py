"""Small helpers on nested-dict parameter trees, shared by the model and checkpoint code."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def get_path(tree: Mapping[str, Any], path: str | Sequence[str]) -> Any:
  """The subtree of ``tree`` at ``path``: a '/'-joined string ('' = the whole tree) or keys.

  Args:
    tree: nested mappings (e.g. a Flax params dict).
    path: ``'encoder/block_0/mlp'`` or ``('encoder', 'block_0', 'mlp')``.

  Returns:
    The subtree (or leaf) at ``path``.

  >>> get_path({'a': {'b': 1}}, 'a/b'), get_path({'a': {'b': 1}}, ('a',))
  (1, {'b': 1})
  """
  keys = [k for k in path.split("/") if k] if isinstance(path, str) else path
  node = tree
  for key in keys:
    node = node[key]
  return node


def set_path(tree: Mapping[str, Any], path: str, value: Any) -> Any:
  """Copy of ``tree`` with the subtree at the '/'-joined ``path`` replaced (dicts along the
  path are copied, the rest is shared).

  >>> t = {'a': {'b': 1, 'c': 2}}
  >>> set_path(t, 'a/b', 5), t
  ({'a': {'b': 5, 'c': 2}}, {'a': {'b': 1, 'c': 2}})
  """
  keys = [k for k in path.split("/") if k]
  if not keys:
    return value
  out = dict(tree)
  out[keys[0]] = set_path(tree[keys[0]], "/".join(keys[1:]), value)
  return out
