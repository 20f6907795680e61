"""RRHF: the loss and its gradient against a float64 numpy loop on random logits (ties in the
scores, padding responses, a padding prompt), a hand-worked case, the JSONL rankings and their rows,
and tiny runs through the shared trainer on 8 fake devices (the DPO tests' tiny model and tokenizer)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model as model_lib
from align import data, losses, preferences, rollout, rrhf, tasks
from align import run as align_run
from configs import validation
from rundir import tokenizer as tokenizer_lib
from tests import test_ai_feedback, test_align_dpo
from train import trainer

_config = test_align_dpo._config  # the DPO tests' tiny run: same model, tokenizer and mesh
tokenizer_path = test_align_dpo.tokenizer_path  # a module fixture: the tokenizer those tests train


def _reference(logits, targets, mask, scores, sft_weight):
  """The loss and d loss / d logits in float64, one prompt and one pair at a time."""
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # [B, N, T, V]
  picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  counts = mask.sum(-1)
  p = (picked * mask).sum(-1) / np.maximum(counts, 1)  # [B, N]
  total, prompts, dp = 0.0, 0, np.zeros_like(p)
  for b in range(p.shape[0]):
    real = [i for i in range(p.shape[1]) if counts[b, i] > 0]
    if not real:
      continue
    prompts += 1
    for i in real:
      for j in real:
        if scores[b, i] < scores[b, j] and p[b, i] > p[b, j]:
          total += p[b, i] - p[b, j]
          dp[b, i] += 1
          dp[b, j] -= 1
    best = max(real, key=lambda i: (scores[b, i], -i))  # the first of the best
    total -= sft_weight * p[b, best]
    dp[b, best] -= sft_weight
  # d p / d logits = mask / count * (onehot(target) - softmax)
  onehot = np.eye(logits.shape[-1])[targets]
  weight = (dp / np.maximum(counts, 1))[..., None] * mask
  grad = weight[..., None] * (onehot - np.exp(logp))
  return total / prompts, grad / prompts


def _random_batch(seed=0, b=4, n=4, t=6, v=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, (b, n, t, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, n, t)).astype(np.int32)
  start = rng.integers(1, 3, (b, n))  # prompt positions carry no loss
  end = rng.integers(4, t + 1, (b, n))
  mask = ((np.arange(t) >= start[..., None]) & (np.arange(t) < end[..., None])).astype(np.int32)
  mask[0, 3] = 0  # a padding response: the prompt has three
  mask[2] = 0  # a padding prompt
  scores = np.asarray([[1.0, 0.0, 1.0, 5.0], [0.5, 0.5, 0.5, 0.5], [1.0, 2.0, 3.0, 4.0], [2.0, -1.0, 2.0, 0.0]],
                      np.float32)  # ties within prompts 0, 1, 3; prompt 0's best is its padding (ignored)
  return {"targets": targets, "mask": mask, "scores": scores}, logits


@pytest.mark.parametrize("sft_weight", [1.0, 0.3])
def test_rrhf_loss_and_gradient_match_a_float64_loop(sft_weight):
  batch, logits = _random_batch()
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  loss = jax.value_and_grad(lambda x: rrhf.ranking_loss(x, jbatch, sft_weight=sft_weight)[0])
  value, grad = jax.jit(loss)(jnp.asarray(logits))  # jitted: one compile, not one per op
  expected, expected_grad = _reference(logits, batch["targets"], batch["mask"], batch["scores"], sft_weight)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-6)


def test_micro_batch_shares_add_up_to_the_whole_batch():
  batch, logits = _random_batch(seed=1)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  loss = jax.jit(lambda logits, batch, whole: rrhf.ranking_loss(logits, batch, sft_weight=1.0, whole_batch=whole)[0])
  whole = loss(jnp.asarray(logits), jbatch, None)
  shares = [loss(jnp.asarray(logits[rows]), {k: v[rows] for k, v in jbatch.items()}, jbatch)
            for rows in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(float(sum(shares)), float(whole), rtol=1e-6)


def test_rrhf_loss_by_hand():
  # One prompt, p = (-3, -1, -2), scores (1, 0, 0): responses 1 and 2 score below 0 but are more
  # likely, so the rank loss is (-1 + 3) + (-2 + 3) = 3 (the tie 1-2 is no pair); the best is 0,
  # its NLL 3.
  loss, metrics = losses.rrhf_loss(jnp.asarray([[-3.0, -1.0, -2.0]]), jnp.asarray([[1.0, 0.0, 0.0]]),
                                   jnp.ones((1, 3)), sft_weight=0.5)
  assert float(loss) == pytest.approx(3 + 0.5 * 3)
  assert float(metrics["rrhf/rank_loss"]) == 3 and float(metrics["rrhf/accuracy"]) == 0


def test_jsonl_rankings_and_their_rows(tokenizer_path, tmp_path):
  path = tmp_path / "ranked.jsonl"
  lines = [{"prompt": "Question: What is 1 + 2?", "responses": [" Answer: 3", " Answer: 4"], "scores": [1, 0]},
           {"prompt": "Question: What is 2 + 2?", "responses": [" Answer: 4"], "scores": [0.5, 1.0]},  # a score too many
           {"prompt": "Question: What is 3 + 2?", "responses": ["a", "b", "c"], "scores": [0.2, 0.2, 0.9]}]
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  with pytest.raises(data.DataError, match="ranked.jsonl:2: 'scores' must be a list of 1 numbers"):
    data.read_jsonl(path, "ranking")
  found = data.read_jsonl(path, "ranking", on_error="skip")
  assert [r["scores"] for r in found] == [[1, 0], [0.2, 0.2, 0.9]]
  tok = tokenizer_lib.load_tokenizer(tokenizer_path)
  row = rrhf.ranked_features(found[0], tok, seq_len=32, responses=3)
  assert row["tokens"].shape == (3, 32) and row["scores"].tolist() == [1.0, 0.0, 0.0]
  assert row["mask"][:2].sum(-1).min() > 0 and row["mask"][2].sum() == 0  # the third response is padding
  with pytest.raises(ValueError, match="config.rrhf.responses=2"):
    rrhf.ranked_features(found[1], tok, seq_len=32, responses=2)


def test_rrhf_through_the_trainer_on_the_task_s_rankings(tokenizer_path, tmp_path):
  # The task gives two responses per prompt (its worked solution and a wrong one); rows hold 3.
  config = _config(tokenizer_path, "rrhf", **{"rrhf.responses": 3})
  run, _, _ = align_run.setup(config, tmp_path)
  local = next(run.train_iter)
  assert local["tokens"].shape == (8, 3, 96) and not local["mask"][:, 2].any()
  np.testing.assert_array_equal(local["scores"][:, :2], np.tile([1.0, 0.0], (8, 1)))
  # The trainer's loss (all responses in one [B * N, T] forward pass) is the float64 loop's on the model's logits.
  model = run.model()
  loss, _ = run.loss_fn(model, {k: jnp.asarray(v) for k, v in local.items()}, None)
  logits = np.asarray(model(local["tokens"].reshape(24, 96))).reshape(8, 3, 96, -1)
  expected, _ = _reference(logits, local["targets"], local["mask"], local["scores"], 1.0)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  batch = trainer.global_batch(run, local)
  state, history = jax.tree.map(jnp.copy, run.state), []  # the step donates its state; run.state stays usable
  for _ in range(6):
    state, metrics = run.train_step(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  first, last = history[0], history[-1]
  assert np.isfinite(last["loss"]) and last["loss"] < first["loss"] - 0.05
  assert last["rrhf/sft_loss"] < first["rrhf/sft_loss"]


def test_rrhf_on_the_policy_s_samples_keeps_them_for_a_resumed_run(tokenizer_path, tmp_path):
  overrides = {"rrhf.source": "policy", "rrhf.samples": 2, "rrhf.with_solutions": True, "rrhf.responses": 3,
               "task.train_size": 8, "task.accuracy_tokens": 6}
  result = align_run.run(_config(tokenizer_path, "rrhf", total_steps=2, **overrides), tmp_path)
  assert result["step"] == 2 and np.isfinite(result["loss"])
  kept = data.read_jsonl(tmp_path / rrhf.RESPONSES_FILE, "ranking")
  assert len(kept) == 8 and all(len(r["responses"]) == 3 and r["scores"][2] == 1.0 for r in kept)  # solution last
  written = (tmp_path / rrhf.RESPONSES_FILE).stat().st_mtime_ns
  resumed = align_run.run(_config(tokenizer_path, "rrhf", total_steps=3, **overrides), tmp_path)
  assert resumed["step"] == 3 and (tmp_path / rrhf.RESPONSES_FILE).stat().st_mtime_ns == written
  # FLOPs: the 3 responses of each row (padding ones included) trained over 96 tokens.
  per_token = model_lib.flops_per_token(result["run"].model_config, 96)
  test_align_dpo.assert_flops_per_step(tmp_path, 8 * 3 * 96 * per_token)


@pytest.mark.parametrize("overrides, message", [
    ({"rrhf.responses": 1}, "config.rrhf.responses=1"),
    ({"rrhf.source": "mine"}, "config.rrhf.source='mine'"),
    ({"rrhf.sft_weight": -1.0}, "config.rrhf.sft_weight=-1.0"),
    ({"rrhf.reward": "style"}, "config.rrhf.reward='style'"),
    ({"rrhf.source": "policy", "rrhf.samples": 4, "rrhf.with_solutions": True}, "config.rrhf.samples=4"),
    ({"rrhf.source": "policy", "task.name": ""}, "config.rrhf.source='policy'"),
])
def test_bad_rrhf_configs_name_the_key(tokenizer_path, overrides, message):
  with pytest.raises(validation.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    align_run.validate(_config(tokenizer_path, "rrhf", **overrides))


def test_the_policy_s_rankings_train_on_the_ids_it_sampled(tokenizer_path, monkeypatch):
  """Each kept response, tokenized as the rows tokenize it, is the ids the policy sampled (the text as
  it reads after the prompt has one more leading space with sentencepiece: another first token)."""
  config = _config(tokenizer_path, "rrhf", **{"rrhf.source": "policy", "rrhf.samples": 2, "rrhf.with_solutions": False,
                                              "rrhf.responses": 2, "task.train_size": 3})
  tok = tokenizer_lib.load_tokenizer(tokenizer_path)
  task = tasks.get_task(config.task)
  problems = tasks.split_problems(task, config.task, "train")
  completions = {p.prompt: [p.completion(), task.wrong_completion(p)] for p in problems}
  monkeypatch.setattr(rollout, "sample", test_ai_feedback._sampler_of(completions, tok))
  kept = rrhf.policy_records(config, None, tok, task)
  assert [r["prompt"] for r in kept] == list(completions)
  for record in kept:
    assert record["scores"][0] == 1.0 > record["scores"][1]  # the worked solution, then a wrong one
    for text, want in zip(record["responses"], completions[record["prompt"]]):
      features = preferences.completion_features(record["prompt"], text, tok, seq_len=512)
      sampled = data.prompt_completion_ids({"prompt": record["prompt"], "completion": want}, tok)[1]
      assert features["targets"][features["mask"] == 1].tolist() == sampled
