"""The packages' imports point one way (shared/DESIGN.md) and no two modules import each other.

Read from the source with `ast`, function-level imports included (an import hidden in a function
is still a dependency). Entry points (`__main__.py`) may reach across and are left out.
"""

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the packages of ours it may import (besides itself).
ALLOWED = {
    "pallas_kernels": set(),
    "model": {"pallas_kernels"},
    "configs": {"model"},  # data: presets, nothing else of ours
    "rundir": {"model"},  # what a run's directory holds; shared by train and infer
    "train": {"model", "rundir", "configs"},
    "infer": {"model", "rundir", "configs"},
    "align": {"train", "infer", "model", "rundir", "configs"},
}


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
  out = {}
  for package in ALLOWED:
    for path in sorted((ROOT / package).rglob("*.py")):
      if path.name != "__main__.py":
        out[_module_name(path)] = path
  return out


def _imported(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
  """The modules of ours that one import statement loads (a `from X import name` that names a
  submodule depends on that submodule, otherwise on X itself)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  assert isinstance(node, ast.ImportFrom)
  base = node.module or ""
  if node.level:
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    base = ".".join(anchor + ([base] if base else []))
  return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def _graph() -> dict[str, set[str]]:
  known = _modules()
  graph = collections.defaultdict(set)
  for module, path in known.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for target in _imported(node, module, path.name == "__init__.py", known):
          # `import a.b.c` loads a, a.b and a.b.c: the deepest one of ours is the dependency.
          while target and target not in known:
            target = target.rpartition(".")[0]
          if target and target != module:
            graph[module].add(target)
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_graph_is_read():
  graph = _graph()
  # A function-level import is seen, and a relative or `from package import module` one resolves.
  assert "model" in {t.split(".")[0] for t in graph["train.trainer"]}
  assert "pallas_kernels" in {t.split(".")[0] for t in graph["model.attention_ops"]}


def test_no_import_runs_against_the_layers():
  wrong = sorted(
      f"{source} imports {target}"
      for source, targets in _graph().items()
      for target in targets
      if (s := source.split(".")[0]) != (t := target.split(".")[0]) and t not in ALLOWED[s]
  )
  assert not wrong, "imports against the direction of shared/DESIGN.md:\n" + "\n".join(wrong)


def test_no_import_cycles():
  cycles = _cycles(_graph())
  assert not cycles, "modules that import each other (directly or around a loop):\n" + "\n".join(map(str, cycles))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_package_is_there(package):
  assert (ROOT / package / "__init__.py").is_file()
