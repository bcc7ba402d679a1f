#!/usr/bin/env bash
# The one prepared call of a lent GPU machine, from the repository root of a fresh GPU machine:
#
#   bash scripts/gpu_session.sh [--budget-s 480] [--rehearse] [--stages ...]
#
# installs the package with the CUDA extension for sm_90, runs the CMake ctest, the headline benchmark sweep,
# the kernel tests natively and the Llama-3-8B training step, each stage inside a time budget it prints, and
# scores the results against the performance goals (scripts/performance_goals.py). Writes at most 8 files to $OUT
# (default runs/gpu-session/), a short table last. Without a GPU the GPU stages are skipped with the reason.
# See benchmarks/README.md, "GPU session".
# Environment: OUT, PYTHON (default python3), ABFT_COMMIT (the commit; it wins over a copied .git, which may be stale).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu-session}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# This checkout's benchmarks package, whether or not the project is installed yet (on a fresh machine the install
# stage installs it) and ahead of any other installed copy.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"${PYTHON:-python3}" scripts/gpu_session.py --out "$out" --python "${PYTHON:-python3}" "$@" 2>&1 | tee "$out/session.log"
exit "${PIPESTATUS[0]}"
