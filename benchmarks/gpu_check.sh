#!/usr/bin/env bash
# The GPU checks of the augmentation and GPU-speed issues in one command, for a session with a lent GPU machine
# (docs/gpu.md, "On a lent GPU machine"). Needs torch, torchvision and timm there; smallvit runs from src/.
#
#   bash benchmarks/gpu_check.sh DATA_DIR OUT_DIR [step|recipe|all]
#
# step (about 5 minutes on an H100, an estimate; no dataset needed): step throughput of smallvit (eager, compiled,
# CUDA graphs) against the standard stack, then the DINO recipe's pretrain step rate (`pretrain` preset, batch 512,
# 10 views: its GPU cost measured, not estimated), then augmentation throughput and its share of the step. recipe: the full
# baseline recipe with time to 90 / 93 / 93.5 % (stopped cleanly after RECIPE_SECONDS, default 540; run it again to
# resume where it stopped).
#
# SMOKE=1 runs every command at toy size on the CPU (about 4 minutes on 2 cores), to check the script without a GPU.
set -uo pipefail
DATA="${1:?folder holding cifar-10-batches-py}"
OUT="${2:?folder for the result tables}"
WHAT="${3:-all}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # the scripts find src/ themselves too
PY="${PYTHON:-python3}"  # on the lent machines, python3 is the interpreter that holds torch
mkdir -p "$OUT"
if [[ ${SMOKE:-0} == 1 ]]; then
  DEV=cpu; AUG=(--steps 4 --pil-images 200 --loader-workers 2); TRAIN=(--presets quick --warmup 4 --steps 4 --batch 128)
  STEP=(--quick --workers 2); RECIPE=(--set model.embed_dim=32 model.depth=2 model.num_heads=2 data.subset=512
    data.test_subset=256 train.epochs=2 optim.warmup_epochs=1 train.batch_size=64 train.progress=false --targets 10)
  PRE=(--batch 32 --steps 3 --set model.embed_dim=32 model.depth=2 model.num_heads=2 ssl.local_crops=2)
else
  DEV=cuda; AUG=(--pil-images 2000 --loader-workers 8); TRAIN=(--presets baseline --warmup 32 --steps 64)
  STEP=(--standard-precision fp32 bf16 --warmup 16 --steps 96); RECIPE=()  # whole 16-step augmentation chunks
  PRE=(--steps 30)  # the pretrain preset at its batch 512; the first step (and the k-NN monitor) is not timed
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || echo "no nvidia-smi"; } | tee "$OUT/device.txt"
"$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'timm', timm.__version__)" | tee -a "$OUT/device.txt"
status=0
if [[ $WHAT == step || $WHAT == all ]]; then
  # The main table first; it writes each row as it finishes, so a command cut short keeps what it measured.
  # No dataset needed: without CIFAR-10 in DATA the step benchmarks use random images (the same work per image).
  "$PY" benchmarks/bench_gpu.py --device "$DEV" --compile --compile-modes default reduce-overhead "${STEP[@]}" \
    --data-dir "$DATA" --out "$OUT/gpu_step.md" || status=1
  # The DINO recipe's step rate (random images without CIFAR-10 in DATA): one row, its GPU-hours for 200 epochs.
  "$PY" benchmarks/bench_pretrain.py --only pretrain --data-dir "$DATA" "${PRE[@]}" --out "$OUT/pretrain_gpu.md" \
    || status=1
  # On CUDA, 16 steps per augmentation call at batch 256 (aug.chunk_images auto = 4096): whole chunks only.
  "$PY" benchmarks/bench_train.py --device "$DEV" "${TRAIN[@]}" --out "$OUT/train_gpu.md" || status=1
  "$PY" benchmarks/bench_augment.py --device "$DEV" --data-dir "$DATA" "${AUG[@]}" --out "$OUT/augment_gpu.md" \
    || status=1
fi
if [[ $WHAT == recipe || $WHAT == all ]]; then
  RUN="${RUN_DIR:-/tmp/smallvit-full-recipe}"
  resume=()
  [[ -f $RUN/checkpoint.pt ]] && resume=(--resume)
  timeout -s TERM "${RECIPE_SECONDS:-540}" "$PY" benchmarks/bench_gpu.py --full-recipe --data-dir "$DATA" \
    --run-dir "$RUN" "${resume[@]}" "${RECIPE[@]}" --out "$OUT/gpu_full.md" || status=1
  cp "$RUN/metrics.jsonl" "$OUT/full_metrics.jsonl" 2>/dev/null
fi
exit $status
