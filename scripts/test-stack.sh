#!/usr/bin/env bash
# Run the suite on a stack other than requirements.lock, in a throwaway virtual environment.
#   bash scripts/test-stack.sh gpu-machine [pytest args]  # Python 3.12 + constraints/gpu-machine.txt, no submitit
#   bash scripts/test-stack.sh timm-lower [pytest args]   # the lock with timm at its lower bound (constraints/)
#   bash scripts/test-stack.sh timm-lower-quick           # only timm 1.0.28 laid over .venv (no new venv, ~30 MB):
#                                                         # the models, local-dir export and Muon tests
# gpu-machine downloads a CUDA torch (several GB): run it where that is cheap. SMALLVIT_STACK_VENV keeps the venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${1:?gpu-machine | timm-lower | timm-lower-quick}"
shift
cd "$ROOT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if [ "$STACK" = timm-lower-quick ]; then
  OVER="$(mktemp -d)"
  trap 'rm -rf "$OVER"' EXIT
  "${PYTHON:-.venv/bin/python}" -m pip install -q --no-deps --target "$OVER" -r constraints/timm-lower.txt
  PYTHONPATH="$ROOT/src:$OVER" "${PYTHON:-.venv/bin/python}" -c "import timm; print('timm', timm.__version__)"
  PYTHONPATH="$ROOT/src:$OVER" exec "${PYTHON:-.venv/bin/python}" -m pytest -q tests/test_backbones.py \
    tests/test_optim.py tests/test_sync_census.py tests/test_model.py tests/test_pretrained.py tests/test_export.py \
    "$@"
fi
VENV="${SMALLVIT_STACK_VENV:-$(mktemp -d)/venv}"
case "$STACK" in
  gpu-machine)
    python3.12 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -c constraints/gpu-machine.txt -e ".[test]"
    "$VENV/bin/python" -m pip uninstall -q -y submitit ;;  # the machine has none: those tests must skip, not fail
  timm-lower)
    "${PYTHON:-python3}" -m venv "$VENV"
    grep -v '^timm==' requirements.lock > "$VENV/lock-without-timm.txt"
    "$VENV/bin/python" -m pip install -q -r "$VENV/lock-without-timm.txt" -r constraints/timm-lower.txt
    "$VENV/bin/python" -m pip install -q --no-deps -e . ;;
  *) echo "unknown stack $STACK" >&2; exit 2 ;;
esac
"$VENV/bin/python" -c "import sys, torch, torchvision, timm, numpy; print(sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__)"
exec "$VENV/bin/python" -m pytest -q "$@"
