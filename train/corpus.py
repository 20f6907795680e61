"""The embedded default corpus: docstrings and comments of the installed Python standard library.

Read at run time from `sysconfig.get_paths()["stdlib"]`, so a first run needs no download and no
data set. One document per source file: its docstrings (module, class, function) and comments, in
source order. Each is named by its path relative to the stdlib root, which train/data.py hashes
to hold some out, so the split is the same on every machine with the same Python.
"""

import ast
import functools
import inspect
import os
import re
import sysconfig
from pathlib import Path

# Directories never read: installed packages (not the stdlib), and test suites, whose docstrings
# are mostly boilerplate and whose data files include deliberately broken Python.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
MIN_CHARS = 200  # shorter documents (a licence header, one comment) teach little

_BLANK_RUNS = re.compile(r"\n{3,}")


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[Path]:
  """Every *.py file under `root` outside SKIP_DIRS, sorted by relative path (a stable order)."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
    found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# A string literal (any prefix; single or triple quoted) or a comment. Scanning for both at once
# finds exactly the comments `tokenize` finds (checked on every stdlib file of CPython 3.11) in a
# fraction of the time: tokenize is pure Python before 3.12 and was most of a cold read.
_TRIPLE_SINGLE = r"'''(?:[^'\\]|\\.|'(?!''))*'''"
_TRIPLE_DOUBLE = r'"""(?:[^"\\]|\\.|"(?!""))*"""'
_SINGLE = r"'(?:[^'\\\n]|\\.)*'"
_DOUBLE = r'"(?:[^"\\\n]|\\.)*"'
_STRING_OR_COMMENT = re.compile(
    rf"[rRbBuUfF]{{0,2}}(?:{_TRIPLE_SINGLE}|{_TRIPLE_DOUBLE}|{_SINGLE}|{_DOUBLE})|#[^\r\n]*", re.S
)
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Shebangs, coding cookies and lint pragmas are noise, not language.
_NOISE = ("!", "-*-", "noqa", "pragma", "type:", "fmt:", "pylint:")


def comments(source: str) -> list[tuple[int, str]]:
  """(line, text without '#') of every comment of a Python source that parses."""
  found, line, pos = [], 1, 0
  for match in _STRING_OR_COMMENT.finditer(source):
    if match.group().startswith("#"):
      line += source.count("\n", pos, match.start())
      pos = match.start()
      found.append((line, match.group().lstrip("#").strip()))
  return found


def docstrings(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, cleaned docstring) of the module and of every class and function, however nested.

  Walks statements only: expressions hold no docstrings and are most of the nodes.
  """
  found, stack = [], [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, _DOC_NODES) and (doc := ast.get_docstring(node, clean=False)):
      found.append((node.body[0].lineno, inspect.cleandoc(doc)))
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
      stack.extend(child for child in getattr(node, field, ()) if isinstance(child, ast.AST))
  return found


def document(source: str) -> str | None:
  """The docstrings and comments of one Python source, in source order; None if it does not parse."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return None
  pieces = [(line, True, text) for line, text in docstrings(tree)]
  pieces += [(line, False, text) for line, text in comments(source) if text and not text.startswith(_NOISE)]
  pieces.sort(key=lambda p: p[0])
  out, previous_comment_line = [], None
  for line, is_doc, text in pieces:
    # Consecutive comment lines form one paragraph; everything else is separated by a blank line.
    joins = not is_doc and previous_comment_line is not None and line == previous_comment_line + 1
    out.append(("\n" if joins else "\n\n") + text)
    previous_comment_line = None if is_doc else line
  text = "\n".join(line.rstrip() for line in "".join(out).splitlines())
  return _BLANK_RUNS.sub("\n\n", text).strip()


@functools.cache
def stdlib_documents() -> tuple[tuple[str, str], ...]:
  """(path relative to the stdlib root, document) for every file with enough text; cached per process.

  A cold read of CPython 3.11's stdlib takes about 3.5 s on one core (mostly ast.parse).
  """
  root = stdlib_root()
  if not root.is_dir():
    raise FileNotFoundError(f"the standard library directory {root} (sysconfig 'stdlib') does not exist")
  docs = []
  for path in source_files(root):
    try:
      source = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    text = document(source)
    if text and len(text) >= MIN_CHARS:
      docs.append((path.relative_to(root).as_posix(), text))
  if not docs:
    raise ValueError(f"found no documented Python files under the standard library directory {root}")
  return tuple(docs)
