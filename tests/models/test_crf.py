"""Mean-field depth CRF: a slow loop oracle, gradients (gradcheck, plain autograd), activation memory, the bench."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bevnext.errors import ConfigError
from bevnext.models.crf import MeanFieldCRF, color_kernel, label_compatibility, mean_field, patch_colors

ROOT = Path(__file__).resolve().parents[2]


def crf_oracle(logits: torch.Tensor, canvas: torch.Tensor, patch: int, zeta: float, weight: float, iters: int):
    """Explicit python loops over pixels, neighbours and depth-bin pairs (float64)."""
    BN, D, h, w = logits.shape
    img = canvas.double()
    colour = torch.zeros(BN, h, w, 3, dtype=torch.float64)
    for b in range(BN):
        for i in range(h):
            for j in range(w):
                colour[b, i, j] = (
                    img[b, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].reshape(-1, 3).mean(0)
                )

    def colour_at(b, i, j):
        return colour[b, i, j] if 0 <= i < h and 0 <= j < w else torch.zeros(3, dtype=torch.float64)

    kernel = {}
    for b in range(BN):
        for i in range(h):
            for j in range(w):
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        diff = colour_at(b, i + di, j + dj) - colour[b, i, j]
                        kernel[b, i, j, di, dj] = math.exp(-float((diff**2).sum()) / (2 * zeta**2))
    L = logits.double()
    q = torch.softmax(L, dim=1)
    for _ in range(iters):
        new = torch.empty_like(q)
        for b in range(BN):
            for i in range(h):
                for j in range(w):
                    message = [0.0] * D
                    for di in (-1, 0, 1):
                        for dj in (-1, 0, 1):
                            if 0 <= i + di < h and 0 <= j + dj < w:
                                for d in range(D):
                                    message[d] += kernel[b, i, j, di, dj] * float(q[b, d, i + di, j + dj])
                    scores = [
                        float(L[b, d, i, j]) - sum(abs(d - e) * weight * message[e] for e in range(D)) for d in range(D)
                    ]
                    top = max(scores)
                    exps = [math.exp(s - top) for s in scores]
                    for d in range(D):
                        new[b, d, i, j] = exps[d] / sum(exps)
        q = new
    return q


@pytest.mark.parametrize("zeta, flat", [(40.0, False), (0.001, True)])
def test_matches_loop_oracle(zeta, flat):
    gen = torch.Generator().manual_seed(0)
    BN, D, h, w, patch = 2, 4, 3, 4, 2
    logits = torch.randn(BN, D, h, w, generator=gen, dtype=torch.float64) * 2
    canvas = torch.randint(0, 256, (BN, h * patch, w * patch, 3), generator=gen, dtype=torch.uint8)
    if flat:  # identical patches, so the zeta = 0.001 kernel has 1s besides the centre
        canvas[0, :, : 2 * patch] = 77
        canvas[1, : 2 * patch] = 0
    crf = MeanFieldCRF(num_iters=3, zeta=zeta, init_weight=0.4, patch_size=patch, depth_bins=D).double()
    out = crf(logits, canvas)
    expected = crf_oracle(logits, canvas, patch, zeta, float(crf.ws[0].detach()), 3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(BN, h, w, dtype=torch.float64))
    if flat:
        kernel = color_kernel(patch_colors(canvas, patch, torch.float64), zeta)
        assert set(kernel.unique().tolist()) == {0.0, 1.0}
        assert bool((kernel[:, 4] == 1).all())  # the centre tap
        assert float(kernel[0, 5, 0, 0]) == 1.0  # right neighbour inside the flat region
        # Outside the image counts as colour 0: the left tap of a black border patch is 1, of a coloured one 0.
        assert float(kernel[1, 3, 1, 0]) == 1.0
        assert float(kernel[1, 3, 2, 0]) == 0.0


def test_label_compatibility():
    assert label_compatibility(4).tolist() == [[0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1], [3, 2, 1, 0]]


def _inputs(BN=2, D=5, h=3, w=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(BN, D, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    kernel = color_kernel(torch.rand(BN, 3, h, w, generator=gen, dtype=torch.float64) * 3, zeta=1.0)
    return logits, weight, kernel, label_compatibility(D, torch.float64)


@pytest.mark.parametrize("iters, segment", [(1, None), (3, None), (4, 1), (5, 3)])
def test_gradcheck(iters, segment):
    logits, weight, kernel, compat = _inputs(BN=1, D=3, h=2, w=3)
    assert torch.autograd.gradcheck(
        lambda x, wt: mean_field(x, kernel, wt, compat, iters, segment), (logits, weight), eps=1e-6, atol=1e-8
    )


def unfold_mean_field(logits, kernel, weight, compat, iters):
    """Straightforward autograd formulation (3x3 unfold), independent of the module's shifted slices."""
    BN, D, h, w = logits.shape
    q = torch.softmax(logits, dim=1)
    for _ in range(iters):
        neighbours = F.unfold(q, 3, padding=1).view(BN, D, 9, h * w)
        message = weight * (neighbours * kernel.reshape(BN, 1, 9, h * w)).sum(dim=2)
        q = torch.softmax(logits - torch.matmul(compat, message).view(BN, D, h, w), dim=1)
    return q


def test_twenty_iterations_match_plain_autograd():
    logits, weight, kernel, compat = _inputs()
    grad = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    out = mean_field(logits, kernel, weight, compat, 20)
    g_logits, g_weight = torch.autograd.grad(out, (logits, weight), grad)
    ref = unfold_mean_field(logits, kernel, weight, compat, 20)
    r_logits, r_weight = torch.autograd.grad(ref, (logits, weight), grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_logits, r_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_weight, r_weight, rtol=1e-10, atol=1e-12)
    # Without gradients the plain loop runs and gives the same beliefs.
    with torch.no_grad():
        torch.testing.assert_close(mean_field(logits, kernel, weight, compat, 20), out.detach(), rtol=0, atol=0)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_activation_memory_is_bounded():
    BN, D, h, w, iters = 2, 16, 8, 8, 20
    logits = torch.randn(BN, D, h, w, requires_grad=True)
    canvas = torch.randint(0, 256, (BN, 4 * h, 4 * w, 3), dtype=torch.uint8)
    crf = MeanFieldCRF(num_iters=iters, patch_size=4, depth_bins=D)
    belief = BN * D * h * w * 4
    ours = saved_bytes(lambda: crf(logits, canvas))
    kernel = color_kernel(patch_colors(canvas, 4), crf.zeta)
    compat = label_compatibility(D)
    baseline = saved_bytes(lambda: unfold_mean_field(logits, kernel, crf.ws[0], compat, iters))
    # Logits + beliefs at iterations 5, 10, 15 (+ the small kernel and compat): ~4 belief tensors, whatever T.
    assert ours <= 4 * belief + kernel.numel() * 4 + compat.numel() * 4 + 64
    # Plain autograd keeps ~2 belief-sized tensors per iteration.
    assert baseline >= 2 * iters * belief
    assert ours * 8 < baseline


def test_autocast_computes_in_float32():
    crf = MeanFieldCRF(num_iters=3, patch_size=2, depth_bins=6)
    logits = torch.randn(2, 6, 3, 4)
    canvas = torch.randint(0, 256, (2, 6, 8, 3), dtype=torch.uint8)
    expected = crf(logits, canvas)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = crf(logits.bfloat16(), canvas)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, crf(logits.bfloat16().float(), canvas), rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.02)


def test_state_dict_and_input_checks():
    crf = MeanFieldCRF()
    assert list(crf.state_dict()) == ["ws.0"]
    assert crf.ws[0].shape == (1,) and float(crf.ws[0].detach()) == pytest.approx(0.015)
    with pytest.raises(ValueError, match="canvas"):
        crf(torch.randn(1, 118, 4, 4), torch.zeros(1, 32, 24, 3))
    with pytest.raises(ValueError, match="bins"):
        crf(torch.randn(1, 10, 4, 4), torch.zeros(1, 32, 32, 3))
    for kwargs in ({"zeta": 0.0}, {"num_iters": -1}, {"patch_size": 0}, {"depth_bins": 0}):
        with pytest.raises(ConfigError):
            MeanFieldCRF(**kwargs)


def test_bench_runs_and_reports(capsys):
    spec = importlib.util.spec_from_file_location("bench_crf", ROOT / "bench" / "crf.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--device", "cpu", "--cams", "2", "--depth-bins", "6", "--height", "3", "--width", "5", "--reps", "1"]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("crf activation memory: ") and lines[-1].endswith("MB (unfold baseline)")
    assert "agree: True" in "\n".join(lines)
