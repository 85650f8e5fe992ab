#!/usr/bin/env bash
# The main job: set up (first time only), then the CPU speed run (the `speedrun` preset) on CIFAR-10: a plain ViT
# trained for under 10 minutes on 2 cores; prints its test accuracy.
# Extra arguments go to `smallvit train`, e.g. ./run.sh --preset baseline  or  ./run.sh --set train.epochs=2 (still the
# speedrun preset: without --preset, ./run.sh adds --preset speedrun)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
# Data: $SMALLVIT_DATA, else ./data (downloaded there when missing and the network allows); a copy of the
# official files in ../shared/data is used when ./data has none.
if [ -z "${SMALLVIT_DATA:-}" ] && [ ! -f data/cifar-10-batches-py/test_batch ] && [ -f ../shared/data/cifar-10-batches-py/test_batch ]; then
  export SMALLVIT_DATA="$ROOT/../shared/data"
fi
case " $* " in *" --preset "*|*" --preset="*) ;; *) set -- --preset speedrun "$@";; esac  # the main job's preset
OUT_ARGS=()
case " $* " in *" --out "*|*" --out="*) ;; *) OUT_ARGS=(--out "runs/main-$(date +%Y%m%d-%H%M%S)");; esac
exec smallvit train "${OUT_ARGS[@]}" "$@"
