#!/usr/bin/env bash
# The GPU checks of the augmentation and GPU-speed issues in one command, for a session with a lent GPU machine
# (docs/gpu.md, "On a lent GPU machine"). Needs torch, torchvision and timm there; smallvit runs from src/.
#
#   bash benchmarks/gpu_check.sh DATA_DIR OUT_DIR [step|recipe|all]
#
# step (about 5 minutes on an H100): augmentation throughput and its share of the step, then step throughput of
# smallvit (eager, compiled, CUDA graphs) against the standard stack. recipe: the full baseline recipe with time to
# 90 / 93 / 93.5 % (stopped cleanly after RECIPE_SECONDS, default 540; run it again to resume where it stopped).
set -uo pipefail
DATA="${1:?folder holding cifar-10-batches-py}"
OUT="${2:?folder for the result tables}"
WHAT="${3:-all}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'timm', timm.__version__)" | tee -a "$OUT/device.txt"
status=0
if [[ $WHAT == step || $WHAT == all ]]; then
  python benchmarks/bench_augment.py --device cuda --data-dir "$DATA" --pil-images 2000 --loader-workers 8 \
    --out "$OUT/augment_gpu.md" || status=1
  # 16 steps per augmentation call at batch 256 (aug.chunk_images auto = 4096 on CUDA): whole chunks only.
  python benchmarks/bench_train.py --presets baseline --warmup 32 --steps 64 --out "$OUT/train_gpu.md" || status=1
  python benchmarks/bench_gpu.py --compile --compile-modes default reduce-overhead --standard-precision fp32 bf16 \
    --data-dir "$DATA" --out "$OUT/gpu_step.md" || status=1
fi
if [[ $WHAT == recipe || $WHAT == all ]]; then
  RUN="${RUN_DIR:-/tmp/smallvit-full-recipe}"
  resume=()
  [[ -f $RUN/checkpoint.pt ]] && resume=(--resume)
  timeout -s TERM "${RECIPE_SECONDS:-540}" python benchmarks/bench_gpu.py --full-recipe --data-dir "$DATA" \
    --run-dir "$RUN" "${resume[@]}" --out "$OUT/gpu_full.md" || status=1
  cp "$RUN/metrics.jsonl" "$OUT/full_metrics.jsonl" 2>/dev/null
fi
exit $status
