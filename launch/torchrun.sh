#!/usr/bin/env bash
# One node, N ranks: a Seesaw batch job (pipeline-parallel prefill, tensor-parallel decode).
#
#   launch/torchrun.sh 4 --model DIR --input in.jsonl --output out.jsonl --layouts "P4->T4"
#
# Same as `seesaw-mc generate --nproc-per-node 4 ...`. On CPU each rank gets
# OMP_NUM_THREADS = cores / N unless you set it.
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC seesaw-mc-generate-args...}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
exec "$py" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m seesaw_mc generate "$@"
