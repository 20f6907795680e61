"""Per-request sampling parameters of the serving engine (infer/engine.py), with OpenAI's ranges.

Each request carries its own: rows of one engine step sample with different temperatures, filters,
penalties and seeds (infer/row_sampling.py applies them per row on device).
"""

import dataclasses

MAX_TOP_LOGPROBS = 20  # OpenAI's limit; the engine always computes this many and returns what was asked


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request's tokens are chosen and when it stops; the default is greedy, 16 tokens."""

  n: int = 1  # independent completions of the prompt
  temperature: float = 0.0  # 0 is greedy
  top_k: int = 0  # keep the k most likely tokens; 0 is off
  top_p: float = 1.0  # keep the smallest set of most likely tokens holding >= top_p of the probability
  min_p: float = 0.0  # keep tokens with probability >= min_p * (the top token's)
  seed: int | None = None  # a completion's draws depend only on its seed (None: the engine's seed and the request)
  max_tokens: int | None = 16  # None: up to the model's length
  stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
  stop_token_ids: tuple[int, ...] = ()  # stop tokens (kept in token_ids, not shown in text), beside eos
  ignore_eos: bool = False
  logprobs: int | None = None  # None: no log-probs; k: the sampled token's and the k most likely (k <= 20)
  presence_penalty: float = 0.0  # subtracted from the logits of tokens already generated
  frequency_penalty: float = 0.0  # ... times the number of times they were generated

  def __post_init__(self):
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))
    object.__setattr__(self, "stop", tuple(self.stop))
    object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
    for name, ok, wanted in _CHECKS:
      value = getattr(self, name)
      if not ok(value):
        raise ValueError(f"SamplingParams.{name}={value!r}: must be {wanted}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


_CHECKS = (
    ("n", lambda x: _is_int(x) and 1 <= x <= 128, "an int in [1, 128]"),
    ("temperature", lambda x: _is_number(x) and 0 <= x <= 2, "a number in [0, 2]"),
    ("top_k", lambda x: _is_int(x) and x >= 0, "an int >= 0 (0 is off)"),
    ("top_p", lambda x: _is_number(x) and 0 < x <= 1, "a number in (0, 1]"),
    ("min_p", lambda x: _is_number(x) and 0 <= x <= 1, "a number in [0, 1]"),
    ("seed", lambda x: x is None or _is_int(x), "an int or None"),
    ("max_tokens", lambda x: x is None or (_is_int(x) and x >= 1), "an int >= 1 or None"),
    ("stop", lambda x: len(x) <= 16 and all(isinstance(s, str) and s for s in x), "up to 16 non-empty strings"),
    ("stop_token_ids", lambda x: all(_is_int(t) and t >= 0 for t in x), "a list of token ids >= 0"),
    ("ignore_eos", lambda x: isinstance(x, bool), "a bool"),
    ("logprobs", lambda x: x is None or (_is_int(x) and 0 <= x <= MAX_TOP_LOGPROBS),
     f"None or an int in [0, {MAX_TOP_LOGPROBS}]"),
    ("presence_penalty", lambda x: _is_number(x) and -2 <= x <= 2, "a number in [-2, 2]"),
    ("frequency_penalty", lambda x: _is_number(x) and -2 <= x <= 2, "a number in [-2, 2]"),
)


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
  bad = [t for t in params.stop_token_ids if t >= vocab_size]
  if bad:
    raise ValueError(f"SamplingParams.stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")

