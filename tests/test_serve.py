"""The OpenAI-compatible server (infer.serve), through OpenAI's own client against a live server on
127.0.0.1: completions and chat, whole and streamed (a stream's text is the whole response's), n > 1,
stop strings, logprobs and usage; 32 concurrent clients; each bad input its status and OpenAI's error
shape; a client that leaves mid-stream frees its blocks; and `python -m infer.serve` itself.

The model is the tiny Hugging Face Llama fixture (vocabulary 128) with a 128-piece sentencepiece model
trained here, so the engine never meets an id its tokenizer cannot decode. Every engine here has the
same few step shapes (ENGINE), so the few compilations serve the whole file: the second server's, and
the subprocess's through the session's persistent compilation cache.
"""

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from concurrent import futures
from pathlib import Path

import httpx
import numpy as np
import openai
import portpicker
import pytest
import uvicorn

import infer
import rundir
from configs import validation
from configs.infer import serve as serve_config
from infer.serve import AsyncEngine, build_app, server
from infer.serve.chat_template import hf_chat_template, jinja_renderer
from rundir import tokenizer as tokenizer_lib

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "llama"
# LoRA adapters of that Llama (PEFT's format), served beside it.
ADAPTERS = {"peft-lora": str(ROOT / "tests" / "fixtures" / "peft" / "lora"),
            "ours-lora": str(ROOT / "tests" / "fixtures" / "peft" / "ours_lora")}
MODEL = "tiny-llama"
PROMPT = "the cat sat on"
# Few step shapes, so few compilations: at most 16 tokens a step (one token bucket), and blocks as long as
# the model (block tables one block wide); the step then varies only with whether top log-probs are asked.
ENGINE = dict(block_size=128, num_blocks=16, max_num_seqs=16, max_num_batched_tokens=16, max_model_len=128)
# transformers-style: the bos_token the template writes is left out (the engine adds the bos id).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "you are a cat"}, {"role": "user", "content": "hello how are you"}]
GREEDY = dict(temperature=0, max_tokens=24, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """The Llama fixture's weights with a sentencepiece model of exactly its 128 ids and a chat template."""
  directory = tmp_path_factory.mktemp("hf") / MODEL
  directory.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(FIXTURE / name, directory)
  words = ("the cat sat on a mat while dogs ran far away from home and birds sang in trees hello world how are "
           "you today I am fine thank you very much what is your name my name is bob one two three four").split()
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(words, size=20)) for _ in range(300)]
  tokenizer_lib.train_tokenizer(texts, directory / "tokenizer.model", vocab_size=128, byte_fallback=False,
                                special_tokens=["<|im_start|>", "<|im_end|>"])
  config = {"chat_template": CHAT_TEMPLATE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return directory


@contextlib.contextmanager
def _serving(app):
  """uvicorn on a free port of 127.0.0.1, in a thread, until the block ends."""
  port = portpicker.pick_unused_port()
  live = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=live.run, daemon=True)
  thread.start()
  _wait_healthy(port, lambda: thread.is_alive())
  try:
    yield port
  finally:
    live.should_exit = True
    thread.join(30)


def _wait_healthy(port: int, alive, timeout: float = 120.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert alive(), "the server stopped before it was healthy"
    with contextlib.suppress(httpx.TransportError):
      if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
        return
    time.sleep(0.1)
  raise TimeoutError(f"no healthy server on port {port} after {timeout} s")


@pytest.fixture(scope="module")
def entry_point(hf_dir):
  """`python -m infer.serve` on hf_dir, started with the module (see `live`) and stopped after it."""
  port = portpicker.pick_unused_port()
  flags = [f"--config.{k}={v}" for k, v in ENGINE.items()]
  flags.append("--config.adapters=" + ",".join(f"{name}={path}" for name, path in ADAPTERS.items()))
  proc = subprocess.Popen(
      [sys.executable, "-m", "infer.serve", "--config=configs/infer/serve.py", f"--config.checkpoint={hf_dir}",
       f"--config.port={port}", *flags], cwd=ROOT, env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  try:
    yield proc, port
  finally:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
      proc.communicate(timeout=30)
    proc.kill()


@pytest.fixture(scope="module")
def live(hf_dir, entry_point):
  # entry_point is started first so that its start-up (imports, loading) overlaps these tests; by the
  # time it serves its first request, the step it compiles is in the session's persistent cache.
  del entry_point
  module, tokenizer = rundir.load(hf_dir)
  engine = infer.Engine(module, tokenizer, infer.EngineConfig(**ENGINE), adapters=ADAPTERS)
  render = jinja_renderer(hf_chat_template(hf_dir))
  app = build_app(AsyncEngine(engine), model_name=MODEL, chat_template=render)
  with _serving(app) as port:
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    yield types.SimpleNamespace(url=url, client=client, engine=engine, module=module, tokenizer=tokenizer,
                                render=render)


def _prompt_tokens(tokenizer, text: str) -> int:
  return 1 + len(tokenizer.encode(text))  # and the bos the engine adds


def test_completions_whole_and_streamed_are_the_engines_greedy_text(live):
  c = live.client
  whole = c.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
  assert whole.object == "text_completion" and whole.id.startswith("cmpl-") and whole.model == MODEL
  [choice] = whole.choices
  assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
  offline = infer.Engine(live.module, live.tokenizer, infer.EngineConfig(**ENGINE)).generate(
      [PROMPT], infer.SamplingParams(max_tokens=24, ignore_eos=True))[0]
  assert choice.text == offline.outputs[0].text and len(choice.text) >= 8
  assert whole.usage.prompt_tokens == _prompt_tokens(live.tokenizer, PROMPT) == len(offline.prompt_token_ids)
  assert whole.usage.completion_tokens == 24 and whole.usage.total_tokens == whole.usage.prompt_tokens + 24

  chunks = list(c.completions.create(model=MODEL, prompt=PROMPT, stream=True, stream_options={"include_usage": True},
                                     **GREEDY))
  *texts, last = chunks
  assert "".join(ch.choices[0].text for ch in texts) == choice.text
  assert [ch.choices[0].finish_reason for ch in texts][-1] == "length"
  assert not last.choices and last.usage == whole.usage
  # A prompt of token ids is the same prompt.
  ids = c.completions.create(model=MODEL, prompt=offline.prompt_token_ids, **GREEDY)
  assert ids.choices[0].text == choice.text


def test_the_model_field_picks_a_lora_adapter_per_request(live):
  """Requests for the base and each adapter, concurrently (rows of the same steps): each gets the
  greedy text of its adapter merged into the base (model.peft), generated alone."""
  from infer.cli import continuation  # noqa: PLC0415
  from model import peft, projections  # noqa: PLC0415

  names = [MODEL, *ADAPTERS]
  with futures.ThreadPoolExecutor(len(names)) as pool:
    got = list(pool.map(lambda name: live.client.completions.create(model=name, prompt=PROMPT, **GREEDY), names))
  prompt = [live.tokenizer.bos_id, *live.tokenizer.encode(PROMPT)]
  for name, completion in zip(names, got):
    module = live.module
    if name in ADAPTERS:
      module = peft.merge(peft.load_adapter(projections.shallow_copy(live.module), ADAPTERS[name]))
    tokens = infer.generate(module, [prompt], max_new_tokens=24).tokens[0]
    assert completion.model == name
    assert completion.choices[0].text == continuation(live.tokenizer, prompt, tokens), name
  assert len({c.choices[0].text for c in got}) == 3


def test_chat_whole_and_streamed(live):
  c = live.client
  whole = c.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
  assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
  [choice] = whole.choices
  assert choice.message.role == "assistant" and choice.finish_reason == "length"
  rendered = live.render(MESSAGES)
  assert rendered.startswith("<|im_start|>system\nyou are a cat<|im_end|>\n") and rendered.endswith("assistant\n")
  assert whole.usage.prompt_tokens == _prompt_tokens(live.tokenizer, rendered)
  assert whole.usage.completion_tokens == 24

  first, *chunks = c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **GREEDY)
  assert first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
  assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == choice.message.content
  assert chunks[-1].choices[0].finish_reason == "length"


def test_n_completions_each_have_an_index_and_count_in_usage(live):
  c = live.client
  whole = c.completions.create(model=MODEL, prompt=PROMPT, n=2, temperature=1.0, seed=3, max_tokens=6)
  assert sorted(ch.index for ch in whole.choices) == [0, 1]
  assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens == _prompt_tokens(live.tokenizer, PROMPT)
  texts = {0: "", 1: ""}
  for chunk in c.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, stream=True, temperature=1.0, seed=3,
                                         max_tokens=6):
    for ch in chunk.choices:
      texts[ch.index] += ch.delta.content or ""
  chat = c.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, temperature=1.0, seed=3, max_tokens=6)
  assert {ch.index: ch.message.content for ch in chat.choices} == texts  # seeded: the same two samples


def test_a_stop_string_ends_the_text_before_it(live):
  c = live.client
  text = c.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text
  stop = text[len(text) // 2: len(text) // 2 + 2]
  expected = text[: text.find(stop)]
  whole = c.completions.create(model=MODEL, prompt=PROMPT, stop=[stop, "never in it"], **GREEDY)
  assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
  streamed = list(c.completions.create(model=MODEL, prompt=PROMPT, stop=stop, stream=True, **GREEDY))
  assert "".join(ch.choices[0].text for ch in streamed) == expected  # held back, never shown then taken back
  assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_of_completions_and_chat(live):
  c = live.client
  whole = c.completions.create(model=MODEL, prompt=PROMPT, logprobs=2, **GREEDY)
  lp = whole.choices[0].logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 24
  for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    assert 1 <= len(top) <= 2 and logprob <= 0
    assert top[token] == pytest.approx(logprob) == pytest.approx(max(top.values()))  # greedy: the top token
  assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
  streamed = [ch.choices[0].logprobs for ch in c.completions.create(model=MODEL, prompt=PROMPT, logprobs=2,
                                                                     stream=True, **GREEDY)]
  assert sum((s.tokens for s in streamed), []) == lp.tokens
  assert sum((s.text_offset for s in streamed), []) == lp.text_offset

  chat = c.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2, **GREEDY)
  content = chat.choices[0].logprobs.content
  assert len(content) == chat.usage.completion_tokens == 24
  for entry in content:
    assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
    assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert entry.logprob >= entry.top_logprobs[1].logprob
    assert entry.bytes == list(entry.token.encode())
  plain = c.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, **GREEDY)
  assert all(not e.top_logprobs for e in plain.choices[0].logprobs.content)


def test_32_concurrent_clients_all_complete(live):
  async def one(client, i):
    if i % 2:
      result = await client.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=8, temperature=0.7,
                                               seed=i)
      return result.choices[0].finish_reason, result.usage.completion_tokens
    messages = [{"role": "user", "content": f"hi {i}"}]
    if i % 4:
      result = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
      return result.choices[0].finish_reason, result.usage.completion_tokens
    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    return chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens

  async def main():
    async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0) as client:
      return await asyncio.gather(*(one(client, i) for i in range(32)))

  for reason, tokens in asyncio.run(main()):
    assert reason in ("stop", "length") and 1 <= tokens <= 8
  assert _idle(live.engine)


def _idle(engine, timeout: float = 10.0) -> bool:
  """Whether the engine (stepped by the server's thread) is idle with every block free, within timeout."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    with contextlib.suppress(RuntimeError):  # num_waiting iterates a deque the engine's thread may change
      if engine.num_running == 0 and engine.num_waiting == 0 and engine.block_manager.num_used == 0:
        return True
    time.sleep(0.05)
  return False


def _error(response: httpx.Response, status: int, param=None) -> dict:
  assert response.status_code == status, response.text
  body = response.json()
  assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
  assert body["error"]["param"] == param and body["error"]["message"]
  return body["error"]


@pytest.mark.parametrize("path, body, param, message", [
    ("completions", {"prompt": "x", "max_tokns": 5}, "max_tokns", "unknown parameter 'max_tokns'"),
    ("completions", {"prompt": "x", "temperature": 3}, "temperature", r"temperature=3: must be a number in \[0, 2\]"),
    ("completions", {"prompt": "x", "logprobs": 6}, "logprobs", r"logprobs=6 must be an int in \[0, 5\]"),
    ("completions", {"prompt": "x", "n": 0}, "n", "n=0"),
    ("completions", {"prompt": "x", "stop": [""]}, "stop", "stop"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias", "logit_bias is not supported"),
    ("completions", {"prompt": "x", "echo": True}, "echo", "echo=true"),
    ("completions", {"prompt": ["a", "b"]}, "prompt", "a batch of 2 prompts is not supported"),
    ("completions", {"prompt": list(range(3, 120)) * 2}, "prompt", "max_model_len=128"),
    ("completions", {"prompt": [500]}, "prompt", "outside the vocabulary"),
    ("chat/completions", {"messages": MESSAGES, "top_logprobs": 21, "logprobs": True}, "top_logprobs",
     "top_logprobs=21"),
    ("chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "needs logprobs=true"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages", "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hello " * 150}]}, "messages",
     "max_model_len|max_tokens"),
    ("chat/completions", {"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options",
     "only allowed with stream=true"),
])
def test_bad_parameters_are_400_naming_them(live, path, body, param, message):
  with pytest.raises(openai.BadRequestError) as raised:  # extra_body's keys replace the client's own
    if path == "completions":
      live.client.completions.create(model=MODEL, prompt="x", extra_body=body)
    else:
      live.client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=body)
  error = raised.value.body
  assert raised.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
  assert re.search(message, error["message"]), error["message"]
  assert set(error) == {"message", "type", "param", "code"}


def test_malformed_json_unknown_model_and_routes_are_openai_errors(live):
  error = _error(httpx.post(f"{live.url}/v1/completions", content=b'{"model": "x",', timeout=10), 400)
  assert "not valid JSON" in error["message"] and error["type"] == "invalid_request_error"
  _error(httpx.post(f"{live.url}/v1/chat/completions", json=[1, 2], timeout=10), 400)
  error = _error(httpx.post(f"{live.url}/v1/completions", json={"model": "gpt-9", "prompt": "x"}, timeout=10), 404,
                 param="model")
  assert error["code"] == "model_not_found"
  with pytest.raises(openai.NotFoundError):
    live.client.chat.completions.create(model="gpt-9", messages=MESSAGES)
  _error(httpx.get(f"{live.url}/v1/nowhere", timeout=10), 404)
  _error(httpx.get(f"{live.url}/v1/completions", timeout=10), 405)


def test_a_full_queue_is_429(live):
  config = infer.EngineConfig(**{**ENGINE, "max_num_seqs": 1, "max_waiting": 1})  # one running, one waiting
  engine = infer.Engine(live.module, live.tokenizer, config)
  with _serving(build_app(AsyncEngine(engine), model_name=MODEL)) as port:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)

    def one(i):
      try:
        return client.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=100, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].finish_reason
      except openai.RateLimitError as e:
        assert e.status_code == 429 and e.body["code"] == "queue_full" and "max_waiting=1" in e.body["message"]
        return 429

    with futures.ThreadPoolExecutor(8) as pool:
      outcomes = list(pool.map(one, range(8)))
  assert outcomes.count(429) >= 1 and outcomes.count("length") >= 1
  assert outcomes.count(429) + outcomes.count("length") == 8


def _aborted(url: str, count: int, timeout: float = 5.0) -> bool:
  deadline = time.monotonic() + timeout
  while f"\ninfer_requests_aborted_total {count:.1f}" not in httpx.get(f"{url}/metrics", timeout=10).text:
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


def test_a_client_leaving_aborts_its_request_and_frees_its_blocks(live):
  # 120 tokens (120 steps) take longer than the client stays: the request is aborted, not finished.
  body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "ignore_eos": True, "stream": True}
  with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as response:
    assert response.status_code == 200
    first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first[len("data: "):])["choices"][0]["finish_reason"] is None
  assert _idle(live.engine, timeout=5.0) and _aborted(live.url, 1)
  # A whole (not streamed) response the client stops waiting for: the same.
  with pytest.raises(httpx.ReadTimeout):
    httpx.post(f"{live.url}/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(10, read=0.05))
  assert _idle(live.engine, timeout=5.0) and _aborted(live.url, 2)


def test_models_health_and_metrics(live):
  assert [m.id for m in live.client.models.list()] == [MODEL, *ADAPTERS]
  assert httpx.get(f"{live.url}/health", timeout=10).json() == {"status": "ok"}
  metrics = httpx.get(f"{live.url}/metrics", timeout=10).text
  for name in ("infer_num_requests_running", "infer_num_requests_waiting", "infer_kv_cache_blocks_used",
               "infer_prompt_tokens_total", "infer_generation_tokens_total", "infer_time_to_first_token_seconds_bucket",
               "infer_time_per_output_token_seconds_bucket"):
    assert f"\n{name}" in metrics, name
  assert "\ninfer_kv_cache_blocks_used 0.0" in metrics and "\ninfer_generation_tokens_total 0.0" not in metrics


def test_config_checks_name_the_key():
  config = serve_config.get_config()
  with pytest.raises(validation.ConfigError, match="config.checkpoint is required"):
    server.validate(config, ["chatml"])
  config.checkpoint = "runs/somewhere"
  server.validate(config, ["chatml"])
  for key, value, message in [("max_num_seqs", 0, "config.max_num_seqs=0 must be >= 1"),
                              ("num_blocks", -1, r"config.num_blocks=-1 must be >= 0 \(0 is auto\)"),
                              ("chat_template", "vicuna", r"config.chat_template='vicuna' is not one of \['chatml'\]")]:
    bad = serve_config.get_config()
    bad.checkpoint, bad[key] = "runs/somewhere", value
    with pytest.raises(validation.ConfigError, match=message):
      server.validate(bad, ["chatml"])
  assert server.model_name(config) == "somewhere"
  assert server.engine_config(config) == infer.EngineConfig(block_size=16, max_num_seqs=32)


def test_the_entry_point_serves_a_hugging_face_directory(hf_dir, entry_point):
  proc, port = entry_point
  _wait_healthy(port, lambda: proc.poll() is None)
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
  completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)  # the dir's name
  assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens >= 1
  chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
  rendered = jinja_renderer(hf_chat_template(hf_dir))(MESSAGES)  # the directory's own template was picked
  tokenizer = tokenizer_lib.load_tokenizer(hf_dir / "tokenizer.model")
  assert chat.usage.prompt_tokens == _prompt_tokens(tokenizer, rendered)
  proc.terminate()
  output, _ = proc.communicate(timeout=30)
  # uvicorn shuts down cleanly, then re-raises the signal it caught (so the exit status tells of it).
  assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in output, output
  assert f"serving '{MODEL}'" in output and "chat template: the chat_template of tokenizer_config.json" in output
  assert f"adapters: {', '.join(ADAPTERS)}" in output
