#!/usr/bin/env bash
# One worker of an ingest spread over a scheduler's array of jobs. Every worker runs the same
# pipeline into the same shared `out` directory and writes only its share of the shards
# (`--workers N --worker i`: shards with index % N == i); the last one to finish writes
# manifest.json. A worker that fails or is preempted can simply run again: it resumes, keeping the
# shards it committed.
#
#   deploy/ingest-worker.sh <pipeline.toml> [more `minimind-v ingest` options]
#
# The worker's index comes from Slurm (SLURM_ARRAY_TASK_ID, arrays numbered from 0) or a
# Kubernetes Indexed Job (JOB_COMPLETION_INDEX); the count from WORKERS, else Slurm's
# SLURM_ARRAY_TASK_COUNT. MINIMIND_V names the binary (default: minimind-v on PATH).
set -euo pipefail
pipeline=${1:?usage: ingest-worker.sh <pipeline.toml> [ingest options]}
shift
index=${SLURM_ARRAY_TASK_ID:-${JOB_COMPLETION_INDEX:-}}
workers=${WORKERS:-${SLURM_ARRAY_TASK_COUNT:-}}
if [[ -z $index || -z $workers ]]; then
    echo "ingest-worker.sh: no worker index or count: run it as a Slurm array task or a Kubernetes Indexed Job pod, or set JOB_COMPLETION_INDEX and WORKERS" >&2
    exit 2
fi
exec "${MINIMIND_V:-minimind-v}" ingest "$pipeline" --workers "$workers" --worker "$index" "$@"
