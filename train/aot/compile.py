"""Lower and compile a job's jitted programs for a TPU topology, and measure them (train/aot/report.py).

A job is one or more programs (the train step; for GRPO the train step and the rollout's decode
step; for decoding, prefill and one decode step). Each is a `Program`: a jitted function, its
abstract arguments, which of them are which category of memory, and the model flops it does. The
job's report takes the largest HBM need among its programs (they run one after another, each
with its own temporaries, over the same resident arguments) and sums their time and flops.
"""

import contextlib
import dataclasses
import functools
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

import model as model_lib
from model import sharding
from train import losses, trainer
from train.aot import abstract, report, topology as topology_lib


@dataclasses.dataclass
class Program:
  """One jitted program: `lower()` gives (its jax Lowered, {memory category: the abstract arrays of
  it among the arguments}); infer.aot.Lowerable is one too."""
  name: str
  lower: Callable[[], tuple[Any, dict[str, Any]]]
  model_flops: float  # the model's own flops in one call, all devices
  tokens: int  # tokens one call processes
  repeats: int = 1  # calls per step of the job (a rollout's decode step: once per new token)
  on_compiled: Callable[[Any], None] | None = None  # given the compiled executable (a later program may need it)


@dataclasses.dataclass
class Compiled:
  program: Program
  compiled: Any
  seconds: float
  hlo: str  # the optimized HLO module's text ('' when the compiler wrote none)
  memory_parts: dict[str, Any]  # category -> abstract arrays among the arguments
  oom_temporaries: int | None = None  # the compiler refused: the temporaries it needed (bytes)


@contextlib.contextmanager
def _no_persistent_cache():
  """Compile-only TPU executables cannot be read back from jax's persistent compilation cache (it
  needs a TPU client): keep them out of it. Whether the cache is used is settled once per process,
  so where it is on (the test suite's), nothing is written: no compile is slow enough to be."""
  min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e12)
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


def compile_program(program: Program, mesh, rules) -> Compiled:
  """Lowers and compiles `program`; its optimized HLO text is read from an XLA dump (a
  compile-only TPU executable cannot print its own: `as_text()` fails on async collectives)."""
  with tempfile.TemporaryDirectory(prefix="aot-hlo-") as dump, _no_persistent_cache():
    start = time.perf_counter()
    with sharding.axis_rules(mesh, rules):
      lowered, parts = program.lower()
      try:
        compiled = lowered.compile(
            compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True, "xla_dump_hlo_as_proto": False})
      except jax.errors.JaxRuntimeError as e:
        needed = report.hbm_oom_temporaries(str(e))
        if needed is None:
          raise
        return Compiled(program, None, time.perf_counter() - start, "", parts, oom_temporaries=needed)
    seconds = time.perf_counter() - start
    if program.on_compiled is not None:
      program.on_compiled(compiled)
    texts = sorted(Path(dump).glob("*after_optimizations.txt"), key=lambda p: p.stat().st_size)
    hlo = texts[-1].read_text() if texts else ""
  return Compiled(program, compiled, seconds, hlo, parts)


def measure(job: str, topology: topology_lib.Topology, mesh, programs: list[Compiled]) -> report.Report:
  """The job's report: the largest memory need among its programs (each one's kept too), their
  summed flops and time."""
  needs = []
  for c in programs:
    parts = {name: report.shard_bytes(arrays) for name, arrays in c.memory_parts.items()}
    if c.compiled is None:  # refused for memory: what we know, and the temporaries it asked for
      memory = {**parts, "temporaries": c.oom_temporaries}
    else:
      memory = report.memory(c.compiled, parts)
    needs.append((sum(memory.values()), memory))
  hbm, memory = max(needs, key=lambda x: x[0])
  by_program = {c.program.name: m for c, (_, m) in zip(programs, needs)}
  xla_flops, seconds, program_seconds = 0.0, 0.0, {}
  for c in programs:
    f, s = report.cost(c.compiled, topology.chip) if c.compiled is not None else (0.0, 0.0)
    f *= len(mesh.devices.flat) * c.program.repeats  # cost_analysis counts one device's program
    s *= c.program.repeats
    xla_flops, seconds = xla_flops + f, seconds + s
    # XLA counts a loop body (the layers' scan) once and a custom call (a Pallas kernel) not at all:
    # each program's time is scaled by its own shortfall, since a memory-bound decode step and a
    # compute-bound train step are priced differently.
    program_seconds[c.program.name] = s * max(1.0, c.program.model_flops * c.program.repeats / f) if f else 0.0
  model_flops = sum(c.program.model_flops * c.program.repeats for c in programs)
  estimated = sum(program_seconds.values())
  peak = topology.chip.peak_bf16_flops * topology.num_chips
  return report.Report(
      job=job, topology=topology.name, chip=topology.libtpu_name, num_devices=topology.num_chips,
      num_hosts=topology.num_hosts, mesh=dict(mesh.shape), hbm_capacity_bytes=topology.chip.hbm_bytes,
      memory=memory, hbm_per_device_bytes=int(hbm), flops_per_step=xla_flops, model_flops_per_step=model_flops,
      tokens_per_step=sum(c.program.tokens * c.program.repeats for c in programs), estimated_step_seconds=estimated,
      estimated_mfu=model_flops / (estimated * peak) if estimated > 0 else 0.0, xla_optimal_seconds=seconds,
      compile_seconds=sum(c.seconds for c in programs),
      collectives=report.collectives("\n".join(c.hlo for c in programs)),  # read line by line: summed
      programs=[c.program.name for c in programs], program_memory=by_program,
      program_seconds=program_seconds,
  )


def train_flops(model_config: model_lib.ModelConfig, batch_size: int, seq_len: int) -> float:
  """Model flops of one train step over [B, T] tokens (model.flops_per_token: 6N + attention, the
  PaLM convention MFU figures use; adapters-only training skips some weight gradients, not counted)."""
  return model_lib.flops_per_token(model_config, seq_len) * batch_size * seq_len


def train_program(config: ml_collections.ConfigDict, devices, *, loss_fn: Callable | None = None,
                  make_module=None, decoder_path: str = "", batch_fn: Callable | None = None,
                  name: str = "train step") -> tuple[Program, abstract.AbstractRun]:
  """The trainer's jitted train step (trainer.jit_train_step, as every run compiles it) over the
  abstract state of `config` on `devices`. A method passes its loss, module and batch maker
  (batch_fn(config, mesh, rules) -> abstract batch)."""
  run = abstract.build(config, devices, make_module=make_module, decoder_path=decoder_path)
  loss_fn = loss_fn or functools.partial(losses.next_token_loss, z_loss=config.z_loss)
  jitted = trainer.jit_train_step(run.graphdef, loss_fn, run.optimizer, run.schedule, config, run.state_shardings)
  batch = (batch_fn or abstract.batch)(config, run.mesh, run.rules)
  parts = {"parameters": run.state["params"],
           "optimizer state": run.state["opt_state"],
           "frozen weights": run.rest,
           "batch": batch}
  tokens = config.batch_size * config.seq_len
  program = Program(name=name, lower=lambda: (jitted.lower(run.state, run.rest, batch), parts),
                    model_flops=train_flops(run.model_config, config.batch_size, config.seq_len), tokens=tokens)
  return program, run


def fsdp_replicated_params(compiled: Any, run: abstract.AbstractRun) -> list[str]:
  """Paths of the compiled train step's parameters and optimizer moments that are not split over
  the fsdp axis (read from the compiled program's input shardings); [] when fsdp is 1."""
  if run.mesh.shape["fsdp"] == 1:
    return []
  state_shardings = compiled.input_shardings[0][0]
  out = []
  flat, _ = jax.tree_util.tree_flatten_with_path({k: state_shardings[k] for k in ("params", "opt_state")})
  shapes = jax.tree.leaves({k: run.state[k] for k in ("params", "opt_state")})
  for (path, placed), shape in zip(flat, shapes):
    if not shape.shape:  # a counter
      continue
    spec = placed.spec
    axes = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
    if "fsdp" not in axes:
      out.append(jax.tree_util.keystr(path))
  return out
