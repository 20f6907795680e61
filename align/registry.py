"""Every method of align/, by config.method's name: the one registry."""

from align import distill, dpo, grpo, ppo, rest, reward_model, rrhf, sft, tpo
from align.method import Method

METHODS: dict[str, Method] = {m.name: m for m in (
    sft.METHOD, dpo.METHOD, reward_model.METHOD, ppo.METHOD, grpo.METHOD, rest.METHOD, distill.METHOD,
    rrhf.METHOD, tpo.METHOD)}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is not one of {sorted(METHODS)}")
  return METHODS[name]
