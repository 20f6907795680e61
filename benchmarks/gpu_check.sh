#!/usr/bin/env bash
# The GPU checks of the Pallas flash attention in one call, for a 15-minute device lease: capped at
# 4 + 5.5 minutes by its timeouts (not yet run on a GPU, so its real duration is unknown; the
# benchmark prints each row as it goes, so a capped run still returns what it measured):
#   1. the kernel tests compiled on the GPU (Pallas's Triton lowering) against the float64
#      reference, and the model's pallas-vs-xla test;
#   2. benchmarks/attention.py: TFLOP/s of ours, cuDNN and XLA, and ours' error against cuDNN.
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

timeout 330 python3 benchmarks/attention.py "$@" 2>&1 | tee "$out/attention.log"
echo "benchmark exit status: $?" | tee -a "$out/attention.log"
