#!/usr/bin/env bash
# Regenerate requirements.lock: resolve pyproject.toml's ranges (every extra) in a fresh virtual environment and
# freeze the exact versions of every package installed. Run it after changing a dependency; commit the result.
#   bash scripts/lock.sh            # writes requirements.lock
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m venv "$TMP/venv"
PIP="$TMP/venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch/torchvision as setup.sh installs them: the newest versions this project is tested with (a CUDA build that
# also runs on CPU).
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
EXTRAS="$("$TMP/venv/bin/python" -c "import tomllib; d = tomllib.load(open('$ROOT/pyproject.toml', 'rb'));
print(','.join(sorted(d['project'].get('optional-dependencies', {}))))")"
$PIP install -q "$ROOT[$EXTRAS]"
$PIP check
{
  echo "# Exact versions of every package smallvit and its extras ($EXTRAS) install, on Linux x86_64,"
  echo "# Python $("$TMP/venv/bin/python" -c 'import platform; print(platform.python_version())'). Used by scripts/setup.sh (so by run.sh, test.sh and CI)."
  echo "# Regenerate with: bash scripts/lock.sh"
  $PIP freeze --exclude smallvit
} > "$ROOT/requirements.lock.tmp"
mv "$ROOT/requirements.lock.tmp" "$ROOT/requirements.lock"
echo "wrote $ROOT/requirements.lock ($(grep -vc '^#' "$ROOT/requirements.lock") packages)"
