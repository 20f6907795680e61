"""OpenAI's wire format: request bodies checked and turned into SamplingParams, and the response objects.

A field OpenAI's API does not have (or this server does not know) is a 400 naming it, as is a value
out of its range; absent fields take OpenAI's defaults (temperature 1, top_p 1, n 1; max_tokens 16
for completions, up to the model's length for chat). vLLM's extras are accepted: top_k (0 or -1 is
off), min_p, stop_token_ids, ignore_eos. A completions `prompt` is a string or a list of token ids
(or a list holding one of either); a batch of several prompts is refused: send one request each.

Responses follow OpenAI's objects: `text_completion` (logprobs as {tokens, token_logprobs,
top_logprobs, text_offset}, offsets into the completion's text), `chat.completion` and
`chat.completion.chunk` (logprobs as {content: [{token, logprob, bytes, top_logprobs}]}).
"""

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from infer.engine import RequestOutput, TokenLogprob
from infer.sampling_params import SamplingParams

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the completions endpoint (chat's is 20)
MAX_CHAT_TOP_LOGPROBS = 20


class APIError(Exception):
  """An error OpenAI's way: the HTTP status and {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error"):  # noqa: A002 (OpenAI's field name)
    super().__init__(message)
    self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
  model: str
  prompt: str | list[int]
  params: SamplingParams
  stream: bool
  include_usage: bool  # stream_options.include_usage: a last chunk with the usage


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  model: str
  messages: list[dict]  # [{"role": str, "content": str}]
  params: SamplingParams
  stream: bool
  include_usage: bool


# OpenAI's name -> SamplingParams' field, for the fields that map one to one.
_SAMPLING = {
    "temperature": "temperature", "top_p": "top_p", "n": "n", "seed": "seed", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p", "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos", "stop": "stop",
}
_COMMON = {"model", "max_tokens", "stream", "stream_options", "user", "logit_bias", *_SAMPLING}
COMPLETION_FIELDS = frozenset({*_COMMON, "prompt", "logprobs", "echo"})
CHAT_FIELDS = frozenset({*_COMMON, "messages", "max_completion_tokens", "logprobs", "top_logprobs"})


def parse_completion(body: Any) -> CompletionRequest:
  body = _object(body, COMPLETION_FIELDS)
  if "prompt" not in body:
    raise APIError("prompt is required", param="prompt")
  if body.get("echo") not in (None, False):
    raise APIError("echo=true is not supported", param="echo")
  logprobs = body.get("logprobs")
  if logprobs is not None and not (_is_int(logprobs) and 0 <= logprobs <= MAX_COMPLETION_LOGPROBS):
    raise APIError(f"logprobs={logprobs!r} must be an int in [0, {MAX_COMPLETION_LOGPROBS}] (how many of the most "
                   "likely tokens to return at each position)", param="logprobs")
  params = _sampling(body, max_tokens=body.get("max_tokens", 16), max_tokens_name="max_tokens", logprobs=logprobs)
  stream, include_usage = _stream(body)
  return CompletionRequest(body["model"], _prompt(body["prompt"]), params, stream, include_usage)


def parse_chat(body: Any) -> ChatRequest:
  body = _object(body, CHAT_FIELDS)
  if "messages" not in body:
    raise APIError("messages is required", param="messages")
  logprobs, top = body.get("logprobs"), body.get("top_logprobs")
  if logprobs is not None and not isinstance(logprobs, bool):
    raise APIError(f"logprobs={logprobs!r} must be true or false", param="logprobs")
  if top is not None:
    if not (_is_int(top) and 0 <= top <= MAX_CHAT_TOP_LOGPROBS):
      raise APIError(f"top_logprobs={top!r} must be an int in [0, {MAX_CHAT_TOP_LOGPROBS}]", param="top_logprobs")
    if not logprobs:
      raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
  name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  params = _sampling(body, max_tokens=body.get(name), max_tokens_name=name,
                     logprobs=(top or 0) if logprobs else None)
  stream, include_usage = _stream(body)
  return ChatRequest(body["model"], _messages(body["messages"]), params, stream, include_usage)


def _object(body: Any, fields: frozenset) -> dict:
  if not isinstance(body, dict):
    raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
  unknown = sorted(set(body) - fields)
  if unknown:
    raise APIError(f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(fields))}", param=unknown[0],
                   code="unknown_parameter")
  if not isinstance(body.get("model"), str):
    raise APIError("model is required: the name /v1/models lists", param="model")
  if body.get("user") is not None and not isinstance(body["user"], str):
    raise APIError(f"user={body['user']!r} must be a string", param="user")
  if body.get("logit_bias"):  # None and {} change nothing
    raise APIError("logit_bias is not supported", param="logit_bias")
  return body


def _sampling(body: dict, *, max_tokens, max_tokens_name: str, logprobs: int | None) -> SamplingParams:
  """SamplingParams of the body's fields; each value is checked alone, so an error names its field."""
  fields = {"temperature": 1.0, "max_tokens": _checked(max_tokens_name, "max_tokens", max_tokens),
            "logprobs": logprobs}
  for name, field in _SAMPLING.items():
    value = body.get(name)
    if value is None:
      continue
    if name == "top_k" and value == -1:  # vLLM spells "off" -1
      value = 0
    if name == "stop":
      value = _strings(value, name)
    if name == "stop_token_ids" and not isinstance(value, list):
      raise APIError(f"stop_token_ids={value!r} must be a list of token ids", param=name)
    fields[field] = _checked(name, field, value)
  try:
    return SamplingParams(**fields)
  except ValueError as e:  # each field passed alone; a combination failing would be a bug here
    raise APIError(str(e)) from None


def _checked(name: str, field: str, value):
  try:
    SamplingParams(**{field: value})
  except (ValueError, TypeError) as e:
    message = str(e).replace(f"SamplingParams.{field}", name, 1)
    raise APIError(message if name in message else f"{name}={value!r}: {message}", param=name) from None
  return value


def _strings(value, name: str) -> tuple[str, ...]:
  if isinstance(value, str):
    return (value,)
  if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
    raise APIError(f"{name}={value!r:.80} must be a string or a list of strings", param=name)
  return tuple(value)


def _stream(body: dict) -> tuple[bool, bool]:
  stream, options = body.get("stream"), body.get("stream_options")
  if stream is not None and not isinstance(stream, bool):
    raise APIError(f"stream={stream!r} must be true or false", param="stream")
  if options is None:
    return bool(stream), False
  if not stream:
    raise APIError("stream_options is only allowed with stream=true", param="stream_options")
  if not isinstance(options, dict) or set(options) - {"include_usage"}:
    raise APIError(f"stream_options={options!r:.80} must be {{'include_usage': bool}}", param="stream_options")
  include_usage = options.get("include_usage")
  if include_usage is not None and not isinstance(include_usage, bool):
    raise APIError(f"stream_options.include_usage={include_usage!r} must be true or false", param="stream_options")
  return True, bool(include_usage)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _prompt(prompt) -> str | list[int]:
  if isinstance(prompt, str):
    return prompt
  if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
    return prompt
  if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
    raise APIError(f"a batch of {len(prompt)} prompts is not supported: send one prompt per request", param="prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    return _prompt(prompt[0])
  raise APIError(f"prompt={prompt!r:.80} must be a string or a non-empty list of token ids", param="prompt")


def _messages(messages) -> list[dict]:
  """[{"role", "content"}] with content as text (a list of text parts joined); a message's name is dropped."""
  if not isinstance(messages, list) or not messages:
    raise APIError("messages must be a non-empty list of {role, content}", param="messages")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or set(message) - {
        "role", "content", "name"}:
      raise APIError(f"messages[{i}]={message!r:.80} must be {{'role': str, 'content': str}}", param="messages")
    content = message.get("content")
    if isinstance(content, list):
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise APIError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': str}}) are supported",
                       param="messages")
      content = "".join(p["text"] for p in content)
    if content is None and message["role"] == "assistant":
      content = ""
    if not isinstance(content, str):
      raise APIError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
    out.append({"role": message["role"], "content": content})
  return out


# -- responses --------------------------------------------------------------------------------------


class TokenStrings:
  """How a token shows in logprobs: its text, and its UTF-8 bytes (a byte-fallback piece is its byte)."""

  _BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self._cache: dict[int, tuple[str, list[int]]] = {}

  def __call__(self, token_id: int) -> tuple[str, list[int]]:
    if token_id not in self._cache:
      self._cache[token_id] = self._strings(token_id)
    return self._cache[token_id]

  def _strings(self, token_id: int) -> tuple[str, list[int]]:
    tokenizer = self._tokenizer
    if token_id >= getattr(tokenizer, "vocab_size", token_id + 1):  # a padded embedding row: no text
      return f"<id:{token_id}>", []
    if hasattr(tokenizer, "id_to_piece"):  # sentencepiece: '▁' is a space, '<0x0A>' a byte
      piece = tokenizer.id_to_piece(token_id)
      match = self._BYTE.fullmatch(piece)
      data = bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode()
    else:
      data = tokenizer.decode([token_id]).encode()
    try:
      text = data.decode()
    except UnicodeDecodeError:  # part of a character: OpenAI shows such tokens as "bytes:\xe2\x80"
      text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
    return text, list(data)


def usage(output: RequestOutput) -> dict:
  prompt, completion = len(output.prompt_token_ids), sum(len(o.token_ids) for o in output.outputs)
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(entries: Sequence[TokenLogprob], strings: Callable, offset: int = 0) -> dict:
  """The completions endpoint's logprobs of `entries`, whose text starts at `offset` in the completion."""
  tokens, offsets = [], []
  for entry in entries:
    text = strings(entry.token_id)[0]
    tokens.append(text)
    offsets.append(offset)
    offset += len(text)
  return {
      "tokens": tokens,
      "token_logprobs": [e.logprob for e in entries],
      "top_logprobs": [{strings(t)[0]: lp for t, lp in e.top} for e in entries],
      "text_offset": offsets,
  }


def chat_logprobs(entries: Sequence[TokenLogprob], strings: Callable) -> dict:
  def one(token_id, logprob):
    text, data = strings(token_id)
    return {"token": text, "logprob": logprob, "bytes": data}

  content = [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
  return {"content": content, "refusal": None}


def completion_object(request_id: str, created: int, model: str, choices: list[dict], usage_: dict | None) -> dict:
  """A text_completion, whole or one chunk of a stream (choices: index, text, logprobs, finish_reason)."""
  return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
          "usage": usage_, "system_fingerprint": None}


def chat_object(request_id: str, created: int, model: str, choices: list[dict], usage_: dict | None, *,
                chunk: bool) -> dict:
  """A chat.completion (choices: index, message, logprobs, finish_reason) or a chat.completion.chunk
  (choices: index, delta, logprobs, finish_reason)."""
  return {"id": request_id, "object": "chat.completion.chunk" if chunk else "chat.completion", "created": created,
          "model": model, "choices": choices, "usage": usage_, "system_fingerprint": None}
