#!/usr/bin/env bash
# Stage 1 of BEVNeXt training under torchrun: by default 8 processes on one machine, 2 epochs of the
# `stage1` run (batch 8 per device), as the DrivingSDK port's script of the same name.
#
# Usage: bash test/train_8p_stage1.sh [--work_dir=DIR] [--epochs=N] [key=value ...]
#   --work_dir=DIR  output folder (default work_dirs/bevnext-stage1)
#   --epochs=N      train N epochs (default: the config's, 2 for stage1)
#   key=value       any config override, e.g. data.data_root=data/nuscenes train.num_workers=2
# Environment: NPROC_PER_NODE (8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
#   DEVICE (npu, cuda or cpu; default: the best present), CONFIG (a preset or config.json; default stage1),
#   PYTHON (the interpreter with bevnext installed; default python, else python3).
# A work dir that holds last.pth is continued from it, so re-running the same command after an
# interruption resumes instead of starting over.
set -euo pipefail

stage=stage1
Stage=Stage1

# shellcheck source=test/train_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/train_common.sh"
