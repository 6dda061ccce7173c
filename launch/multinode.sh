#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher (e.g. 2 nodes x 4 A100), from the first node:
#   bash launch/multinode.sh launch/hostfile launch/llama2_7b_chat.yaml [--set KEY=VALUE ...]
# Checks ssh to every host first, writes .deepspeed_env (variables the launcher exports on every
# node), then starts `python -m llark.train` on all of them through the deepspeed launcher (pdsh).
# Same paths and virtualenv on every node; PYTHON names its interpreter (default: .venv/bin/python,
# else python3 on PATH).
# Put settings in the YAML config: the remote shell pdsh runs strips the quotes of a --set value.
set -euo pipefail
HOSTFILE=${1:?usage: multinode.sh HOSTFILE CONFIG [--set KEY=VALUE ...]}
CONFIG=${2:?usage: multinode.sh HOSTFILE CONFIG [--set KEY=VALUE ...]}
shift 2
cd "$(dirname "$0")/.."
source launch/select_python.sh

HOSTS=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1}')
NUM_NODES=$(echo "$HOSTS" | wc -l)
MASTER_ADDR=${MASTER_ADDR:-$(echo "$HOSTS" | head -n1)}
MASTER_PORT=${MASTER_PORT:-29500}

# The launcher reaches each node through pdsh/ssh: fail now, not halfway through a launch.
for host in $HOSTS; do
  if ! ssh -o BatchMode=yes -o ConnectTimeout=10 "$host" true; then
    echo "multinode: cannot ssh to $host without a password; set up keys, or use launch/slurm.sbatch" >&2
    exit 1
  fi
done

# NCCL: the interface it talks on (not docker0/virbr0), InfiniBand on or off, debug output.
# Set NCCL_SOCKET_IFNAME to the cluster's interface (ip -br addr), e.g. ib0 or ens5.
{
  echo "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0,virbr0}"
  echo "NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}"
  echo "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
  echo "HF_HUB_OFFLINE=1"
  echo "PYTHONPATH=$PWD"
  echo "TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
} > .deepspeed_env

exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" --module llark.train --config "$CONFIG" "$@"
