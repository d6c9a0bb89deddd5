"""Results as JSON and markdown tables: the one renderer of runs, grids and benchmarks.

Scripts write their measurements as JSON (:func:`write_json`) and build the tables of their
markdown reports from those files with :func:`markdown_table`; prose lives in ``docs/``.

Example:
  >>> print(markdown_table(["method", "acc"], [["fedavg", 0.51234], ["fedalign", float("nan")]]))
  | method | acc |
  | --- | --- |
  | fedavg | 0.512 |
  | fedalign | - |
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence


def fmt(x: Any, digits: int = 3) -> str:
  """A table cell: floats to ``digits`` significant figures (``-`` for NaN), else ``str``.

  >>> fmt(1234.5), fmt(2.3456), fmt(0.012345), fmt("a|b")
  ('1234', '2.35', '0.0123', 'a\\\\|b')
  """
  if isinstance(x, float):
    if x != x:
      return "-"
    if abs(x) >= 100:
      return f"{x:.0f}"
    if abs(x) >= 1:
      return f"{x:.{max(digits - 1, 1)}f}"
    return f"{x:.{digits}g}"
  return md_escape(str(x))


def md_escape(s: str) -> str:
  """Text safe inside a markdown table cell (no column breaks, one line)."""
  return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
  """A markdown table; every cell goes through :func:`fmt`."""
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
  for r in rows:
    lines.append("| " + " | ".join(fmt(v, digits) for v in r) + " |")
  return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: Any) -> pathlib.Path:
  """Writes ``payload`` as indented JSON (atomically: a reader never sees half a file)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
  os.replace(tmp, path)
  return path


def read_json(path: str | os.PathLike) -> Any:
  """The JSON document at ``path``."""
  return json.loads(pathlib.Path(path).read_text())
