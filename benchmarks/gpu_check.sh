#!/usr/bin/env bash
# One GPU check of billm: the CUDA tests, SmolLM2 quantized on CUDA and evaluated in fp16 and bf16,
# and the kernels timed at LLaMA-7B shapes against cuBLAS fp16, as one JSON file (docs/gpu.md).
#
#   bash benchmarks/gpu_check.sh [OUT.json]           # one CUDA GPU, under 8 minutes;
#                                                     # default docs/results/gpu/gpu_check.json
#   bash benchmarks/gpu_check.sh --cpu-smoke OUTDIR   # every step at toy size on the CPU (tests/test_gpu_check.py)
#
# Exit status 0 when every step passed. The steps live in benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's billm, installed or not
case " $* " in
  *" --cpu-smoke "*) ;;
  *) unset TRITON_INTERPRET ;;  # on the GPU the Triton kernels compile; the interpreter is for CPU runs
esac
exec python benchmarks/gpu_check.py "$@"
