# shellcheck shell=bash
# Environment for training on Ascend NPUs, sourced by the launch scripts in test/.
#
# It only sets variables that the Ascend stack reads, so sourcing it on a GPU or CPU machine is harmless.
# It is sourced by scripts that run under `set -euo pipefail`, so nothing here may fail or read an
# unset variable. A value the caller already exported wins over the defaults below.

# Only errors in the device logs: the default level fills the host's log folder during long runs.
# msnpureport ships with the Ascend driver; without it there is no NPU to configure. A machine with fewer
# than 8 devices rejects the missing ids, which must not stop the caller.
if command -v msnpureport >/dev/null 2>&1; then
    for _bevnext_npu_id in 0 1 2 3 4 5 6 7; do
        msnpureport -g error -d "${_bevnext_npu_id}" >/dev/null 2>&1 || true
    done
    unset _bevnext_npu_id
fi

# Lets the caching allocator grow segments instead of fragmenting memory over many differently-shaped
# batches (the multi-frame stage 2 otherwise runs out of memory sooner).
export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"
# Level-2 task queue: operators are dispatched from a separate thread, which hides host-side launch cost.
export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-2}"
# Pins each process's host threads to the cores next to its device.
export CPU_AFFINITY_CONF="${CPU_AFFINITY_CONF:-1}"
