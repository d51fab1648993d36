#!/bin/bash
# Multi-host iMAML training on a Cloud TPU pod slice (e.g. v4-32: 4 hosts): one trainer process per host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [trainer flags...]
#   PROJECT=my-project CONFIG=configs/sinusoid.py WORKDIR=/mnt/shared/runs/sinusoid \
#     launch/tpu_pod.sh my-tpu us-central2-b --config.train.num_steps=2000
#
# Copies this repository to every host (~/imaml), installs it in ~/imaml/.venv there, then runs
# `python -m trainer.main` on all hosts at once with `gcloud ... ssh --worker=all`. On a TPU VM JAX reads
# the pod's metadata and fills in the coordinator, the number of processes and each host's id.
# WORKDIR must be a directory every host sees (an NFS / Filestore mount, or a gcsfuse mount of a bucket):
# checkpoints are written by all hosts together and read back by all of them on resume; metrics, TensorBoard
# files and figures come from host 0 only.

set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [trainer flags...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 2

CONFIG=${CONFIG:-configs/sinusoid.py}
WORKDIR=${WORKDIR:?set WORKDIR to a directory every TPU host sees, e.g. /mnt/shared/runs/sinusoid}
REMOTE_DIR=${REMOTE_DIR:-imaml}
DISTRIBUTED_TIMEOUT_S=${DISTRIBUTED_TIMEOUT_S:-600}
HEARTBEAT_TIMEOUT_S=${HEARTBEAT_TIMEOUT_S:-100}
GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=(--zone="${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  TARGET+=(--project="${PROJECT}")
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
echo "tpu_pod: copying ${REPO} to ${TPU_NAME}:~/${REMOTE_DIR} on every host"
tar -C "${REPO}" --exclude=.venv --exclude=.git --exclude=runs -czf /tmp/imaml-src.tgz .
"${GCLOUD[@]}" scp /tmp/imaml-src.tgz "${TPU_NAME}:~/imaml-src.tgz" "${TARGET[@]}" --worker=all
# Idempotent: unpacks the code, creates the venv on the first run, then only refreshes the package.
SETUP="mkdir -p ~/${REMOTE_DIR} && tar -C ~/${REMOTE_DIR} -xzf ~/imaml-src.tgz && cd ~/${REMOTE_DIR}"
SETUP+=" && (test -x .venv/bin/python || python3 -m venv .venv)"
SETUP+=" && .venv/bin/pip install --quiet -e . 'jax[tpu]>=0.10.2,<0.11'"

# Quote the trainer flags for the remote shell.
ARGS=$(printf ' %q' --config="${CONFIG}" --workdir="${WORKDIR}" \
  --distributed_timeout_s="${DISTRIBUTED_TIMEOUT_S}" --heartbeat_timeout_s="${HEARTBEAT_TIMEOUT_S}" "$@")
echo "tpu_pod: starting python -m trainer.main${ARGS} on all hosts"
"${GCLOUD[@]}" ssh "${TPU_NAME}" "${TARGET[@]}" --worker=all \
  --command="${SETUP} && .venv/bin/python -m trainer.main${ARGS}"
