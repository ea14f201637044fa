"""CenterPoint heatmap targets: radius rule and Gaussian splats against per-object loop oracles."""

from __future__ import annotations

import math

import pytest
import torch

from bevnext.ops.gaussian import draw_gaussians, gaussian_radius, heatmap_radius


def radius_oracle(height: float, width: float, overlap: float) -> float:
    """Oracle: CenterNet's three cases with the reference's ``(b + sqrt(b^2 - 4ac)) / 2`` roots."""
    roots = []
    for a, b, c in (
        (1.0, height + width, width * height * (1 - overlap) / (1 + overlap)),
        (4.0, 2 * (height + width), (1 - overlap) * width * height),
        (4 * overlap, -2 * overlap * (height + width), (overlap - 1) * width * height),
    ):
        roots.append((b + math.sqrt(b * b - 4 * a * c)) / 2)
    return min(roots)


def draw_oracle(heatmap: torch.Tensor, centers, radii, classes) -> torch.Tensor:
    """Oracle: the reference's draw_heatmap_gaussian applied object by object (float64 kernel, cast)."""
    heatmap = heatmap.clone().cpu()
    channels, height, width = heatmap.shape
    for (x, y), r, cls in zip(centers.tolist(), radii.tolist(), classes.tolist()):
        if not (0 <= x < width and 0 <= y < height and 0 <= cls < channels):
            continue
        sigma = (2 * r + 1) / 6
        kernel = torch.tensor(
            [
                [math.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma)) for dx in range(-r, r + 1)]
                for dy in range(-r, r + 1)
            ],
            dtype=torch.float64,
        )
        kernel[kernel < torch.finfo(torch.float64).eps * kernel.max()] = 0
        kernel = kernel.to(heatmap.dtype)
        left, right = min(x, r), min(width - x, r + 1)
        top, bottom = min(y, r), min(height - y, r + 1)
        region = heatmap[cls, y - top : y + bottom, x - left : x + right]
        patch = kernel[r - top : r + bottom, r - left : r + right]
        torch.maximum(region, patch, out=region)
    return heatmap


def test_gaussian_radius_matches_oracle(device):
    gen = torch.Generator().manual_seed(0)
    length = torch.rand(200, generator=gen) * 20 + 0.05
    width = torch.rand(200, generator=gen) * 6 + 0.05
    for overlap in (0.1, 0.5, 0.7):
        radius = gaussian_radius(length.to(device), width.to(device), overlap).cpu()
        expected = torch.tensor([radius_oracle(h, w, overlap) for h, w in zip(length.tolist(), width.tolist())])
        torch.testing.assert_close(radius, expected, rtol=1e-5, atol=1e-5)


def test_gaussian_radius_known_value():
    # A 4.5 m x 2 m car on the 0.8 m grid: (5.625, 2.5) cells; the third case is the smallest.
    assert float(gaussian_radius(torch.tensor(5.625), torch.tensor(2.5))) == pytest.approx(
        radius_oracle(5.625, 2.5, 0.1), rel=1e-6
    )


def test_heatmap_radius_truncates_and_applies_min_radius():
    length = torch.tensor([0.5, 5.625, 15.0, 40.0])
    width = torch.tensor([0.5, 2.5, 3.75, 12.0])
    radius = heatmap_radius(length, width, min_overlap=0.1, min_radius=2)
    expected = [max(2, int(radius_oracle(h, w, 0.1))) for h, w in zip(length.tolist(), width.tolist())]
    assert radius.dtype == torch.long and radius.tolist() == expected
    assert heatmap_radius(length, width, min_radius=0).tolist() == [
        int(radius_oracle(h, w, 0.1)) for h, w in zip(length.tolist(), width.tolist())
    ]


def random_objects(num, channels, height, width, max_radius, seed):
    gen = torch.Generator().manual_seed(seed)
    # Centres a little beyond the map too (ignored), many near the borders (clipped windows).
    centers = torch.stack(
        (torch.randint(-2, width + 2, (num,), generator=gen), torch.randint(-2, height + 2, (num,), generator=gen)), 1
    )
    radii = torch.randint(0, max_radius + 1, (num,), generator=gen)
    classes = torch.randint(0, channels, (num,), generator=gen)
    return centers, radii, classes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_draw_gaussians_matches_oracle_exactly(device, seed):
    centers, radii, classes = random_objects(40, 3, 17, 23, 6, seed)
    heatmap = torch.zeros(3, 17, 23, device=device)
    out = draw_gaussians(heatmap, centers.to(device), radii.to(device), classes.to(device))
    assert out is heatmap
    expected = draw_oracle(torch.zeros(3, 17, 23), centers, radii, classes)
    assert torch.equal(out.cpu(), expected)
    assert out.max() == 1.0  # each in-map centre gets exactly 1


def test_draw_gaussians_composes_with_existing_values(device):
    centers, radii, classes = random_objects(10, 2, 9, 9, 3, 5)
    start = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(6))
    out = draw_gaussians(start.clone().to(device), centers.to(device), radii.to(device), classes.to(device))
    assert torch.equal(out.cpu(), draw_oracle(start, centers, radii, classes))


def test_draw_gaussians_float64(device):
    centers, radii, classes = random_objects(15, 2, 12, 10, 4, 7)
    out = draw_gaussians(torch.zeros(2, 12, 10, dtype=torch.float64, device=device), centers, radii, classes)
    assert torch.equal(out.cpu(), draw_oracle(torch.zeros(2, 12, 10, dtype=torch.float64), centers, radii, classes))


def test_draw_gaussians_known_splat():
    heatmap = draw_gaussians(torch.zeros(1, 5, 5), torch.tensor([[2, 2]]), torch.tensor([1]), torch.tensor([0]))
    sigma = 0.5
    edge, corner = math.exp(-1 / (2 * sigma**2)), math.exp(-2 / (2 * sigma**2))
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = torch.tensor([[corner, edge, corner], [edge, 1.0, edge], [corner, edge, corner]])
    torch.testing.assert_close(heatmap[0], expected)


def test_draw_gaussians_empty_and_all_outside(device):
    heatmap = torch.zeros(2, 4, 4, device=device)
    empty = torch.zeros(0, 2, dtype=torch.long)
    assert torch.all(
        draw_gaussians(heatmap, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)) == 0
    )
    outside = torch.tensor([[-1, 0], [4, 1], [0, 4]])
    out = draw_gaussians(heatmap, outside, torch.tensor([2, 2, 2]), torch.tensor([0, 1, 0]))
    assert torch.all(out == 0)


def test_draw_gaussians_non_contiguous_heatmap(device):
    centers, radii, classes = random_objects(12, 3, 8, 11, 3, 9)
    storage = torch.zeros(8, 11, 3, device=device)
    heatmap = storage.permute(2, 0, 1)  # (3, 8, 11) view, not contiguous
    assert not heatmap.is_contiguous()
    out = draw_gaussians(heatmap, centers, radii, classes)
    assert out is heatmap
    expected = draw_oracle(torch.zeros(3, 8, 11), centers, radii, classes)
    assert torch.equal(storage.permute(2, 0, 1).cpu(), expected)
