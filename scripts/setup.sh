#!/usr/bin/env bash
# Create .venv with pip if missing and install smallvit into it (idempotent). Sourced by run.sh and test.sh.
# By default every package comes at the exact version of requirements.lock (regenerate: bash scripts/lock.sh);
# SMALLVIT_UNLOCKED=1 resolves pyproject.toml's ranges instead, as `pip install smallvit` does.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SMALLVIT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
LOCK="$ROOT/requirements.lock"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# A stamp of what was installed: reinstall only when the dependencies, the lock or the mode change.
STAMP="$VENV/.smallvit-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$LOCK" 2>/dev/null | sha1sum | cut -d' ' -f1)-${SMALLVIT_UNLOCKED:-0}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! "$VENV/bin/python" -c "import smallvit" 2>/dev/null; then
  export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1  # quiet as root; pip errors still stop here
  PIP="$VENV/bin/python -m pip"
  $PIP install -q --upgrade pip
  if [ "${SMALLVIT_UNLOCKED:-0}" = "1" ] || [ ! -f "$LOCK" ]; then
    echo "installing smallvit with its dependency ranges into $VENV (torch takes a few minutes the first time)"
    # torch/torchvision first, pinned to the newest versions this project is tested with.
    $PIP install -q "torch==2.14.1" "torchvision==0.29.1"
    EXTRAS="$("$VENV/bin/python" -c "import tomllib; d = tomllib.load(open('$ROOT/pyproject.toml', 'rb'));
print(','.join(sorted(d['project'].get('optional-dependencies', {}))))")"
    $PIP install -q -e "$ROOT[$EXTRAS]"
  else
    echo "installing the locked packages (requirements.lock) and smallvit into $VENV (torch takes a few minutes the first time)"
    $PIP install -q -r "$LOCK"
    $PIP install -q --no-deps -e "$ROOT"
  fi
  "$VENV/bin/python" -c "import smallvit, torch, timm" || { echo "installation failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
