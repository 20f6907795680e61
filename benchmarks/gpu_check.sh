#!/usr/bin/env bash
# The GPU checks of the Pallas flash attention and a train-step MFU in one call, for a 15-minute
# device lease: capped at 4 + 3 + 2.5 = 9.5 minutes by its timeouts (not yet run on a GPU, so its
# real duration is unknown; the benchmarks print as they go, so a capped run still returns what
# it measured):
#   1. the kernel tests compiled on the GPU (Pallas's Triton lowering) against the float64
#      reference, and the model's pallas-vs-xla test;
#   2. benchmarks/attention.py: TFLOP/s of ours, cuDNN and XLA, and ours' error against cuDNN;
#   3. benchmarks/train_mfu.py: the real train step on llama3.2-1b (bf16, cuDNN attention, remat
#      dots), its compile time, step time, tokens/s and MFU.
# Run from the repository root on the GPU machine, whose image has jax, flax, safetensors and
# pytest (nothing is installed); logs go to $OUT when the device tool sets it, else to ./gpu_check.
#   bash benchmarks/gpu_check.sh [extra arguments for benchmarks/attention.py]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 \
  | tee "$out/env.log"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1 | tee -a "$out/env.log"

# -n 0: one process owns the GPU; -p no:cacheprovider: the checkout there may be read-only;
# -k "not tpu": the TPU-interpret-mode tests simulate a TPU on the host and prove nothing here.
timeout 240 python3 -m pytest -q -n 0 -p no:cacheprovider -W "ignore::DeprecationWarning" \
  -k "not tpu" tests/test_flash_attention.py tests/test_attention.py "tests/test_model.py::test_pallas_backend_matches_xla_logits_and_gradients" \
  2>&1 | tee "$out/tests.log"
echo "tests exit status: $?" | tee -a "$out/tests.log"

timeout 180 python3 benchmarks/attention.py "$@" 2>&1 | tee "$out/attention.log"
echo "benchmark exit status: $?" | tee -a "$out/attention.log"

# B=4, not the script's default 8: a rough estimate for llama3.2-1b (1.24B parameters) at T=2048 with
# remat dots is 14 GiB of float32 parameters and Adam moments, 5-9 GiB of gradients, 0.8 MiB per
# token of saved bfloat16 dot outputs (16 layers x ~24k values) and ~1.2 MiB per token around the
# float32 [B*T, 128256] logits (logits, their gradient, a bfloat16 copy): ~55 GiB at B=8, within a
# few GiB of the ~59 GiB that JAX's allocator takes by default (75%) of an 80 GB H100; ~39 GiB at B=4.
# It prints the compiled program's memory_analysis before stepping. About 1-2 minutes expected
# (mostly model init and compilation; a step is ~67 TFLOP at B=4).
timeout 150 python3 benchmarks/train_mfu.py --batch=4 2>&1 | tee "$out/train_mfu.log"
echo "train_mfu exit status: $?" | tee -a "$out/train_mfu.log"
