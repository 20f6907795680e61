"""Inference: KV-cache generation and sampling, speculative sampling, test-time scaling.

Public API: generate, stream, Sampling, Generation, speculative_generate, best_of_n,
self_consistency, BudgetForcing, budget_forcing_generate.
"""

from infer.generate import Generation, generate, stream
from infer.sampling import Sampling

__all__ = ["Generation", "Sampling", "generate", "stream"]
