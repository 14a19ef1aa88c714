#!/usr/bin/env bash
# The GPU figures in one command on a lent GPU machine (docs/benchmarks.md "GPU figures, in one command"):
# with a wheelhouse (`make wheelhouse` -> .whl/, carried beside the working tree) it installs the wheels
# (.whl/run-offline.sh) and runs `python -m bench.gpu_run` within a 9-minute budget; without one, the Python
# on PATH must already have the project's requirements.
# usage (from the project root): bash bench/gpu_run.sh OUT [--budget-s 540] [--dry-run]
set -euo pipefail
OUT=${1:?usage: bash bench/gpu_run.sh OUT [--budget-s 540] [--dry-run]}
shift
if [ ! -d .git ]; then  # a copied working tree: the benchmark copies the repository's tracked files
  git init -q && echo '/.whl/' >> .git/info/exclude && git add -A
  git -c user.name=gpu -c user.email=gpu@localhost commit -qm "working tree"
fi
if [ -f .whl/run-offline.sh ]; then
  exec bash .whl/run-offline.sh python -m bench.gpu_run --out "$OUT" "$@"
fi
exec python -m bench.gpu_run --out "$OUT" "$@"
