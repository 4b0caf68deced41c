#!/usr/bin/env bash
# Set up the environment and run the whole test suite: bash launch_scripts/test.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch_scripts/setup_env.sh
set -euo pipefail
export WANDB_MODE=disabled OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
