"""A completion's text as its tokens arrive: stop strings found, and nothing shown too early.

The text is what the output tokens so far add to the prompt's (a stop token is not shown; ids past
the tokenizer's vocabulary, a padded embedding's, are left out): decoded after the prompt's last
tokens, since sentencepiece drops the leading space of a piece decoded first. While the
completion runs, `text()` holds back what may still change: a trailing replacement character (a
UTF-8 sequence split across byte tokens) and a tail that could be the beginning of a stop string,
so a stream never shows characters that the final text does not have.
"""

import os
from collections.abc import Sequence

_REPLACEMENT = "\ufffd"
_CONTEXT = 4  # prompt tokens decoded before the output


def decode(tokenizer, ids: Sequence[int]) -> str:
  """The text of `ids`, leaving out ids past the tokenizer's vocabulary (a model's embedding
  table is often padded beyond it, and sentencepiece refuses such ids)."""
  return tokenizer.decode([i for i in ids if 0 <= i < tokenizer.vocab_size])


def continuation(tokenizer, prompt_ids: Sequence[int], tokens: Sequence[int]) -> str:
  """The text `tokens` add after the prompt's.

  Decoded together with the prompt: sentencepiece drops the leading space of a first piece
  decoded on its own ('▁the' alone is 'the'), which would glue the first word to the prompt.
  """
  head = decode(tokenizer, prompt_ids)
  full = decode(tokenizer, [*prompt_ids, *tokens])
  return full[len(os.path.commonprefix([head, full])):]


class Detokenizer:
  def __init__(self, tokenizer, stop: tuple[str, ...], stop_ids=frozenset(), prompt_ids=()):
    self._tokenizer, self._stop, self._stop_ids = tokenizer, tuple(stop), stop_ids
    self._ids: list[int] = []
    self._text = ""
    self._context = list(prompt_ids)[-_CONTEXT:]

  def add(self, token: int) -> bool:
    """Appends a token; True when the text now holds a stop string (the text ends before it)."""
    if token in self._stop_ids:
      return False
    self._ids.append(int(token))
    before = len(self._text)
    self._text = continuation(self._tokenizer, self._context, self._ids)
    if not self._stop:
      return False
    search_from = max(0, before - max(len(s) for s in self._stop))
    found = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
    if found:
      self._text = self._text[: min(found)]
      self._stop = ()  # finished: nothing more is held back
      return True
    return False

  def text(self, final: bool = False) -> str:
    text = self._text
    if final:
      return text
    text = text.rstrip(_REPLACEMENT)
    for stop in self._stop:  # the longest tail that begins a stop string
      for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
          text = text[: len(text) - size]
          break
    return text
