#!/usr/bin/env bash
# Several nodes: run this same command on every node (c10d rendezvous, no fixed node ranks).
#
#   MASTER_ADDR=10.0.0.1 NNODES=2 NPROC=4 launch/torchrun_multinode.sh \
#       --model DIR --input in.jsonl --output out.jsonl --layouts "D2P4->D2T4"
#
#   MASTER_ADDR   address of the node that hosts the rendezvous, reachable from every node
#   MASTER_PORT   its port (default 29500)
#   NNODES        number of nodes;  NPROC: ranks per node (default: GPUs, or 1 on CPU)
#   RDZV_ID       job id shared by the nodes (default: a hash of MASTER_ADDR:MASTER_PORT)
#   NODE_RANK     optional; 0 marks the node that hosts the rendezvous (when hostnames do not resolve)
#   LOCAL_ADDR    optional; this node's address as the others reach it (when its hostname does not resolve)
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME   the interface to use between nodes (e.g. eth1), when the
#                 default route is not the one the nodes share
# Seesaw switching needs each DP replica's ranks on one node (the host KV tier is node-local
# shared memory): with NPROC ranks per node use tp*pp <= NPROC, e.g. D2P4->D2T4 on 2 x 4.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the rendezvous node}"
: "${NNODES:?set NNODES to the number of nodes}"
port=${MASTER_PORT:-29500}
if [[ -n "${NPROC:-}" ]]; then
    nproc=$NPROC
else
    nproc=$("$py" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
rdzv_id=${RDZV_ID:-}
if [[ -z "$rdzv_id" ]]; then
    rdzv_id=seesaw-$(echo "$MASTER_ADDR:$port" | cksum | cut -d" " -f1)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
# The node that hosts the rendezvous store is found by matching MASTER_ADDR to its hostname;
# where names do not resolve (containers, network namespaces) set NODE_RANK=0 on that node.
conf=()
if [[ -n "${LOCAL_ADDR:-}" ]]; then conf+=(--local-addr "$LOCAL_ADDR"); fi
if [[ -n "${NODE_RANK:-}" ]]; then
    if [[ "$NODE_RANK" == 0 ]]; then conf+=(--rdzv-conf is_host=1); else conf+=(--rdzv-conf is_host=0); fi
fi
exec "$py" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$port" --rdzv-id "$rdzv_id" "${conf[@]}" \
    -m seesaw_mc generate "$@"
