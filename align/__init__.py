"""Alignment on the one trainer of train/: each method is a loss, a data step and a config.

Offline: SFT (`align.sft`), reward models (`align.reward_model`), the DPO family with IPO, robust
DPO, cDPO, SimPO, ORPO and RPO (`align.dpo`), AI feedback as a pair source (`align.ai_feedback`), RRHF's
ranking of several scored responses per prompt (`align.rrhf`).
Online, learning from the policy's own samples drawn with infer/ on the training mesh: PPO
(`align.ppo`), GRPO and RLOO (`align.grpo`), ReST, RAFT, rejection-sampling fine-tuning and STaR
(`align.rest`), TPO's iterated DPO on thought + response samples judged by their response
(`align.tpo`), distillation from a teacher's logits or generations (`align.distill`).

Each method is an `align.method.Method` (its loss, its data, its checks), listed in
`align.registry.METHODS`; problems, answers and rewards come from a task (`align.tasks`: the
arithmetic task, JSONL problems, or a Python factory).

Public API: `align.losses` (dpo_loss, reward_loss, simpo_loss, orpo_loss, rrhf_loss), `align.rl_losses`
(GAE, whitening, KL estimators, clipped objectives, GRPO/RLOO advantages, aggregation),
`align.distill_losses` (forward/reverse KL, generalized JSD), `align.run.run(config, workdir)` and
`align.run.setup(config, workdir)`, `align.tasks.get_task`, `align.method.Method`.
"""
