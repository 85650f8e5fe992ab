#!/usr/bin/env bash
# Create .venv with pip if missing and install smallvit into it (idempotent). Sourced by run.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SMALLVIT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# A stamp of pyproject.toml's hash: reinstall only when the project's dependencies change.
STAMP="$VENV/.smallvit-installed"
WANT="$(sha1sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! "$VENV/bin/python" -c "import smallvit" 2>/dev/null; then
  echo "installing smallvit and its dependencies into $VENV (torch takes a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
  # torch/torchvision first, pinned to the newest versions this project is tested with.
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v -i warning || true
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" 2>&1 | grep -v -i warning || true
  "$VENV/bin/python" -c "import smallvit, torch, timm" || { echo "installation failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
