#!/usr/bin/env bash
# One device-tool call on a lent GPU: compiled-kernel tests + every benchmark, results under $OUT (and printed).
# Usage (device tool): bash benchmarks/gpu_session.sh   (the GPU machine has torch + triton preinstalled)
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1
pip install -q --no-deps -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
# compiled kernels on the GPU (cuda tests + kernel tests that follow kernel_device), then the CPU-tensor kernel tests
python -m pytest tests -q -m "interpret or cuda" 2>&1 | tail -20 | tee "$OUT/gpu-tests.txt"
python benchmarks/run.py penalty --models resnet18 resnet50 --repeats 20 --out "$OUT" 2>&1 | tail -12
python -m pytest benchmarks -q --benchmark-enable --benchmark-json "$OUT/pytest-benchmark-gpu.json" 2>&1 | tail -40
