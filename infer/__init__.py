"""Inference: KV-cache generation and sampling, speculative sampling, test-time scaling.

Public API: generate, stream, Sampling, Generation, speculative_generate (a draft model or PromptLookup), best_of_n,
self_consistency, BudgetForcing (a decode-loop Controller: `generate(..., controller=BudgetForcing(...))`);
the serving engine: Engine, EngineConfig, SamplingParams, RequestOutput, CompletionOutput (infer/engine.py).
"""

from infer.decoding import Generation, generate, stream
from infer.engine import CompletionOutput, Engine, EngineConfig, QueueFull, RequestOutput
from infer.prompt_lookup import PromptLookup
from infer.sampling_params import SamplingParams
from infer.sampling import Sampling
from infer.speculative import speculative_generate
from infer.test_time import BestOfN, BudgetForcing, SelfConsistency, best_of_n, self_consistency

__all__ = [
    "BestOfN", "BudgetForcing", "CompletionOutput", "Engine", "EngineConfig", "Generation", "PromptLookup", "QueueFull",
    "RequestOutput", "Sampling", "SamplingParams", "SelfConsistency", "best_of_n", "generate",
    "self_consistency", "speculative_generate", "stream",
]
