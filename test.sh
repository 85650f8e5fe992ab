#!/usr/bin/env bash
# Run the test suite (CPU): set up (first time only), then pytest. Arguments go to pytest.
#   ./test.sh                      everything: what CI runs (.ci/run); 680 tests, about 8 min on 2 CPU cores
#   ./test.sh -m "not slow"        the fast lane: 559 tests in about 30 s; the 121 `slow` ones run a training,
#                                  a pre-training, a study, a subprocess, torchrun or SLURM
#   ./test.sh tests/test_optim.py  one module's tests (tests/test_<module>.py tests src/smallvit/<module>.py)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
