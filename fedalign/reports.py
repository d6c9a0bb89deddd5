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


def docs_key(tool: str, workdir: str | os.PathLike) -> str:
  """The name of a grid's generated block in a docs page: the tool and the workdir's last part,
  so several grids (e.g. one per base recipe) can share one page, each replacing only its block.

  Example:
    >>> docs_key("experiments/robustness.py", "/tmp/x/robustness_alpha01")
    'experiments/robustness.py --workdir=.../robustness_alpha01'
  """
  return f"{tool} --workdir=.../{pathlib.Path(workdir).name}"


def write_generated_block(path: str | os.PathLike, key: str, body: str) -> pathlib.Path:
  """Puts ``body`` between the begin/end markers named ``key`` in the markdown file ``path``.

  The text outside the block (the hand-written reading, other generated blocks) is kept; a
  block seen for the first time goes at the end of the file (which is created if absent).

  Example:
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "doc.md"
    >>> _ = p.write_text("reading\\n")
    >>> _ = write_generated_block(p, "grid a", "| x |\\n")
    >>> _ = write_generated_block(p, "grid a", "| y |\\n")
    >>> print(p.read_text())
    reading
    <BLANKLINE>
    <!-- begin: generated from grid a, do not edit by hand -->
    <BLANKLINE>
    | y |
    <BLANKLINE>
    <!-- end: generated from grid a -->
    <BLANKLINE>
  """
  path = pathlib.Path(path)
  begin = f"<!-- begin: generated from {key}, do not edit by hand -->"
  end = f"<!-- end: generated from {key} -->"
  block = f"{begin}\n\n{body.rstrip()}\n\n{end}\n"
  text = path.read_text() if path.exists() else ""
  if begin in text and end in text.split(begin, 1)[1]:
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1].lstrip("\n")
    text = before + block + ("\n" + after if after else "")
  else:
    text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path
