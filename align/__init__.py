"""Alignment: SFT, reward models, the DPO family, AI feedback (and, later, RL) on the one trainer.

Public API so far: the module `align.losses` (dpo_loss, reward_loss, simpo_loss, orpo_loss).
"""
