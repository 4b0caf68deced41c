#!/usr/bin/env bash
# Single-node launch: bash launch_scripts/local.sh NPROC RECIPE.yaml [a.b.c=value ...]
# One process per GPU (or per CPU rank on a machine without GPUs, gloo backend).
set -euo pipefail
NPROC="${1:?usage: local.sh NPROC RECIPE.yaml [overrides]}"
RECIPE="${2:?usage: local.sh NPROC RECIPE.yaml [overrides]}"
shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
exec torchrun --standalone --nproc_per_node "$NPROC" -m recipes.pretrain --config "$RECIPE" "$@"
