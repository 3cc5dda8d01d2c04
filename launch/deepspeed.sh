#!/usr/bin/env bash
# The deepspeed launcher: one node with N ranks, or several nodes from a hostfile.
#
#   launch/deepspeed.sh 2 --model DIR --input in.jsonl --output out.jsonl --layouts "P2->T2"
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh 4 --model DIR ... --layouts "D2P4->D2T4"
#
# N is --num_gpus (ranks per node). The launcher sets RANK, LOCAL_RANK, WORLD_SIZE,
# MASTER_ADDR/PORT, LOCAL_SIZE and CROSS_RANK, which seesaw-mc reads like torchrun's variables.
# On CPU: the launcher does not divide the cores between ranks, so OMP_NUM_THREADS is set here
# (cores / N); LOCAL_SIZE is what DeepSpeed's shared-memory all-reduce needs (--allreduce auto
# picks it when a TP group spans the whole job on one host). Multi-node runs need passwordless
# ssh to every host in the hostfile (pdsh), like any deepspeed job.
set -euo pipefail
nproc=${1:?usage: launch/deepspeed.sh NPROC_PER_NODE seesaw-mc-generate-args...}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
ds=${DEEPSPEED:-$here/.venv/bin/deepspeed}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
hostfile=()
if [[ -n "${HOSTFILE:-}" ]]; then hostfile=(--hostfile "$HOSTFILE"); fi
exec "$ds" "${hostfile[@]}" --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module seesaw_mc generate "$@"
