"""One rank of the 2-process gloo test in ``test_dist.py`` (run as a script with torchrun-like env vars).

Usage: ``python dist_worker.py OUT_DIR``; writes ``OUT_DIR/rank{RANK}.json``.
"""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import torch

from bevnext.engine import dist as bdist


def main(out_dir: Path) -> None:
    """Exercise the distributed helpers on a real group and record what each rank saw."""
    info = bdist.init_distributed("cpu", timeout_s=30)
    again = bdist.init_distributed("cpu")  # idempotent: same answer, no second group
    rank = info.rank
    # Rank r contributes [r, 10 r, 1]; the mean over 2 ranks is [0.5, 5, 1].
    mean = bdist.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank, 1.0]))
    int_mean = bdist.all_reduce_mean(torch.tensor(rank + 1))  # ints are averaged as floats: 1.5
    gathered = bdist.all_gather_object({"rank": rank, "name": f"r{rank}"})
    bdist.barrier()
    result = {
        "rank": rank,
        "local_rank": info.local_rank,
        "world_size": info.world_size,
        "backend": info.backend,
        "device": str(info.device),
        "is_distributed": info.is_distributed,
        "is_main": info.is_main,
        "same_info": again == info,
        "get_rank": bdist.get_rank(),
        "get_world_size": bdist.get_world_size(),
        "is_main_process": bdist.is_main_process(),
        "mean": mean.tolist(),
        "int_mean": int_mean.item(),
        "gathered": gathered,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    bdist.cleanup_distributed()
    # After cleanup the helpers fall back to their single-process meaning.
    after = {"get_world_size": bdist.get_world_size(), "gather": bdist.all_gather_object(rank)}
    (out_dir / f"rank{rank}.after.json").write_text(json.dumps(after))


if __name__ == "__main__":
    # If anything hangs, print where and exit, so that the parent test reports it instead of waiting.
    faulthandler.dump_traceback_later(40, exit=True)
    main(Path(sys.argv[1]))
    print("worker done", flush=True)
