#!/usr/bin/env bash
# Multi-GPU check of IRR (< 10 minutes): single GPU, then DDP and FSDP2 over all visible GPUs.
# Usage: bash benchmarks/gpu_check.sh [--device cpu --size tiny]   (the cpu form is a smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
rm -f benchmarks/results/gpu_check.json
python benchmarks/gpu_check.py --mode single "$@"
if [[ " $* " == *" cpu "* ]]; then n=2; else n=$(python -c "import torch; print(torch.cuda.device_count())"); fi
if (( n >= 2 )); then
  for mode in ddp fsdp2; do
    python -m torch.distributed.run --standalone --nproc_per_node "$n" benchmarks/gpu_check.py --mode "$mode" "$@"
  done
else
  echo "only $n GPU: DDP / FSDP2 runs skipped (they need 2 or more)"
fi
cat benchmarks/results/gpu_check.json
