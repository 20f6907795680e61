"""Speculative decoding against plain decoding at B=1, on the quickstart model and held-out text.

    python benchmarks/speculative.py                      # trains runs/quickstart first if it is missing
    python benchmarks/speculative.py --target=runs/quickstart --prompts=8 --new=256 --k=2,4,8

The target is a trained run (default: the README's quickstart model, `configs/pretrain/quickstart.py`;
when its directory is missing the script trains it with the README's command, about 6 minutes on
2 CPU cores). Prompts are the first --prompt_tokens tokens of held-out documents of the embedded
corpus (the documents the run's eval split holds out, so the model never trained on them).

For each prompt and each draft, at B=1 and greedy:
  plain  `infer.generate(target, [prompt], max_new_tokens=N)`
  spec   `infer.speculative_generate(target, draft, [prompt], max_new_tokens=N, num_draft_tokens=k)`
with drafts: `infer.PromptLookup()` (n-gram proposals from the prompt and the output so far: no
model) for each k, and with --draft=RUN a draft model (a smaller run on the same tokenizer, e.g.
one benchmarks/distill_draft.py trained on the target's outputs) for each --draft_k.
Each call is timed whole (prefill included, the same on both sides) as the median of --repeats
after a warm-up call that compiles; the calls alternate. speed-up = plain time / spec time, per
prompt, then the median over prompts and the total time ratio. "decode" is the same ratio of
decode time alone, t(N) - t(1) (benchmarks/decode.py's definition): each side is also timed with
max_new_tokens=1, which pays what every call pays whatever its length (the prompt's prefill, each
model's per-call decoding view, one round for speculative decoding). "= plain" checks that every
speculative output equals the plain greedy output token for token (it must: greedy speculative
decoding keeps the target's argmax). A sampled row (the quickstart's temperature 0.7, top-p 0.9;
the draft model at its longest k, else prompt lookup at k=4) shows what acceptance does when
proposals must match a sample rather than the argmax; its output is a sample from the target's
distribution (tests/test_speculative.py checks that), not the plain call's sample.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# Benchmark this checkout, not whatever copy of the package is installed.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

import infer  # noqa: E402
import rundir  # noqa: E402
from rundir import loading as rundir_loading  # noqa: E402
from configs.pretrain import quickstart  # noqa: E402
from train import data as data_lib  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--target", default=os.path.join(REPO, "runs", "quickstart"), help="a run directory")
  p.add_argument("--draft", default="", help="optional: a draft model's run directory (same tokenizer)")
  p.add_argument("--prompts", type=int, default=8, help="held-out documents to prompt with")
  p.add_argument("--prompt_tokens", type=int, default=64)
  p.add_argument("--new", type=int, default=256, help="new tokens per call (N)")
  p.add_argument("--k", default="2,4,8", help="comma-separated draft lengths for prompt lookup")
  p.add_argument("--draft_k", default="2,4", help="comma-separated draft lengths for --draft's model")
  p.add_argument("--draft_vocab", default="", help="optional: benchmarks/distill_draft.py's draft_vocab.json; the "
                 "draft model is then measured with and without it")
  p.add_argument("--max_ngram", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--sampled", type=int, default=1, choices=(0, 1), help="add a sampled row (T=0.7, top-p 0.9)")
  return p.parse_args(argv)


def ensure_target(path: str) -> None:
  if rundir_loading.is_run(path):
    return
  command = [sys.executable, "-m", "train", "--config=configs/pretrain/quickstart.py", f"--workdir={path}",
             "--config.sample_prompt="]
  print(f"{path} is not a run; training it: {' '.join(command)}", flush=True)
  subprocess.check_call(command, cwd=REPO)


def corpus_prompts(tokenizer, split: str, count: int, length: int, *, every_window: bool = False) -> list[list[int]]:
  """`count` prompts of `length` tokens from the embedded corpus's `split` ("train" or "eval"): each
  long enough document's first window, or with every_window all its consecutive windows."""
  prompts = []
  for text in data_lib.documents(quickstart.get_config().data, split):
    ids = [int(t) for t in tokenizer.encode(text)]
    starts = range(0, len(ids) - length + 1, length)
    for start in starts if every_window else starts[:1]:
      prompts.append(ids[start:start + length])
      if len(prompts) == count:
        return prompts
  raise ValueError(f"the {split} split holds only {len(prompts)} prompts of {length} tokens; ask for fewer --prompts")


def held_out_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
  """The first `length` tokens of `count` held-out documents (the run never trained on them)."""
  return corpus_prompts(tokenizer, "eval", count, length)


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def measure(calls: dict, repeats: int) -> dict:
  """name -> (median s, last output); one warm-up call each, then alternating rounds."""
  last = {name: fn() for name, fn in calls.items()}
  times = {name: [] for name in calls}
  names = list(calls)
  for i in range(repeats):
    for name in names if i % 2 == 0 else names[::-1]:
      seconds, last[name] = timed(calls[name])
      times[name].append(seconds)
  return {name: (statistics.median(times[name]), last[name]) for name in calls}


def main(argv=None):
  args = parse_args(argv)
  if args.draft_vocab and not args.draft:
    raise SystemExit("--draft_vocab is the head subset of a draft model: give --draft=RUN too")
  ensure_target(args.target)
  started = time.perf_counter()
  target, tokenizer = rundir.load(args.target)
  drafts = {f"lookup k={k}": (infer.PromptLookup(max_ngram=args.max_ngram), int(k), None) for k in args.k.split(",")}
  if args.draft:
    draft_model, _ = rundir.load(args.draft)
    drafts.update({f"model k={k}": (draft_model, int(k), None) for k in args.draft_k.split(",")})
    if args.draft_vocab:
      with open(args.draft_vocab) as f:
        ids = json.load(f)["token_ids"]
      drafts.update({f"model+{len(ids)} k={k}": (draft_model, int(k), ids) for k in args.draft_k.split(",")})
  prompts = held_out_prompts(tokenizer, args.prompts, args.prompt_tokens)
  greedy = infer.Sampling()
  sampled = infer.Sampling(temperature=0.7, top_p=0.9)
  c = target.config
  print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__} ({jax.default_backend()})")
  print(f"target {args.target}: L={c.num_layers} D={c.embed_dim} N={c.num_heads} K={c.num_kv_heads} F={c.mlp_dim} "
        f"V={c.vocab_size} {c.dtype}; {len(prompts)} held-out prompts of {args.prompt_tokens} tokens, "
        f"{args.new} new tokens, B=1, median of {args.repeats} after 1 warm-up", flush=True)

  rows = {name: [] for name in drafts}
  # The sampled row's draft: the model at its longest k when there is one, else prompt lookup at k=4.
  best = "lookup k=4" if "lookup k=4" in drafts else next(iter(drafts))
  best = ([name for name in drafts if name.startswith("model")] or [best])[-1]
  sampled_rows = []
  for index, prompt in enumerate(prompts):
    def plain(sampling=greedy, prompt=prompt, new=args.new):
      return lambda: infer.generate(target, [prompt], max_new_tokens=new, sampling=sampling, rng=index)

    def spec(draft, k, vocab, sampling=greedy, prompt=prompt, new=args.new):
      return lambda: infer.speculative_generate(target, draft, [prompt], max_new_tokens=new, num_draft_tokens=k,
                                                sampling=sampling, rng=index, draft_vocab=vocab)

    calls = {"plain": plain(), **{name: spec(*drafts[name]) for name in drafts}}
    calls.update({"plain@1": plain(new=1), **{f"{name}@1": spec(*drafts[name], new=1) for name in drafts}})
    if args.sampled:
      calls["plain sampled"] = plain(sampled)
      calls["spec sampled"] = spec(*drafts[best], sampling=sampled)
    r = measure(calls, args.repeats)
    plain_s, plain_out = r["plain"]
    for name in drafts:
      spec_s, out = r[name]
      rows[name].append(dict(plain=plain_s, spec=spec_s, stats=out.stats, equal=out.tokens == plain_out.tokens,
                             decode=(plain_s - r["plain@1"][0]) / (spec_s - r[f"{name}@1"][0])))
    if args.sampled:
      sampled_rows.append(dict(plain=r["plain sampled"][0], spec=r["spec sampled"][0], stats=r["spec sampled"][1].stats))
    print(f"prompt {index}: plain {plain_s:.3f} s; "
          + "; ".join(f"{name} {r[name][0]:.3f} s ({r[name][1].stats['tokens_per_target_call']:.2f} tok/call)"
                      for name in drafts)
          + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    if index == 0:
      print(f"  its plain greedy text: {tokenizer.decode(plain_out.tokens[0])[:160]!r}", flush=True)

  print(f"\n{'draft':<24}{'speed-up':>10}{'(total)':>9}{'min':>7}{'max':>7}{'decode':>8}{'accept':>8}{'tok/call':>10}"
        f"{'= plain':>9}")
  table = [(name, rows[name]) for name in drafts] + ([(f"{best}, sampled", sampled_rows)] if sampled_rows else [])
  for name, items in table:
    ups = [x["plain"] / x["spec"] for x in items]
    total = sum(x["plain"] for x in items) / sum(x["spec"] for x in items)
    accept = statistics.mean(x["stats"]["acceptance_rate"] for x in items)
    per_call = statistics.mean(x["stats"]["tokens_per_target_call"] for x in items)
    equal = f"{sum(x['equal'] for x in items)}/{len(items)}" if "equal" in items[0] else "sample"
    decode = f"{statistics.median(x['decode'] for x in items):.2f}x" if "decode" in items[0] else "-"
    print(f"{name:<24}{statistics.median(ups):>9.2f}x{total:>8.2f}x{min(ups):>6.2f}x{max(ups):>6.2f}x"
          f"{decode:>8}{accept:>8.2f}{per_call:>10.2f}{equal:>9}")
  print("(speed-up: median over prompts of plain / speculative call time; total: summed times; decode: median of"
        " the same ratio of t(N) - t(1), decode time without what every call pays; accept: accepted / proposed"
        " draft tokens; tok/call: new tokens per target pass; = plain: prompts whose output equals plain greedy's)")
  print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  main()
