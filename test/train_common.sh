# The shared body of test/train_8p_stage1.sh and test/train_8p_stage2.sh (sourced, not run): parses the
# scripts' arguments, launches `bevnext train` under torchrun, and prints and writes the reference port's
# summary lines and files. The sourcing script sets `stage` (stage1 or stage2) and `Stage` (Stage1 or
# Stage2), has `set -euo pipefail` on, and passes its arguments.
# shellcheck shell=bash

: "${stage:?set by the sourcing script}" "${Stage:?set by the sourcing script}"

# shellcheck source=test/launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

work_dir="work_dirs/bevnext-${stage}"
stage1_ckpt=work_dirs/bevnext-stage1/epoch_2_ema.pth
epochs=""
overrides=()
if [[ "$stage" == stage2 ]]; then
    usage="options: --work_dir=DIR --stage1_ckpts_path=CKPT --epochs=N, plus key=value overrides"
else
    usage="options: --work_dir=DIR --epochs=N, plus key=value overrides"
fi
for arg in "$@"; do
    case "$arg" in
        --work_dir=*) work_dir="${arg#*=}" ;;
        --epochs=*) epochs="${arg#*=}" ;;
        --stage1_ckpts_path=*)
            [[ "$stage" == stage2 ]] || die "unknown option '$arg' ($usage)"
            stage1_ckpt="${arg#*=}"
            ;;
        -*) die "unknown option '$arg' ($usage)" ;;
        *=*) overrides+=("$arg") ;;
        *) die "unexpected argument '$arg' ($usage)" ;;
    esac
done
[[ -n "$work_dir" ]] || die "--work_dir needs a folder"
resume_from="$work_dir/last.pth"
# Checked before anything is launched: a wrong path would otherwise surface only after every process has
# started and built its model. A resumed run takes its weights from last.pth and does not need it.
if [[ "$stage" == stage2 && ! -f "$resume_from" && ! -f "$stage1_ckpt" ]]; then
    die "stage-1 checkpoint not found: $stage1_ckpt (train stage 1 first, or pass --stage1_ckpts_path=...)"
fi
if [[ -n "$epochs" ]]; then
    [[ "$epochs" =~ ^[1-9][0-9]*$ ]] || die "--epochs=$epochs: expected a positive whole number"
    # Last, so that it wins over a train.epochs=... among the overrides.
    overrides+=("train.epochs=$epochs")
fi

CONFIG="${CONFIG:-$stage}"
resolve_launch

# The batch size and epochs name the log files. Reading them from the resolved config (overrides included)
# also rejects a bad config or key here, once, instead of in every one of the processes.
read_config='
import sys
from bevnext.config.run import load_run
from bevnext.errors import BevnextError
try:
    t = load_run(sys.argv[1], sys.argv[2:]).train
except BevnextError as err:
    sys.exit(f"error: {err}")
print(t.batch_size, t.epochs, t.grad_accum)
'
config_values=$("$PYTHON" -c "$read_config" "$CONFIG" ${overrides[@]+"${overrides[@]}"}) || exit 2
read -r BATCH_SIZE EPOCHS GRAD_ACCUM <<<"$config_values"

name="${stage}_${RANK_SIZE}p_bs${BATCH_SIZE}_epochs${EPOCHS}"
log="$work_dir/train_${name}.log"
case_name="BEVNeXt_${name}"
summary="$work_dir/${case_name}.log"

train_args=(train "$CONFIG" --work-dir "$work_dir")
[[ -z "$DEVICE" ]] || train_args+=(--device "$DEVICE")
if [[ -f "$resume_from" ]]; then
    # A re-run (or a restarted job) continues where the last one stopped; last.pth holds the whole state, so
    # stage 2 does not load the stage-1 weights again. "auto" falls back to the newest readable checkpoint
    # when last.pth is damaged (and keeps a bare --resume from taking the next argument as its value).
    echo "Resuming ${Stage} training from $resume_from (or the newest readable checkpoint in $work_dir)"
    train_args+=(--resume auto)
elif [[ "$stage" == stage2 ]]; then
    train_args+=(--load-from "$stage1_ckpt")
fi

mkdir -p "$work_dir"
echo "${Stage}: $CONFIG on $RANK_SIZE process(es) ($NNODES node(s) x $NPROC_PER_NODE)," \
    "batch $BATCH_SIZE per process, $EPOCHS epoch(s); log $log"

# Where this run's part of the log starts: the figures below must not come from an earlier run.
log_start=0
if [[ -f "$log" ]]; then
    log_start=$(wc -c <"$log")
fi
start_time=$(date +%s)
# In the foreground so that Ctrl-C and a job scheduler's signals reach torchrun and its workers. The log is
# appended to, so that a resumed run keeps the history of the interrupted one.
set +e
"$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m bevnext "${train_args[@]}" ${overrides[@]+"${overrides[@]}"} 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
set -e
end_time=$(date +%s)
if ((status != 0)); then
    echo "error: ${Stage} training failed with exit status $status (log: $log)" >&2
    exit "$status"
fi
e2e_time=$((end_time - start_time))

# The value after "LABEL : " on the last line of this run's part of the log that has one.
log_value() {
    tail -c "+$((log_start + 1))" "$log" |
        awk -v label="$1 : " 'index($0, label) { value = substr($0, index($0, label) + length(label)) }
            END { print value }'
}
fps=$(log_value "Final Performance images/sec")
steady=$(log_value "Steady-state samples/sec")
fps="${fps:-n/a}"
# The reference's TrainingTime: seconds per optimizer step, derived from the same figure.
step_time=$(awk -v fps="$fps" -v n=$((BATCH_SIZE * GRAD_ACCUM * RANK_SIZE)) \
    'BEGIN { if (fps + 0 > 0) printf "%.3f", n / fps; else print "n/a" }')

echo "${Stage} E2E Training Duration sec : $e2e_time"
# "images/sec" is the reference's label; the figure is samples (key frames with all cameras) per second,
# averaged over every step, warm-up included, as the reference computes it.
echo "${Stage} Final Performance images/sec : $fps"
echo "${Stage} Steady-state samples/sec : ${steady:-n/a}"
if [[ "$fps" == 0.000 && -f "$summary" ]]; then
    # A re-run of a finished run trains no step: keep the figures of the run that did the work.
    echo "${Stage}: no training step was left to run; keeping $summary"
else
    device_type=$(uname -m)
    {
        echo "Network = BEVNeXt_${stage}"
        echo "DeviceType = ${device_type}"
        echo "RankSize = $RANK_SIZE"
        echo "BatchSize = $BATCH_SIZE"
        echo "CaseName = $case_name"
        echo "E2ETrainingTime = $e2e_time"
        echo "TrainingTime = $step_time"
        echo "averageFPS = $fps"
    } >"$summary"
fi
echo "${Stage} training finished successfully: checkpoints in $work_dir, summary $summary"
