"""Keys of the align/ configs: the trainer's keys plus `method`, the task, and the blocks that method reads."""

from typing import Any

import ml_collections

from configs import common

# The config blocks each method reads (besides the trainer's keys and config.task).
METHOD_BLOCKS = {
    "sft": ("sft",),
    "dpo": ("dpo",),
    "reward": ("dpo", "reward"),  # a reward model learns from the DPO family's preference pairs
    "ppo": ("rl", "ppo"),
    "grpo": ("rl", "grpo"),
    "rest": ("rl", "rest"),
    "distill": ("rl", "distill", "sft"),  # sft: the reference completions when there is no task
    "rrhf": ("rrhf",),
    "tpo": ("rl", "tpo"),
}
METHODS = tuple(METHOD_BLOCKS)


def task_config() -> ml_collections.ConfigDict:
  """Where problems come from (align/tasks): 'arithmetic' generates them, 'jsonl' reads
  {"prompt", "answer"[, "solution"]} records, 'package.module:function' is a factory called with
  this block; '' means no task (the methods read their own JSONL files)."""
  c = ml_collections.ConfigDict()
  c.name = ""
  c.path = ""  # jsonl: comma-separated train files
  c.eval_path = ""  # jsonl: held-out files ('': the last eval_size records of path)
  c.answer_pattern = ""  # jsonl: a regex with one group ('': an Answer: line, else #### N, else the last number)
  c.difficulty = 2  # arithmetic: digits per operand
  c.train_size = 4000  # problems of the train split (at most: a file may hold fewer)
  c.eval_size = 200  # held-out problems / pairs
  c.seed = 0
  c.accuracy_problems = 0  # >0: exact-match accuracy of greedy answers on that many held-out problems
  c.accuracy_tokens = 64  # the generation budget for those answers
  c.sampled_samples = 0  # >0: also score that many temperature-`sampled_temperature` samples per problem
  c.sampled_temperature = 1.0  #   (mean reward of one sample, and pass@k: what the online methods optimize)
  c.measure_kl = False  # also report KL(policy || the init_from policy) on those problems' prompts
  c.score_every = 0  # >0: those scores also every N steps, as eval_<score> metrics (curves against step and wall)
  c.score_at_start = True  # also before the first step (False: runs from one start, scored there once)
  return c


def sft_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train_path = ""  # JSONL: {"prompt", "completion"} or {"messages": [...]}
  c.eval_path = ""
  c.template = "plain"  # align/chat.py: chatml, llama3, gemma, plain (for 'messages' records)
  c.on_error = "raise"  # a malformed JSONL line: 'raise' or 'skip'
  return c


def dpo_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train_path = ""  # JSONL: {"prompt", "chosen", "rejected", "margin" (optional)}
  c.eval_path = ""
  c.on_error = "raise"
  c.loss_type = "sigmoid"  # sigmoid (DPO; cDPO with label_smoothing), robust, ipo, hinge, simpo, orpo
  c.beta = 0.1
  c.label_smoothing = 0.0
  c.gamma = 0.5  # SimPO's target margin
  c.sft_coef = 0.0  # RPO: + sft_coef * per-token NLL of the chosen completions (0: plain DPO)
  c.pairs = "data"  # 'data': the task's or the JSONL pairs; 'ai_feedback': the starting policy's samples, judged
  c.ai_feedback_samples = 4  # completions per prompt
  c.ai_feedback_temperature = 1.0
  return c


def reward_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.use_margin = False  # subtract each pair's "margin" (Llama 2)
  c.center_coef = 0.0  # reward centering: + center_coef * mean((r_c + r_r)^2)
  return c


def rl_config() -> ml_collections.ConfigDict:
  """What every method that learns from its own samples shares (align/online.py)."""
  c = ml_collections.ConfigDict()
  c.prompts_path = ""  # JSONL {"prompt"} when config.task.name is ''
  c.on_error = "raise"
  c.prompts_per_iteration = 32  # prompts sampled per iteration (a PPO rollout batch, a ReST Grow)
  c.samples_per_prompt = 1  # G of GRPO/RLOO, N of ReST / best-of-N
  c.max_new_tokens = 64
  c.temperature = 1.0  # sampling temperature; the losses' log-probs use the same one
  c.reward = "exact"  # a verifier of the task ('exact'; arithmetic adds 'digits', 'solution'), or 'model' (rl.reward_model)
  c.reward_model = ""  # a reward-model run's workdir, for reward='model'
  c.missing_eos_penalty = 0.0  # subtracted from the score of a sample that never ended
  c.epochs = 1  # passes over each iteration's samples (PPO's epochs of minibatches)
  c.shuffle_rewards = False  # a control (PPO, GRPO/RLOO): permute the scores across each iteration's samples
  return c


def ppo_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.value = "head"  # 'head': a scalar head on the policy's features; 'model': a separate decoder with a head
  c.value_init = ""  # value='model': '' (a copy of the starting policy) or a reward-model run (InstructGPT)
  c.gamma = 1.0
  c.lam = 0.95
  c.clip = 0.2  # the ratio's clip range
  c.value_clip = 0.2
  c.vf_coef = 0.1
  c.kl_coef = 0.05  # per-token KL penalty in the reward
  c.kl_estimator = "k1"  # 'k1' or 'k3'
  c.adaptive_kl = False  # Ziegler et al.'s controller toward target_kl over kl_horizon samples
  c.target_kl = 6.0
  c.kl_horizon = 10_000
  return c


def grpo_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.advantage = "grpo"  # 'grpo' (group-normalized) or 'rloo' (leave-one-out baseline)
  c.normalize = "std"  # grpo: 'std' or 'none' (Dr. GRPO)
  c.clip_low = 0.2
  c.clip_high = 0.2  # > clip_low: DAPO's clip-higher
  c.kl_coef = 0.0  # > 0: + kl_coef * k3 KL to the frozen reference, per token
  c.aggregation = "sequence_mean"  # 'sequence_mean', 'token_mean' or 'fixed_length'
  # DAPO's dynamic sampling: train only on groups whose rewards differ (the others' advantages are
  # 0), sampling rounds of sampling_prompts prompts (0: rl.prompts_per_iteration) until
  # rl.prompts_per_iteration such groups are found or max_sampling_rounds are spent.
  c.dynamic_sampling = False
  c.sampling_prompts = 0
  c.max_sampling_rounds = 8
  return c


def rest_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "rest"  # 'rest', 'raft', 'rejection_sampling', 'star' or 'self_consistency' (align/rest.py)
  c.thresholds = (0.5, 0.8, 1.0)  # rest: one Improve step per threshold, rising
  c.improve_steps = 10  # trainer steps per Improve step (rest) or per iteration (the others)
  c.improve_epochs = 0.0  # > 0: instead, this many passes over the samples each Improve step kept
  c.keep_fraction = 0.25  # raft: the top fraction of each iteration's samples
  c.min_reward = 1.0  # raft / rejection_sampling / star: a kept sample scores at least this
  c.min_agreement = 0.0  # self_consistency: keep a prompt's paths when its majority has this share of them
  c.star_restart = False  # star: each outer iteration fine-tunes the starting policy on all rationales so far
  c.restart_steps = 40  # star_restart: steps of outer iteration 0 (the paper's 40) ...
  c.restart_growth = 0.2  #   ... growing by this fraction per outer iteration (the paper's 20%)
  return c


def distill_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.teacher = ""  # the teacher's run workdir or Hugging Face directory (same tokenizer)
  c.kind = "forward_kl"  # forward_kl, reverse_kl, jsd, sequence, step_by_step
  c.temperature = 1.0  # token-level: the softening temperature (the loss is scaled by its square)
  c.teacher_temperature = 0.0  # sequence / step_by_step: how the teacher generates (0: greedy)
  c.beta = 0.5  # jsd's mixture weight
  c.on_policy_fraction = 0.0  # token-level: the share of iterations on the student's own samples
  c.rationale_weight = 1.0  # step_by_step: the rationale task's weight
  return c


def rrhf_config() -> ml_collections.ConfigDict:
  """RRHF (align/rrhf.py): a ranking loss over each prompt's scored responses, plus SFT on the best."""
  c = ml_collections.ConfigDict()
  c.source = "data"  # 'data': JSONL or the task's right and wrong completions; 'policy': the starting policy's samples
  c.train_path = ""  # JSONL: {"prompt", "responses": [...], "scores": [...]} when config.task.name is ''
  c.eval_path = ""
  c.on_error = "raise"
  c.responses = 4  # N: responses per row (a prompt with fewer has the rest masked)
  c.sft_weight = 1.0  # the SFT loss on the best-scored response (1 in the paper)
  c.reward = "exact"  # the task's verifier that scores the task's (or the policy's) responses
  c.samples = 4  # source='policy': samples per prompt
  c.temperature = 1.0  # source='policy': their sampling temperature
  c.with_solutions = False  # source='policy': the task's worked solution joins each prompt's responses
  return c


def tpo_config() -> ml_collections.ConfigDict:
  """TPO (align/tpo.py): think, respond, DPO on the best and worst by a judge of the response alone."""
  c = ml_collections.ConfigDict()
  # The paper's generic thought prompt; the response is the completion's text after `marker`.
  c.template = ("Respond to the following user query in a comprehensive and detailed way. You can write down your "
                "thought process before responding. Write your thoughts after \"Here is my thought process:\" and "
                "write your response after \"Here is my response:\".\n\nUser query: {prompt}")
  c.marker = "Here is my response:"
  c.loss_type = "sigmoid"  # the DPO loss (align.losses.DPO_LOSS_TYPES)
  c.beta = 0.1
  c.length_penalty = 0.0  # rho of the paper's length control: rank by z(score) - rho * z(length); 0: off
  return c


BLOCKS = {"sft": sft_config, "dpo": dpo_config, "reward": reward_config, "rl": rl_config, "ppo": ppo_config,
          "grpo": grpo_config, "rest": rest_config, "distill": distill_config, "rrhf": rrhf_config,
          "tpo": tpo_config}


def align_config(method: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The trainer's keys, `method`, `task`, and only the blocks `method` reads (METHOD_BLOCKS)."""
  if method not in METHOD_BLOCKS:
    raise ValueError(f"config.method={method!r} is not one of {METHODS}")
  config = common.train_config(**overrides)
  config.method = method
  config.task = task_config()
  for block in METHOD_BLOCKS[method]:
    config[block] = BLOCKS[block]()
  return config
