"""``bench/deform_conv.py``: both variants run, agree, and the ratio line is printed.

Only the report's shape is checked (principle 8: no test asserts on wall-clock time or memory).
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "deform_conv.py"


def test_demo_shape_report(capsys):
    main = runpy.run_path(str(SCRIPT), run_name="bevnext_bench")["main"]
    assert main(["--device", "cpu", "--reps", "1", "--shapes", "demo"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^demo: B\*N=48 C=32 8x22, .* agree: True \(elements off: output 0, input grad 0, weight grad 0,",
                     out, re.M)
    for variant in ("torchvision", "grid_sample"):
        assert re.search(rf"^  {variant} +forward \+ backward +\d+\.\d ms, kept for the backward beyond its inputs",
                         out, re.M)
    assert re.search(r"^deform_conv on cpu: grid_sample / torchvision time \d+\.\d\dx at the demo shape$", out, re.M)
