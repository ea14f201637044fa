#!/usr/bin/env bash
# Evaluation of a trained BEVNeXt under torchrun: by default 8 processes on one machine score stage 2's
# EMA weights after 12 epochs with the official nuScenes evaluation, as the DrivingSDK port's script of the
# same name. Prints "[BEVNeXt] NDS : X" and "[BEVNeXt] mAP : X" and writes the reference's log files.
#
# Usage: bash test/eval_bevnext.sh [--work_dir=DIR] [--ckpt=CKPT] [--epochs=N] [--split=NAME] [--show=N]
#                                  [key=value ...]
#   --work_dir=DIR  the training run's folder (default work_dirs/bevnext-stage2); its config.json is the
#                   config, and the results go to DIR/eval_epoch<N>
#   --epochs=N      evaluate DIR/epoch_N_ema.pth (default 12); also names the log files
#   --ckpt=CKPT     evaluate this checkpoint instead; an epoch_N*.pth name sets N when --epochs is not given
#   --split=NAME    the split to evaluate (default: the config's data.val_split)
#   --show=N        also draw N samples: predictions against ground truth, in DIR/eval_epoch<N>/pictures
#   key=value       any config override, e.g. data.data_root=data/nuscenes eval.num_workers=2
# Environment: NPROC_PER_NODE (8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
#   DEVICE (npu, cuda or cpu; default: the best present), CONFIG (a preset or config.json; default
#   DIR/config.json), PYTHON (the interpreter with bevnext installed; default python, else python3).
# Files: DIR/bevnext_epoch<N>_eval.log (the whole output) and DIR/BEVNeXt_<P>p_epochs<N>_eval.log (the
#   summary: Network, DeviceType, NDS, mAP), P being the number of processes.
set -euo pipefail

# shellcheck source=test/launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

usage="options: --work_dir=DIR --ckpt=CKPT --epochs=N --split=NAME --show=N, plus key=value overrides"
work_dir=work_dirs/bevnext-stage2
epochs=""
ckpt=""
split=""
show=""
overrides=()
for arg in "$@"; do
    case "$arg" in
        --work_dir=*) work_dir="${arg#*=}" ;;
        --ckpt=*) ckpt="${arg#*=}" ;;
        --epochs=*) epochs="${arg#*=}" ;;
        --split=*) split="${arg#*=}" ;;
        --show=*) show="${arg#*=}" ;;
        -*) die "unknown option '$arg' ($usage)" ;;
        *=*) overrides+=("$arg") ;;
        *) die "unexpected argument '$arg' ($usage)" ;;
    esac
done
[[ -n "$work_dir" ]] || die "--work_dir needs a folder"
if [[ -n "$epochs" ]]; then
    [[ "$epochs" =~ ^[1-9][0-9]*$ ]] || die "--epochs=$epochs: expected a positive whole number"
elif [[ "$(basename "$ckpt")" =~ ^epoch_([0-9]+)(_ema)?\.pth$ ]]; then
    # The log files name the epoch; a checkpoint named after one says which.
    epochs="${BASH_REMATCH[1]}"
else
    epochs=12
fi
[[ -n "$ckpt" ]] || ckpt="$work_dir/epoch_${epochs}_ema.pth"
[[ -z "$show" || "$show" =~ ^[0-9]+$ ]] || die "--show=$show: expected a number of samples"

# Checked before anything is launched: a wrong path would otherwise surface only after every process has
# started and built its model.
[[ -d "$work_dir" ]] || die "work dir not found: $work_dir (train stage 2 first, or pass --work_dir=...)"
[[ -f "$ckpt" ]] || die "checkpoint not found: $ckpt (pass --epochs=N or --ckpt=CKPT for another one)"
if [[ -z "${CONFIG:-}" ]]; then
    # The resolved run the trainer wrote: the model evaluated is the one that was trained.
    CONFIG="$work_dir/config.json"
    [[ -f "$CONFIG" ]] || die "config not found: $CONFIG (written by bevnext train; or set CONFIG=...)"
fi

resolve_launch

# A bad config or key is reported here, once, instead of by every one of the processes.
check_config='
import sys
from bevnext.config.run import load_run
from bevnext.errors import BevnextError
try:
    load_run(sys.argv[1], sys.argv[2:]).validate()
except BevnextError as err:
    sys.exit(f"error: {err}")
'
"$PYTHON" -c "$check_config" "$CONFIG" ${overrides[@]+"${overrides[@]}"} || exit 2

log="$work_dir/bevnext_epoch${epochs}_eval.log"
summary="$work_dir/BEVNeXt_${RANK_SIZE}p_epochs${epochs}_eval.log"
eval_dir="$work_dir/eval_epoch${epochs}"
eval_args=(eval "$CONFIG" "$ckpt" --work-dir "$eval_dir")
[[ -z "$DEVICE" ]] || eval_args+=(--device "$DEVICE")
[[ -z "$split" ]] || eval_args+=(--split "$split")
[[ -z "$show" ]] || eval_args+=(--show "$show")

echo "Evaluating $ckpt with $CONFIG on $RANK_SIZE process(es) ($NNODES node(s) x $NPROC_PER_NODE);" \
    "results in $eval_dir, log $log"
# In the foreground so that Ctrl-C and a job scheduler's signals reach torchrun and its workers. The log
# holds this evaluation only, so the figures below cannot come from an earlier one.
set +e
"$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m bevnext "${eval_args[@]}" ${overrides[@]+"${overrides[@]}"} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if ((status != 0)); then
    echo "error: evaluation failed with exit status $status (log: $log)" >&2
    exit "$status"
fi

# The value of the last devkit-style "LABEL: X" line of the log. The label must start the line or follow a
# non-word character (torchrun may prefix a rank), so "mAP (classes with ground truth): X" is not taken.
log_value() {
    awk -v label="$1: " '{
        at = index($0, label)
        if (at == 1 || (at > 1 && substr($0, at - 1, 1) !~ /[[:alnum:]_]/)) {
            rest = substr($0, at + length(label))
            split(rest, words, /[[:space:]]+/)
            value = words[1]
        }
    } END { print value }' "$log"
}
nds=$(log_value NDS)
map=$(log_value mAP)
if [[ -z "$nds" || -z "$map" ]]; then
    if ((NODE_RANK != 0)); then
        # Only the first machine of a multi-node evaluation gathers the detections and prints the metrics.
        echo "BEVNeXt evaluation finished on node $NODE_RANK; node 0 reports the metrics"
        exit 0
    fi
    echo "error: the evaluation printed no 'NDS:' and 'mAP:' lines (log: $log)" >&2
    exit 1
fi

echo "[BEVNeXt] NDS : $nds"
echo "[BEVNeXt] mAP : $map"
{
    echo "Network = BEVNeXt"
    echo "DeviceType = $(uname -m)"
    echo "NDS = $nds"
    echo "mAP = $map"
} >"$summary"
echo "BEVNeXt evaluation finished successfully: results in $eval_dir, summary $summary"
