"""Serving throughput and latency: our OpenAI-compatible server (continuous batching over a paged KV
cache) under a seeded chat-like load, against static batching: Hugging Face `generate()` (PyTorch)
and our own `infer.generate`, on the same requests and the same weights, in the same run.

    python benchmarks/serve.py                      # the default: about 15 minutes on 2 CPU cores
    python benchmarks/serve.py --requests=32 --rate=2

The weights: a seeded `transformers.LlamaForCausalLM` saved with `save_pretrained`; the server loads
that directory (`python -m infer.serve --config.checkpoint=DIR`, a subprocess, with a small
sentencepiece tokenizer of the same vocabulary written beside the weights: prompts are sent as token
ids, and every generated id has text, so each token is streamed as it comes). The requests: --requests prompts of random token ids whose prompt and output lengths are
log-normal (medians --prompt_median and --output_median, sigma --sigma, clipped to [4, --max_len/2]),
like chat traffic, greedy, with `ignore_eos` so every request makes exactly its output length.

  server, burst:   every request sent at t=0, streamed (the condition static batching gets);
  server, Poisson: requests sent at Poisson arrival times (--rate per second), streamed;
  lone:            one request alone (the --output_median tokens), streamed: the floor of TPOT;
  HF static:       the same requests in arrival order, in batches of --max_num_seqs, each batch
                   left-padded and generating its longest output (rows cannot leave early);
  ours static:     the same batches through `infer.generate` (right-padded; a batch also runs until
                   its longest row is done);
  engine offline:  every request through `infer.Engine.generate` in this process, no HTTP: the
                   server's throughput without its transport.
Throughput is the useful output tokens (each request's own length) over the wall time from the first
request to the last token. TTFT is send -> first streamed token; TPOT is (last - first token time) /
(tokens - 1) per request. The static sides run every batch once untimed first (our compilations;
PyTorch's warm-up), then timed. torch and transformers are not dependencies of ingredients; this
script installs them for itself when they are missing (benchmarks/decode.py's ensure_torch).
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.decode import ensure_torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--mlp", type=int, default=704)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--requests", type=int, default=64)
  p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
  p.add_argument("--prompt_median", type=int, default=48)
  p.add_argument("--output_median", type=int, default=48)
  p.add_argument("--sigma", type=float, default=0.7, help="log-normal sigma of both lengths")
  p.add_argument("--max_len", type=int, default=512, help="the server's max_model_len")
  p.add_argument("--max_num_seqs", type=int, default=16, help="the server's, and the static batch size")
  p.add_argument("--max_num_batched_tokens", type=int, default=256)
  p.add_argument("--port", type=int, default=0, help="0: a free port")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def workload(args):
  """[(arrival s, prompt ids, output length)] in arrival order."""
  rng = np.random.default_rng(args.seed)
  cap = args.max_len // 2

  def lengths(median):
    return np.clip(np.round(rng.lognormal(np.log(median), args.sigma, args.requests)), 4, cap).astype(int)

  prompts, outputs = lengths(args.prompt_median), lengths(args.output_median)
  arrivals = np.cumsum(rng.exponential(1.0 / args.rate, args.requests)) if args.rate > 0 else np.zeros(args.requests)
  return [(float(a), rng.integers(4, args.vocab, p).tolist(), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]


def make_checkpoint(args, workdir):
  """A seeded HF Llama saved as safetensors, with a sentencepiece tokenizer beside it."""
  torch, transformers = ensure_torch()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(args.seed)
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.mlp, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
      max_position_embeddings=args.max_len, rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa",
  )
  hf_model = transformers.LlamaForCausalLM(config).float().eval()
  path = os.path.join(workdir, "hf")
  hf_model.save_pretrained(path, safe_serialization=True)
  from rundir import tokenizer as tokenizer_lib  # noqa: PLC0415
  from train import corpus  # noqa: PLC0415

  # As many pieces as the model's vocabulary, so every generated id has text to stream (about 10 s).
  texts = [text for _, text in corpus.stdlib_documents()]
  tokenizer_lib.train_tokenizer(texts, os.path.join(path, tokenizer_lib.MODEL_FILENAME), vocab_size=args.vocab)
  return torch, transformers, hf_model, path


# ----------------------------------------------------------------------------------------------
# The server side.
# ----------------------------------------------------------------------------------------------
def start_server(args, checkpoint):
  import portpicker  # noqa: PLC0415

  port = args.port or portpicker.pick_unused_port()
  command = [
      sys.executable, "-m", "infer.serve", "--config=configs/infer/serve.py", f"--config.checkpoint={checkpoint}",
      f"--config.port={port}", f"--config.max_num_seqs={args.max_num_seqs}",
      f"--config.max_num_batched_tokens={args.max_num_batched_tokens}", f"--config.max_model_len={args.max_len}",
      f"--config.max_waiting={4 * args.requests}", "--config.model_name=bench",
  ]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  log = open(os.path.join(os.path.dirname(checkpoint), "server.log"), "w")
  process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  import httpx  # noqa: PLC0415

  deadline = time.time() + 300
  while time.time() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"the server exited with {process.returncode}; see {log.name}")
    try:
      if httpx.get(f"{url}/health", timeout=1).status_code == 200:
        return process, url
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  process.kill()
  raise RuntimeError(f"the server did not answer /health in 300 s; see {log.name}")


async def one_request(client, url, prompt, max_tokens, delay):
  """Sends at `delay` s; returns (send time, [token arrival times], completion tokens)."""
  await asyncio.sleep(delay)
  body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
          "stream": True, "stream_options": {"include_usage": True}}
  sent, times, usage = time.perf_counter(), [], None
  async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
    if response.status_code != 200:
      raise RuntimeError(f"status {response.status_code}: {await response.aread()}")
    async for line in response.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if chunk.get("usage"):
        usage = chunk["usage"]["completion_tokens"]
      if chunk["choices"] and chunk["choices"][0].get("text") is not None:
        times.append(time.perf_counter())
  return sent, times, usage


async def load(url, requests, use_arrivals: bool):
  import httpx  # noqa: PLC0415

  limits = httpx.Limits(max_connections=len(requests) + 4)
  async with httpx.AsyncClient(timeout=None, limits=limits) as client:
    start = time.perf_counter()
    results = await asyncio.gather(*[
        one_request(client, url, prompt, n, arrival if use_arrivals else 0.0) for arrival, prompt, n in requests])
    return start, results


def latency_stats(start, results, requests):
  """Throughput and per-request TTFT/TPOT from streamed results."""
  end = max(times[-1] for _, times, _ in results)
  tokens = sum(usage for _, _, usage in results)
  expected = sum(n for _, _, n in requests)
  if tokens != expected:
    raise RuntimeError(f"the server generated {tokens} tokens, the requests asked for {expected}")
  ttft = [times[0] - sent for sent, times, _ in results]
  tpot = [(times[-1] - times[0]) / (usage - 1) for _, times, usage in results if usage > 1]
  return dict(tokens=tokens, seconds=end - start, tps=tokens / (end - start), ttft=ttft, tpot=tpot)


# ----------------------------------------------------------------------------------------------
# The static sides.
# ----------------------------------------------------------------------------------------------
def batches(requests, size):
  return [requests[i: i + size] for i in range(0, len(requests), size)]


def hf_static(torch, hf_model, requests, size):
  def run(batch):
    longest = max(len(p) for _, p, _ in batch)
    ids = torch.zeros((len(batch), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (_, prompt, _) in enumerate(batch):  # left padding, as HF decoder-only generation wants
      ids[row, longest - len(prompt):] = torch.tensor(prompt)
      mask[row, longest - len(prompt):] = 1
    new = max(n for _, _, n in batch)
    with torch.inference_mode():
      hf_model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        use_cache=True, eos_token_id=None, pad_token_id=0)

  return _timed_batches(run, batches(requests, size))


def ours_static(module, requests, size):
  import infer  # noqa: PLC0415

  def run(batch):
    infer.generate(module, [p for _, p, _ in batch], max_new_tokens=max(n for _, _, n in batch))

  return _timed_batches(run, batches(requests, size))


def engine_offline(module, requests, args):
  import infer  # noqa: PLC0415

  config = infer.EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              max_model_len=args.max_len, enable_prefix_caching=False)
  prompts = [p for _, p, _ in requests]
  params = [infer.SamplingParams(max_tokens=n, ignore_eos=True) for _, _, n in requests]
  infer.Engine(module, None, config).generate(prompts, params)  # untimed: compilations
  start = time.perf_counter()
  outputs = infer.Engine(module, None, config).generate(prompts, params)
  seconds = time.perf_counter() - start
  tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
  return dict(tokens=tokens, seconds=seconds, tps=tokens / seconds)


def _timed_batches(run, groups):
  for group in groups:  # untimed: compilations and warm-up
    run(group)
  start = time.perf_counter()
  for group in groups:
    run(group)
  seconds = time.perf_counter() - start
  tokens = sum(n for group in groups for _, _, n in group)
  return dict(tokens=tokens, seconds=seconds, tps=tokens / seconds)


def percentile(values, q):
  return float(np.percentile(values, q)) if values else float("nan")


def main(argv=None):
  args = parse_args(argv)
  started = time.perf_counter()
  requests = workload(args)
  with tempfile.TemporaryDirectory() as workdir:
    torch, transformers, hf_model, checkpoint = make_checkpoint(args, workdir)
    import jax  # noqa: PLC0415

    from model import hf as model_hf  # noqa: PLC0415

    ours = model_hf.from_pretrained(checkpoint)
    server, url = start_server(args, checkpoint)
    try:
      # Warm-up (untimed): the server compiles its step for every bucket the load will use.
      asyncio.run(load(url, requests[: 2 * args.max_num_seqs], use_arrivals=False))
      lone_request = [(0.0, requests[0][1], args.output_median)]
      lone = [latency_stats(*asyncio.run(load(url, lone_request, False)), lone_request) for _ in range(3)]
      burst = latency_stats(*asyncio.run(load(url, requests, False)), requests)
      poisson = latency_stats(*asyncio.run(load(url, requests, True)), requests)
    finally:
      server.terminate()
      server.wait(timeout=30)
    hf = hf_static(torch, hf_model, requests, args.max_num_seqs)
    static = ours_static(ours, requests, args.max_num_seqs)
    offline = engine_offline(ours, requests, args)

  lone_tpot = float(np.median([r["tpot"][0] for r in lone]))
  print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}; float32")
  print(f"model: Llama L={args.layers} D={args.width} N={args.heads} K={args.kv_heads} H={args.head_dim} "
        f"F={args.mlp} V={args.vocab}; {args.requests} requests, prompt/output medians {args.prompt_median}/"
        f"{args.output_median} (log-normal sigma {args.sigma}), {sum(n for *_, n in requests)} output tokens; "
        f"max_num_seqs={args.max_num_seqs} (= the static batch), max_num_batched_tokens={args.max_num_batched_tokens}")
  print(f"\n{'side':<22}{'out tok/s':>11}{'wall s':>9}{'TTFT p50':>10}{'p99':>8}{'TPOT p50 ms':>13}{'p99':>8}")
  for name, r in (("server, burst", burst), (f"server, Poisson {args.rate:g}/s", poisson)):
    print(f"{name:<22}{r['tps']:>11.1f}{r['seconds']:>9.1f}{percentile(r['ttft'], 50):>10.2f}"
          f"{percentile(r['ttft'], 99):>8.2f}{1e3 * percentile(r['tpot'], 50):>13.1f}{1e3 * percentile(r['tpot'], 99):>8.1f}")
  for name, r in (("HF static", hf), ("ours static", static), ("engine offline", offline)):
    print(f"{name:<22}{r['tps']:>11.1f}{r['seconds']:>9.1f}")
  print(f"{'lone request':<22}{'':>11}{'':>9}{'':>10}{'':>8}{1e3 * lone_tpot:>13.1f}")
  print(f"\nthroughput, server burst / HF static: {burst['tps'] / hf['tps']:.2f}x (goal >= 3x); "
        f"/ ours static: {burst['tps'] / static['tps']:.2f}x")
  print(f"p99 TPOT / lone TPOT: burst {percentile(burst['tpot'], 99) / lone_tpot:.2f}x, Poisson "
        f"{percentile(poisson['tpot'], 99) / lone_tpot:.2f}x (goal <= 2x)")
  print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  main()
