"""Reading the answer a completion states, and comparing answers as text.

The default extractor tries, in order: the last `Answer:` line, GSM8K's last `#### N`, the last
number in the text. A task may give its own regex with one group instead. Answers compare after
`normalize`: whitespace trimmed and collapsed, commas dropped from numbers (1,234 -> 1234), a
trailing `.0` dropped (42.0 -> 42), and a leading '+' dropped.
"""

import re

_ANSWER_LINE = re.compile(r"Answer:[ \t]*([^\n]*)")
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
_NUMBER_WITH_COMMAS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize(text: str) -> str:
  text = " ".join(text.split())
  if _NUMBER_WITH_COMMAS.match(text):
    text = text.replace(",", "")
  if re.fullmatch(r"[-+]?\d+\.0+", text):
    text = text[: text.index(".")]
  if re.fullmatch(r"\+\d+(\.\d+)?", text):
    text = text[1:]
  if text == "-0":
    text = "0"
  return text


def compile_pattern(pattern: str, key: str = "config.task.answer_pattern") -> re.Pattern:
  """A user's answer regex, checked: it must compile and have exactly one group."""
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{key}={pattern!r} is not a valid regular expression: {e}") from e
  if compiled.groups != 1:
    raise ValueError(f"{key}={pattern!r} must have exactly one group (the answer); it has {compiled.groups}")
  return compiled


def extract(text: str, pattern: re.Pattern | None = None) -> str | None:
  """The normalised answer `text` states, or None. With `pattern`: its group in the last match."""
  if pattern is not None:
    found = pattern.findall(text)
    return normalize(found[-1]) if found and found[-1].strip() else None
  for regex in (_ANSWER_LINE, _GSM8K):
    found = [f for f in regex.findall(text) if f.strip()]
    if found:
      return _number_or_text(found[-1])
  numbers = _NUMBER.findall(text)
  return normalize(numbers[-1]) if numbers else None


def _number_or_text(line: str) -> str:
  """An answer line's value: the number it states ('42.', '$1,000' -> '1000'), else the line itself."""
  numbers = _NUMBER.findall(line)
  return normalize(numbers[0] if len(numbers) == 1 else line.strip().rstrip("."))


def gold_answer(text: str) -> tuple[str, str | None]:
  """A record's gold answer -> (normalised answer, worked solution or None). GSM8K style
  ('worked steps ... #### 42') gives ('42', 'worked steps ...\\n#### 42')."""
  if "####" in text:
    body, _, answer = text.rpartition("####")
    return _number_or_text(answer), text
  return normalize(text), None
