#!/usr/bin/env bash
# The CPU demo, end to end on a fresh machine: bash launch_scripts/demo.sh [a.b.c=value ...]
#   set up the venv -> build Twemoji shards -> train on 2 CPU ranks (ZeRO-3), stop half-way -> resume from the
#   ZeRO checkpoint and finish -> consolidate -> zero-shot evaluation with chance levels.
# Extra arguments are recipe overrides, e.g. model.vision.attention=hier model.text.attention=hier loss.kind=pyramid
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch_scripts/setup_env.sh
set -euo pipefail
export WANDB_MODE="${WANDB_MODE:-offline}"
RUN="${RUN:-runs/demo}"
RECIPE=recipes/configs/demo.yaml
STEPS="$(python -c "from recipes.config import load_config; import sys; print(load_config('$RECIPE', sys.argv[1:]).train.steps)" "$@")"
COMMON=("checkpoint.dir=$RUN/checkpoints" "logging.dir=$RUN" "$@")

echo "== 1/5 demo shards"
python -m data_pipeline.demo_data --out data/demo
rm -rf "$RUN"
echo "== 2/5 train to step $((STEPS / 2)) on 2 CPU ranks (ZeRO-3), then stop"
bash launch_scripts/local.sh 2 "$RECIPE" "${COMMON[@]}" "train.stop_at=$((STEPS / 2))"
echo "== 3/5 resume from the ZeRO checkpoint and finish ($STEPS steps)"
bash launch_scripts/local.sh 2 "$RECIPE" "${COMMON[@]}" checkpoint.resume=latest
echo "== 4/5 consolidate"
python -m recipes.convert --checkpoint "$RUN/checkpoints" --out "$RUN/model"
echo "== 5/5 zero-shot evaluation on the held-out split, from the consolidated folder alone"
python -m recipes.plot "$RUN/metrics.jsonl" --out "$RUN/curves.png"
python -m recipes.evaluate --model "$RUN/model" --data "data/demo/eval-{0000..0001}.tar" --json "$RUN/eval.json"
