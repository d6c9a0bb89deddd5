"""The package's layout rules: no import cycle, no cross-module private import, one format.

Imports are read with :mod:`ast` (every ``import`` in a module, also the ones inside
functions: a lazy import only hides a cycle). Formatting is pyink's, with the settings of
pyproject.toml.
"""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKED_DIRS = ("fedalign", "experiments", "benchmarks")


def modules():
  out = {}
  for path in sorted((REPO / "fedalign").rglob("*.py")):
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    out[".".join(parts)] = path
  return out


def imports_of(path, name, known):
  """The fedalign modules ``name`` imports (resolving 'from package import module')."""
  tree = ast.parse(path.read_text())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in known)
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # relative import
        pkg = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
        base = ".".join(pkg + [node.module])
      for a in node.names:
        if f"{base}.{a.name}" in known:
          found.add(f"{base}.{a.name}")
        elif base in known:
          found.add(base)
  found.discard(name)
  # A package's __init__ importing its own submodules is not a cycle through the package.
  return {m for m in found if not name.startswith(m + ".")}


def test_no_import_cycle():
  mods = modules()
  graph = {name: imports_of(path, name, mods) for name, path in mods.items()}
  state = {}
  stack = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == 1:
        cycle = stack[stack.index(m) :] + [m]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if m not in state:
        visit(m)
    stack.pop()
    state[n] = 2

  for n in sorted(graph):
    if n not in state:
      visit(n)


def private_imports(path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      for a in node.names:
        if a.name.startswith("_") and not a.name.startswith("__"):
          yield f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {a.name}"


def test_no_module_imports_another_modules_private_names():
  found = [
      hit
      for d in CHECKED_DIRS
      for path in sorted((REPO / d).rglob("*.py"))
      for hit in private_imports(path)
  ]
  assert not found, "\n".join(found)


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path):
  """The two checks above can fail: they flag a planted cycle and a planted private import."""
  a, b = tmp_path / "a.py", tmp_path / "b.py"
  a.write_text("from pkg import b\n")
  b.write_text("def f():\n  from pkg.a import _helper\n")
  known = {"pkg.a": a, "pkg.b": b}
  assert imports_of(a, "pkg.a", known) == {"pkg.b"}
  assert imports_of(b, "pkg.b", known) == {"pkg.a"}
  global REPO
  old, REPO = REPO, tmp_path
  try:
    assert len(list(private_imports(b))) == 1
  finally:
    REPO = old


@pytest.mark.skipif(
    shutil.which("pyink") is None and not (pathlib.Path(sys.executable).parent / "pyink").exists(),
    reason="pyink is not installed (pip install -e '.[test]')",
)
def test_code_is_formatted_with_pyink():
  exe = pathlib.Path(sys.executable).parent / "pyink"
  cmd = [str(exe) if exe.exists() else "pyink", "--check", "--quiet", "."]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert res.returncode == 0, (
      "files not formatted (run `pyink .` at the repo root):\n" + res.stderr[-3000:]
  )
