#!/usr/bin/env bash
# Data-parallel training across machines, launched the torchrun way: on each node, one process
# per GPU, each told its place by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
# MASTER_PORT) — what `torchrun --nnodes N --nproc-per-node G` gives its workers. Rank 0 listens
# on MASTER_ADDR:MASTER_PORT; the others connect to it; gradients are averaged every step.
#
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=node0 MASTER_PORT=29500 \
#     deploy/launch-node.sh pipelines/pretrain.toml [more `minimind-v train` options]
#
# Run it on every node with that node's NODE_RANK (under Slurm: srun --ntasks-per-node=1, with
# NODE_RANK=$SLURM_NODEID). Each process takes GPU LOCAL_RANK (`--device cuda`); DEVICE=cpu runs
# on CPUs instead. Shards, `out` and the pipeline's paths must be the same on every node (a
# shared filesystem); only rank 0 writes. Any process failing stops this node's launcher with
# its status; the other ranks then stop at their next exchange.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the host of rank 0}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
nproc=${NPROC_PER_NODE:-1}
pids=()
for ((local = 0; local < nproc; local++)); do
    RANK=$((NODE_RANK * nproc + local)) WORLD_SIZE=$((NNODES * nproc)) LOCAL_RANK=$local \
        MASTER_ADDR=$MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500} \
        "${MINIMIND_V:-minimind-v}" train "$@" --device "${DEVICE:-cuda}" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
exit "$status"
