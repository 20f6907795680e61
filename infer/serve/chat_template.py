"""A Hugging Face directory's chat template (jinja, in tokenizer_config.json), rendered as transformers does.

  template = hf_chat_template(directory)   # None when the directory has none
  render = jinja_renderer(template)        # messages -> the prompt text, ending with the assistant's
  prompt = render([{"role": "user", "content": "Hi"}])   # header (add_generation_prompt=True)

transformers renders in a sandbox with trim_blocks and lstrip_blocks, a `raise_exception` function
and the tokenizer's special tokens (bos_token, eos_token, ...) as variables; so does this. The engine
adds the bos token to every text prompt, so a bos_token the template writes at the start is left out
of the text (it would otherwise be encoded a second time, as characters).
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jinja2
from jinja2 import sandbox

TOKENIZER_CONFIG = "tokenizer_config.json"
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass(frozen=True)
class HFChatTemplate:
  source: str  # the jinja text
  special_tokens: dict[str, str]  # bos_token, eos_token, ... as tokenizer_config.json gives them


def hf_chat_template(directory: str | Path) -> HFChatTemplate | None:
  """The `chat_template` of `directory/tokenizer_config.json` (its 'default' one when it lists
  several), or None when there is no such file or no template in it."""
  path = Path(directory) / TOKENIZER_CONFIG
  if not path.is_file():
    return None
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  template = config.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if not template:
    return None
  if not isinstance(template, str):
    raise ValueError(f"{path}: chat_template must be a string or a list of {{name, template}}")
  special = {}
  for name in _SPECIAL_TOKENS:
    value = config.get(name)
    if isinstance(value, dict):  # an AddedToken, serialized
      value = value.get("content")
    if isinstance(value, str):
      special[name] = value
  return HFChatTemplate(template, special)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def jinja_renderer(template: HFChatTemplate) -> Callable[[list[dict]], str]:
  """messages -> prompt text; a message the template refuses (or fails on) is a ValueError."""
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
  env.globals["raise_exception"] = _raise_exception
  try:
    compiled = env.from_string(template.source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ValueError(f"the chat_template does not parse: {e}") from None
  bos = template.special_tokens.get("bos_token", "")

  def render(messages: list[dict]) -> str:
    try:
      text = compiled.render(messages=messages, add_generation_prompt=True, **template.special_tokens)
    except (jinja2.exceptions.TemplateError, TypeError) as e:  # raise_exception, or a template tripping over a value
      raise ValueError(f"the chat template refused the messages: {e}") from None
    return text[len(bos):] if bos and text.startswith(bos) else text

  return render
