#!/usr/bin/env bash
# Multi-node launch with the DeepSpeed launcher (pdsh/ssh to every host of a hostfile):
#
#   bash launch_scripts/deepspeed_launcher.sh HOSTFILE RECIPE.yaml [a.b.c=value ...]
#
# HOSTFILE has one "hostname slots=N" line per node (N processes, one per GPU); inside a SLURM allocation,
# `write_hostfile` below makes it from the allocation: HOSTFILE=auto. The launcher sets RANK, LOCAL_RANK,
# WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process. Resumes from `latest` when there is one.
# Variables: GPUS_PER_NODE (slots per host for HOSTFILE=auto, default 8), MASTER_ADDR (default: the hostfile's
# first host), MASTER_PORT (default 29500),
# DS_LAUNCHER_ARGS (extra launcher flags, e.g. "--no_ssh_check --launcher openmpi").
set -euo pipefail
HOSTFILE="${1:?usage: deepspeed_launcher.sh HOSTFILE|auto RECIPE.yaml [overrides]}"
RECIPE="${2:?usage: deepspeed_launcher.sh HOSTFILE|auto RECIPE.yaml [overrides]}"
shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ "$HOSTFILE" == auto ]]; then
    HOSTFILE="$(mktemp)"
    scontrol show hostnames "${SLURM_JOB_NODELIST:?HOSTFILE=auto needs a SLURM allocation}" \
        | sed "s/\$/ slots=${GPUS_PER_NODE:-8}/" > "$HOSTFILE"
fi
[[ -f "$HOSTFILE" ]] || { echo "hostfile not found: $HOSTFILE" >&2; exit 2; }
# Rendezvous on the first host (the launcher would otherwise ssh to it to ask for its address).
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
# --no_local_rank: the recipe reads LOCAL_RANK from the environment and takes no --local_rank argument.
# shellcheck disable=SC2086  # DS_LAUNCHER_ARGS is a list of flags
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank ${DS_LAUNCHER_ARGS:-} \
    --module recipes.pretrain --config "$RECIPE" checkpoint.resume=auto "$@"
