"""Chat templates: `messages` (role/content turns) -> text segments marked trainable or not.

A rendered conversation is a list of (text, trainable) pieces: assistant replies (with their
end-of-turn marker) are trainable, everything else is context. Tokenizing piece by piece keeps the
loss mask exact at the boundaries. The templates follow each family's published format:

  chatml  <|im_start|>{role}\n{content}<|im_end|>\n                       (Qwen and others)
  llama3  <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>  after <|begin_of_text|>
  gemma   <start_of_turn>{user|model}\n{content}<end_of_turn>\n           (system text joins the first user turn)
  plain   {Role}: {content}\n\n                                          (for tokenizers without special tokens)
"""

from collections.abc import Sequence

ROLES = ("system", "user", "assistant")
TEMPLATES = ("chatml", "llama3", "gemma", "plain")


def _check(messages: Sequence[dict]) -> None:
  if not messages:
    raise ValueError("messages is empty")
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
      raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r:.80}")
    if message["role"] not in ROLES:
      raise ValueError(f"messages[{i}].role={message['role']!r} is not one of {ROLES}")
    if not isinstance(message.get("content"), str):
      raise ValueError(f"messages[{i}].content must be a string")


def render(messages: Sequence[dict], template: str, *, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
  """[(text, trainable)] for a conversation; with add_generation_prompt, ends with the assistant header."""
  if template not in TEMPLATES:
    raise ValueError(f"chat template {template!r} is not one of {TEMPLATES}")
  _check(messages)
  pieces: list[tuple[str, bool]] = []
  if template == "llama3":
    pieces.append(("<|begin_of_text|>", False))
  if template == "gemma" and messages[0]["role"] == "system":  # Gemma has no system role
    system, messages = messages[0]["content"], list(messages[1:])
    if messages and messages[0]["role"] == "user":
      messages[0] = {"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}
  for message in messages:
    role, content = message["role"], message["content"]
    header, footer = _markers(template, role)
    if role == "assistant":
      pieces += [(header, False), (content + footer, True)]
    else:
      pieces.append((header + content + footer, False))
  if add_generation_prompt:
    pieces.append((_markers(template, "assistant")[0], False))
  return _merge(pieces)


def _markers(template: str, role: str) -> tuple[str, str]:
  if template == "chatml":
    return f"<|im_start|>{role}\n", "<|im_end|>\n"
  if template == "llama3":
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"
  if template == "gemma":
    return f"<start_of_turn>{'model' if role == 'assistant' else role}\n", "<end_of_turn>\n"
  return f"{role.capitalize()}: ", "\n\n"


def _merge(pieces):
  merged = []
  for text, trainable in pieces:
    if merged and merged[-1][1] == trainable:
      merged[-1] = (merged[-1][0] + text, trainable)
    elif text:
      merged.append((text, trainable))
  return merged


def prompt_completion(prompt: str, completion: str) -> list[tuple[str, bool]]:
  """The plain prompt/completion format: the completion alone is trainable."""
  return _merge([(prompt, False), (completion, True)])
