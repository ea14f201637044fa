# What the launch scripts in test/ share (sourced, not run): start from the source root, the NPU
# environment, one-line errors, and the torchrun launch settings read from the environment and checked
# once. The sourcing script has `set -euo pipefail` on.
# shellcheck shell=bash

# The reference's scripts may be started from the source root or from inside test/.
if [[ "$(basename "$PWD")" == test ]]; then
    cd ..
fi
# shellcheck source=test/env_npu.sh
source test/env_npu.sh

die() {
    echo "error: $1" >&2
    exit 2
}

# Sets NPROC_PER_NODE (8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), DEVICE
# (empty: the best present), PYTHON and RANK_SIZE from the environment, and checks them here because bash
# arithmetic on a non-number fails with an obscure message.
resolve_launch() {
    NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
    NNODES="${NNODES:-1}"
    NODE_RANK="${NODE_RANK:-0}"
    MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
    MASTER_PORT="${MASTER_PORT:-29500}"
    DEVICE="${DEVICE:-}"
    local name
    for name in NPROC_PER_NODE NNODES NODE_RANK MASTER_PORT; do
        [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name=${!name}: expected a whole number"
    done
    case "$DEVICE" in
        "" | npu | cuda | cpu) ;;
        *) die "DEVICE=$DEVICE: expected npu, cuda or cpu (or unset for the best present)" ;;
    esac
    if [[ -z "${PYTHON:-}" ]]; then
        # Some distributions only ship python3.
        if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
    fi
    # shellcheck disable=SC2034  # read by the sourcing script
    RANK_SIZE=$((NPROC_PER_NODE * NNODES))
}
