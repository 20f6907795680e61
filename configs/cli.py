"""How `python -m train|align|infer` start: a bad config, key or path is one line on stderr, exit status 2.

    error: unknown config key 'optimzer.lr'; did you mean 'optimizer.learning_rate'?

The mistakes a user makes (a misspelled --config.KEY, a value of the wrong type, a config file that
is missing or does not load, a value the start-up checks refuse (configs.validation.ConfigError), a
path that does not exist (FileNotFoundError)) are reported so; `--verbosity=1` (absl's flag) shows
the Python traceback instead. Any other exception is a bug and shows its traceback as usual.
"""

import difflib
import functools
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections.config_flags import config_flags, config_path

from configs import validation

EXIT_STATUS = 2  # a usage error, as argparse says
# Raised by the work once the flags are parsed: the config or the filesystem is wrong, not the code.
USER_ERRORS = (validation.ConfigError, FileNotFoundError)


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)`, with a user's mistake reported in one line (see the module docstring)."""
  app.run(_reporting_user_errors(main), flags_parser=_parse_flags)


def _reporting_user_errors(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      _exit_unless_verbose(str(e))
      raise

  return wrapped


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parse, with each way the --config flags fail made one line."""
  try:
    remaining = flags.FLAGS(argv)
    for flag in _config_flags():
      getattr(flag.value, "lock", None)  # ml_collections defers a config file's load error to its first use
    return remaining
  except flags.Error as e:  # a bad value, a missing flag; get_config raising ValueError or TypeError
    _exit_unless_verbose(str(e))
    raise
  except OSError as e:  # the config file is missing or unreadable
    _exit_unless_verbose(f"cannot load the config file: {str(e).splitlines()[-1].strip()}")
    raise
  except SyntaxError as e:  # the config file's own
    _exit_unless_verbose(f"{e.filename}:{e.lineno}: SyntaxError: {e.msg}")
    raise
  except (AttributeError, KeyError):  # ml_collections, when a --config.KEY override names no key
    message = _unknown_override(argv)
    if message is not None:
      _exit_unless_verbose(message)
    raise


def _exit_unless_verbose(message: str) -> None:
  """Prints `message` as one line and exits with EXIT_STATUS; returns (to re-raise) under --verbosity>=1."""
  if _verbosity(sys.argv) >= 1:
    return
  print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_STATUS)


def _verbosity(argv: Sequence[str]) -> int:
  """--verbosity / -v from argv alone: the flags may have failed to parse before reaching it."""
  scratch = flags.FlagValues()
  flags.DEFINE_integer("verbosity", 0, "absl's logging verbosity", short_name="v", flag_values=scratch)
  try:
    scratch(list(argv), known_only=True)
  except flags.Error:
    return 0
  return scratch.verbosity


def _one_line(message: str) -> str:
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if "Traceback (most recent call last):" in lines:  # get_config raised: keep the flag and the error
    lines = [lines[0].removesuffix("Error whilst parsing config file:").strip(), lines[-1]]
  return " ".join(lines)


def _config_flags() -> list[flags.Flag]:
  return [flags.FLAGS[name] for name in flags.FLAGS if config_flags.is_config_flag(flags.FLAGS[name])]


def _unknown_override(argv: Sequence[str]) -> str | None:
  """The message for the first --config.KEY of argv that names no key of its config; None if none does."""
  argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  for flag in _config_flags():
    path, overrides = _config_arguments(argv, flag.name)
    try:
      config = flag.parser.parse(path)
    except Exception:  # noqa: BLE001 (the config itself does not load: the error being handled is the one to show)
      return None
    for key in overrides:
      try:
        config_path.get_value(key, config)
      except (AttributeError, KeyError, IndexError):
        return unknown_key_message(config, key)
  return None


def _config_arguments(argv: Sequence[str], name: str) -> tuple[str, list[str]]:
  """(the value of --NAME, the KEYs of --NAME.KEY=...) in argv, as ml_collections reads them."""
  path, overrides = "", []
  for i, arg in enumerate(argv):
    if match := re.fullmatch(rf"--?{name}(=.*)?", arg):
      path = match.group(1)[1:] if match.group(1) else argv[i + 1] if i + 1 < len(argv) else ""
    elif match := re.match(rf"--?(?:no)?{name}\.([^=]+)", arg):
      overrides.append(match.group(1))
  return path, overrides


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
  """"unknown config key 'optimzer.lr'; did you mean 'optimizer.learning_rate'?", or the keys there are."""
  guess = _closest_key(config, key)
  if guess:
    return f"unknown config key {key!r}; did you mean {guess!r}?"
  node, prefix = config, "config"
  for part in key.split(".")[:-1]:  # the deepest dict the key reaches
    if not isinstance(node.get(part), ml_collections.ConfigDict):
      break
    node, prefix = node[part], f"{prefix}.{part}"
  return f"unknown config key {key!r}; the keys of {prefix} are {', '.join(sorted(node))}"


def _closest_key(config: ml_collections.ConfigDict, key: str) -> str | None:
  """The known dotted key most like `key`: misspelled at some level ('optimzer.lr' ->
  'optimizer.learning_rate'), or put at the wrong level ('warmup_steps' -> 'optimizer.warmup_steps')."""
  parts = key.split(".")
  by_leaf: dict[str, list[str]] = {}
  for path in _flat_keys(config):
    by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
  leaf = parts[-1] if parts[-1] in by_leaf else _closest(parts[-1], list(by_leaf))
  candidates = [_closest_path(config, parts), *by_leaf.get(leaf, [])]
  return max(filter(None, candidates), key=lambda c: difflib.SequenceMatcher(None, key, c).ratio(), default=None)


def _closest(name: str, candidates: Sequence[str]) -> str | None:
  """The candidate most like `name`; an abbreviation matches by its initials ('lr': 'learning_rate')."""
  close = difflib.get_close_matches(name, candidates, n=1)
  if close:
    return close[0]
  by_initials = [c for c in candidates if "".join(word[:1] for word in c.split("_")) == name]
  return by_initials[0] if len(by_initials) == 1 else None


def _closest_path(config: ml_collections.ConfigDict, parts: Sequence[str]) -> str | None:
  """Each part of a dotted key matched at its own level."""
  node, path = config, []
  for part in parts:
    if not isinstance(node, ml_collections.ConfigDict):
      return None
    name = part if part in node else _closest(part, list(node))
    if name is None:
      return None
    node = node[name]
    path.append(name)
  return ".".join(path)


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      keys += _flat_keys(value, f"{prefix}{key}.")
  return keys
