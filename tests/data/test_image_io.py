"""``load_image``: PIL's affine convention, exact geometry (reduced-size decoding included), agreement
with the reference's resize -> crop -> flip -> rotate chain on a realistic image, and errors.

Geometry is checked with bright Gaussian markers: their intensity-weighted centroid (pixel centres at
``c + 0.5``) must land at ``aug.matrix() @ marker``. Picture agreement is checked against the reference
chain, which cannot be matched pixel for pixel (it resamples twice, bicubic then nearest), so the
thresholds are stated per case and, for rotations, our image must also be at least as close as the
reference's to a high-quality rendering of the same augmentation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, JpegImagePlugin

from bevnext.data import image_io
from bevnext.data.image_aug import ImageAug
from bevnext.data.image_io import (
    affine_inverse,
    draft_scale,
    load_image,
    max_scale,
    pil_affine_data,
    resolve_backend,
)
from bevnext.errors import DataError

W, H = 1600, 900
# The warp implementations to check: PIL always, OpenCV where it imports (it comes with nuscenes-devkit).
WARP_BACKENDS = ["pil"] + (["opencv"] if image_io._opencv() is not None else [])
# In the lower part of the image, where the reference's bottom crops keep them.
MARKERS = [(250.3, 620.7), (800.0, 560.0), (1350.6, 640.2), (500.5, 800.5), (1100.2, 780.9)]
MARKER_SIGMA = 5.0  # original pixels
MARKER_HALF = 40  # the marker sits on a black square of side 2 * MARKER_HALF


def _markers(size: tuple[int, int], points: list[tuple[float, float]], sigma: float) -> np.ndarray:
    """(H, W) float image of Gaussian blobs (peak 255) centred on ``points`` (continuous coordinates)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    out = np.zeros((h, w))
    for u, v in points:
        out += 255.0 * np.exp(-((xx - u) ** 2 + (yy - v) ** 2) / (2.0 * sigma**2))
    return out


def _textured_image(seed: int = 0) -> Image.Image:
    """A 1600 x 900 RGB test picture with camera-like content at every scale.

    Multi-scale smooth noise (a rough 1/f spectrum, like natural images), sensor-like pixel noise,
    hard-edged rectangles, thin lines and text, plus black squares holding the Gaussian markers.
    """
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), 110.0, dtype=np.float32)
    for cell, amp in ((160, 50.0), (40, 30.0), (10, 20.0), (3, 12.0)):
        gh, gw = H // cell + 2, W // cell + 2
        for c in range(3):
            coarse = Image.fromarray(rng.uniform(-amp, amp, (gh, gw)).astype(np.float32), mode="F")
            img[..., c] += np.asarray(coarse.resize((gw * cell, gh * cell), Image.BICUBIC))[:H, :W]
    img += rng.normal(0.0, 4.0, img.shape).astype(np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)

    def colour() -> tuple[int, int, int]:
        r, g, b = rng.integers(0, 256, 3)
        return int(r), int(g), int(b)

    for _ in range(40):
        x, y = rng.uniform(0, [W, H])
        sw, sh = rng.uniform(20, 200, 2)
        draw.rectangle([x, y, x + sw, y + sh], fill=colour())
    for _ in range(30):
        a, b = rng.uniform(0, [W, H]), rng.uniform(0, [W, H])
        draw.line([tuple(a), tuple(b)], fill=colour(), width=int(rng.integers(1, 6)))
    for i in range(20):
        draw.text(
            tuple(rng.uniform(0, [W - 100, H - 20])), "nuScenes 0123", fill=(255, 255, 255) if i % 2 else (0, 0, 0)
        )
    arr = np.array(pil)
    blobs = _markers((W, H), MARKERS, MARKER_SIGMA)
    for u, v in MARKERS:
        rows = slice(int(v) - MARKER_HALF, int(v) + MARKER_HALF)
        cols = slice(int(u) - MARKER_HALF, int(u) + MARKER_HALF)
        arr[rows, cols] = blobs[rows, cols, None].astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def textured_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image_io") / "cam.jpg"
    _textured_image().save(path, quality=90)
    return path


def _reference_chain(path: Path, aug: ImageAug, resize_filter: int, rotate_filter: int) -> np.ndarray:
    """The reference's steps (§4.3): full decode, PIL resize, crop (black padding), flip, rotate."""
    img = Image.open(path)
    img = img.resize((int(img.width * aug.resize), int(img.height * aug.resize)), resize_filter)
    img = img.crop(aug.crop)
    if aug.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.array(img.rotate(aug.rotate_deg, rotate_filter))


def _source_coords(aug: ImageAug) -> tuple[np.ndarray, np.ndarray]:
    """(H_out, W_out) x2: the original-image coordinates (u, v) each output pixel centre samples."""
    w, h = aug.out_size
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    src = np.linalg.inv(aug.matrix()) @ np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)])
    return src[0].reshape(h, w), src[1].reshape(h, w)


def _output_masks(aug: ImageAug, size: tuple[int, int], margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Masks over the output: (valid, outside_window).

    ``valid``: the pixel centre samples the image at least ``margin`` original pixels from its border and
    lies at least 1.5 px inside the crop window before the rotation (away from all black borders and the
    band where the two pipelines' border handling differs). ``outside_window``: the centre, rotated back,
    is outside the window (the reference leaves it black) by more than 0.01 px (PIL's nearest affine uses
    fixed-point arithmetic, so exact ties on the window edge may go either way).
    """
    w, h = aug.out_size
    su, sv = _source_coords(aug)
    # Window coordinates before the rotation: the unrotated augmentation applied to the source point.
    unrotated = dataclasses.replace(aug, rotate_deg=0.0).matrix()
    wu = unrotated[0, 0] * su + unrotated[0, 1] * sv + unrotated[0, 2]
    wv = unrotated[1, 0] * su + unrotated[1, 1] * sv + unrotated[1, 2]
    inside_src = (su > margin) & (su < size[0] - margin) & (sv > margin) & (sv < size[1] - margin)
    inside_win = (wu > 1.5) & (wu < w - 1.5) & (wv > 1.5) & (wv < h - 1.5)
    tie = 0.01
    outside_win = (wu < -tie) | (wu >= w + tie) | (wv < -tie) | (wv >= h + tie)
    return inside_src & inside_win, outside_win


def _centroid(img: np.ndarray, near: np.ndarray, radius: int) -> np.ndarray:
    """Intensity-weighted centroid (continuous coordinates) of the window of ``radius`` around ``near``."""
    x, y = int(near[0]), int(near[1])
    patch = img[y - radius : y + radius + 1, x - radius : x + radius + 1].astype(np.float64)
    if patch.ndim == 3:
        patch = patch.mean(axis=-1)
    yy, xx = np.mgrid[y - radius : y + radius + 1, x - radius : x + radius + 1] + 0.5
    return np.array([(patch * xx).sum(), (patch * yy).sum()]) / patch.sum()


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(PSNR dB, mean absolute difference in grey levels) over ``mask``."""
    d = a.astype(np.float64)[mask] - b.astype(np.float64)[mask]
    return float(10.0 * np.log10(255.0**2 / np.mean(d**2))), float(np.mean(np.abs(d)))


def _window_aug(resize: float, left_frac: float, flip: bool, rotate: float) -> ImageAug:
    """A reference training augmentation: bottom crop 704 x 256 of the resized 1600 x 900 image."""
    new_w, new_h = int(W * resize), int(H * resize)
    left = int(left_frac * max(0, new_w - 704))
    return ImageAug(resize, (left, new_h - 256, left + 704, new_h), flip, rotate)


# Resize factors with integer resized sizes (1600 r and 900 r), so the reference's int() truncation of
# the resized size does not shift its geometry by a fraction of a pixel against ImageAug.matrix().
AUGS = {
    "test": ImageAug(0.44, (0, 140, 704, 396)),
    "r0.38_pad_flip_rot+5.4": _window_aug(0.38, 0.0, True, 5.4),  # window wider than the image: right pad
    "r0.42_rot-5.4": _window_aug(0.42, 0.0, False, -5.4),
    "r0.48_flip_rot+2.7": _window_aug(0.48, 0.7, True, 2.7),
    "r0.50_rot-4.1": _window_aug(0.50, 0.3, False, -4.1),
    "r0.54_flip_rot+3.3": _window_aug(0.54, 1.0, True, 3.3),  # > 0.5: full-resolution decode
}


# --- (b) the pixel convention -----------------------------------------------------------------------


def test_pil_affine_samples_output_pixel_centres_in_corner_based_coordinates():
    # A float image whose value is its column index: pixel c holds c, so the value at continuous
    # coordinate u (between pixel centres, bilinear) is u - 0.5.
    ramp = Image.fromarray(np.tile(np.arange(20, dtype=np.float32), (10, 1)), mode="F")
    # Output -> input: x_in = 0.5 x_out + 3 (a 2x enlargement, shifted).
    out = np.asarray(ramp.transform((20, 10), Image.AFFINE, (0.5, 0, 3, 0, 0.5, 0), resample=Image.BILINEAR))
    x = np.arange(20)
    # PIL evaluates the map at the output pixel centre x + 0.5: x_in = 0.5 (x + 0.5) + 3.
    np.testing.assert_allclose(out[5], 0.5 * (x + 0.5) + 3 - 0.5, atol=1e-5)

    # One bright pixel (5, 3) = the square [5, 6) x [3, 4); a map moving everything by (+3, +2) must move
    # it to pixel (8, 5) under nearest, and a half-pixel shift splits it evenly under bilinear.
    dot = np.zeros((10, 20), dtype=np.uint8)
    dot[3, 5] = 255
    img = Image.fromarray(dot)
    moved = np.asarray(img.transform((20, 10), Image.AFFINE, pil_affine_data(_translation(3, 2)), Image.NEAREST))
    assert np.argwhere(moved).tolist() == [[5, 8]]
    half = np.asarray(img.transform((20, 10), Image.AFFINE, pil_affine_data(_translation(0.5, 0)), Image.BILINEAR))
    assert np.argwhere(half).tolist() == [[3, 5], [3, 6]]
    assert abs(int(half[3, 5]) - int(half[3, 6])) <= 1


def _translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("backend", WARP_BACKENDS)
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("rotate", [0.0, 5.4, -3.0])
def test_load_image_puts_source_points_at_matrix_positions(tmp_path, flip, rotate, backend):
    # A lossless ramp image (no reduced decoding): red = column, green = row, so every output pixel
    # says where in the source it sampled. Bilinear on a ramp is exact up to the uint8 rounding.
    w, h = 240, 120
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w)[None, :]
    arr[..., 1] = np.arange(h)[:, None]
    arr[..., 2] = 200
    path = tmp_path / "ramp.png"
    Image.fromarray(arr).save(path)
    aug = ImageAug(resize=0.8, crop=(20, 10, 180, 90), flip=flip, rotate_deg=rotate)

    out_w, out_h = aug.out_size
    su, sv = _source_coords(aug)
    valid, outside = _output_masks(aug, (w, h), margin=1.0)

    bilinear = load_image(path, aug, backend=backend)
    assert bilinear.shape == (out_h, out_w, 3) and bilinear.dtype == np.uint8
    assert np.abs(bilinear[..., 0][valid] - (su[valid] - 0.5)).max() <= 1.0
    assert np.abs(bilinear[..., 1][valid] - (sv[valid] - 0.5)).max() <= 1.0
    assert (bilinear[..., 2][valid] == 200).all()
    assert (bilinear[outside] == 0).all()

    nearest = load_image(path, aug, resample="nearest", backend=backend)
    # The pixel containing the sample point, exactly; allow the measure-zero ties at pixel edges.
    assert np.mean(nearest[..., 0][valid] == np.floor(su[valid])) > 0.999
    assert np.mean(nearest[..., 1][valid] == np.floor(sv[valid])) > 0.999


@pytest.mark.parametrize("backend", WARP_BACKENDS)
@pytest.mark.parametrize("rotate", [5.4, -30.0, 90.0, 180.0, -135.0])
def test_rotated_in_corners_are_black_exactly_where_the_reference_leaves_them(tmp_path, rotate, backend):
    # A white window rotated by PIL itself (the reference's rotate, nearest) shows which pixels it
    # leaves black; ours must blacken the same ones (up to ties on the window edge).
    path = tmp_path / "white.png"
    Image.new("RGB", (120, 70), (255, 255, 255)).save(path)
    aug = ImageAug(resize=1.0, crop=(0, 0, 120, 70), rotate_deg=rotate)
    ours = load_image(path, aug, resample="nearest", backend=backend)
    reference = np.asarray(Image.open(path).rotate(rotate))
    assert np.mean((ours == 0).all(-1) != (reference == 0).all(-1)) < 0.002
    assert (ours[~(ours == 0).all(-1)] == 255).all()


def test_flip_mirrors_the_unflipped_output(textured_jpeg):
    aug = ImageAug(0.44, (0, 140, 704, 396))
    plain = load_image(textured_jpeg, aug).astype(np.int16)
    flipped = load_image(textured_jpeg, dataclasses.replace(aug, flip=True)).astype(np.int16)
    assert np.abs(flipped - plain[:, ::-1]).max() <= 1


def test_closed_form_inverse_and_scale_match_linalg():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = np.eye(3)
        m[:2] = rng.normal(size=(2, 3))
        np.testing.assert_allclose(affine_inverse(m), np.linalg.inv(m), rtol=1e-9, atol=1e-9)
        assert max_scale(m) == pytest.approx(np.linalg.norm(m[:2, :2], ord=2), rel=1e-9)
    aug = ImageAug(0.47, (10, 167, 714, 423), flip=True, rotate_deg=-4.2)
    assert max_scale(aug.matrix()) == pytest.approx(0.47, rel=1e-12)


# --- reduced-size decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("density", "scale"),
    [
        (1.0, 1),
        (0.55, 1),
        (0.5001, 1),
        (0.5, 2),
        (704 / 1408, 2),
        (0.38, 2),
        (0.26, 2),
        (0.25, 4),
        (0.2, 4),
        (0.125, 8),
        (0.05, 8),
    ],
)
def test_draft_scale_never_drops_below_the_output_density(density, scale):
    assert draft_scale(density, (1600, 900)) == scale


def test_draft_scale_needs_at_least_one_decoded_pixel():
    assert draft_scale(0.01, (6, 6)) == 4
    assert draft_scale(0.01, (1, 1)) == 1


@pytest.mark.parametrize("backend", WARP_BACKENDS)
@pytest.mark.parametrize(("resize", "scale"), [(0.6, 1), (0.4, 2), (0.2, 4), (0.1, 8)])
def test_reduced_decoding_keeps_exact_geometry_at_odd_sizes(tmp_path, monkeypatch, resize, scale, backend):
    # 1615 x 907 is not a multiple of 8: the decoded size rounds up (ceil(W / s)) while decoded
    # coordinates stay exactly original / s; using decoded_w / W instead would move the far marker
    # by up to ~0.6 decoded px.
    size = (1615, 907)
    points = [(1560.3, 850.6), (60.2, 40.7), (800.5, 450.5)]
    sigma = 6.0
    blobs = np.clip(_markers(size, points, sigma), 0, 255).astype(np.uint8)
    path = tmp_path / "odd.jpg"
    Image.fromarray(np.repeat(blobs[..., None], 3, axis=-1)).save(path, quality=95)

    drafts = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, requested):
        drafts.append(requested)
        return original_draft(self, mode, requested)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out_w, out_h = int(size[0] * resize), int(size[1] * resize)
    aug = ImageAug(resize, (0, 0, out_w, out_h))
    out = load_image(path, aug, backend=backend)
    assert drafts == ([] if scale == 1 else [(size[0] // scale, size[1] // scale)])
    radius = int(3 * sigma * resize) + 1
    for u, v in points:
        expected = (aug.matrix() @ [u, v, 1.0])[:2]
        np.testing.assert_allclose(_centroid(out, expected, radius), expected, atol=0.1)


# --- (a) agreement with the reference chain -----------------------------------------------------------


@pytest.mark.parametrize("backend", WARP_BACKENDS)
@pytest.mark.parametrize("name", list(AUGS))
def test_matches_reference_chain_on_a_realistic_image(textured_jpeg, name, backend):
    aug = AUGS[name]
    ours = load_image(textured_jpeg, aug, backend=backend)
    reference = _reference_chain(textured_jpeg, aug, Image.BICUBIC, Image.NEAREST)
    assert ours.shape == reference.shape == (256, 704, 3)
    valid, outside = _output_masks(aug, (W, H), margin=2.0)
    assert valid.mean() > 0.75

    # Geometry: every marker fully inside the valid area lands where the matrix says, in both.
    radius = int(3 * MARKER_SIGMA * aug.resize) + 1
    seen = 0
    for u, v in MARKERS:
        q = (aug.matrix() @ [u, v, 1.0])[:2]
        x, y = int(q[0]), int(q[1])
        if not (radius <= x < 704 - radius and radius <= y < 256 - radius):
            continue
        if not valid[y - radius : y + radius + 1, x - radius : x + radius + 1].all():
            continue
        seen += 1
        ours_at, ref_at = _centroid(ours, q, radius), _centroid(reference, q, radius)
        np.testing.assert_allclose(ours_at, q, atol=0.15)  # measured <= 0.05
        np.testing.assert_allclose(ref_at, q, atol=0.4)  # its nearest rotation: measured <= 0.27
        np.testing.assert_allclose(ours_at, ref_at, atol=0.5)
    assert seen >= 2

    # Borders: what the reference leaves black (padding past the image, rotated-in corners) is black.
    assert (ours[outside] == 0).all() and (reference[outside] == 0).all()
    past_right = _source_coords(aug)[0] >= W + 1.0  # samples more than a pixel past the right edge
    assert (ours[past_right] == 0).all() and (reference[past_right] == 0).all()
    # Content: the same picture up to resampling. Measured on this image: 38.2 dB / 1.6 grey levels
    # without rotation; with rotation ~31 dB / 3.1-3.4, dominated by the reference's nearest rotation.
    psnr, mad = _psnr(ours, reference, valid)
    if aug.rotate_deg == 0:
        assert psnr > 36.0 and mad < 2.0, (psnr, mad)
    else:
        assert psnr > 30.0 and mad < 4.0, (psnr, mad)
        # ... so for rotations compare both with a high-quality rendering of the same augmentation
        # (Lanczos resize, bicubic rotation): ours must be at least as close (measured ~36 vs ~32 dB).
        ideal = _reference_chain(textured_jpeg, aug, Image.LANCZOS, Image.BICUBIC)
        ours_ideal, _ = _psnr(ours, ideal, valid)
        reference_ideal, _ = _psnr(reference, ideal, valid)
        assert ours_ideal > 33.0 and ours_ideal > reference_ideal, (ours_ideal, reference_ideal)


@pytest.mark.skipif("opencv" not in WARP_BACKENDS, reason="OpenCV is not importable here")
@pytest.mark.parametrize("name", list(AUGS))
def test_warp_backends_agree(textured_jpeg, name):
    aug = AUGS[name]
    pil = load_image(textured_jpeg, aug, backend="pil")
    cv = load_image(textured_jpeg, aug, backend="opencv")
    valid, outside = _output_masks(aug, (W, H), margin=2.0)
    # PIL truncates interpolated values, OpenCV rounds (and interpolates at 1/32 px): measured
    # 51.5 dB, 0.44 grey levels mean, at most 5 apart.
    psnr, mad = _psnr(pil, cv, valid)
    assert psnr > 48.0 and mad < 0.7, (psnr, mad)
    assert np.abs(pil.astype(np.int16) - cv)[valid].max() <= 8
    # The same borders: black past the image and outside the rotated window, image content elsewhere.
    past_edge = _source_coords(aug)[0] >= W + 0.01
    assert (cv[outside | past_edge] == 0).all() and (pil[outside | past_edge] == 0).all()


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("BEVNEXT_OPS", raising=False)
    expected_auto = "opencv" if "opencv" in WARP_BACKENDS else "pil"
    assert resolve_backend("auto", "bilinear") == expected_auto
    assert resolve_backend("auto", "nearest") == expected_auto
    assert resolve_backend("auto", "bicubic") == "pil"  # OpenCV's cubic kernel is not PIL's
    assert resolve_backend("pil", "bilinear") == "pil"
    monkeypatch.setenv("BEVNEXT_OPS", "reference")
    assert resolve_backend("auto", "bilinear") == "pil"
    monkeypatch.delenv("BEVNEXT_OPS")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("torch", "bilinear")
    with pytest.raises(ValueError, match="opencv"):
        resolve_backend("opencv", "bicubic")
    # Without a usable cv2, auto falls back to PIL and an explicit request is refused.
    monkeypatch.setattr(image_io, "_cv2", None)
    assert resolve_backend("auto", "bilinear") == "pil"
    with pytest.raises(ValueError, match="opencv"):
        resolve_backend("opencv", "bilinear")


def test_png_and_grayscale_images_load_without_reduced_decoding(tmp_path, textured_jpeg):
    aug = AUGS["test"]
    rgb = Image.open(textured_jpeg)
    rgb.save(tmp_path / "cam.png")
    rgb.convert("L").save(tmp_path / "gray.jpg", quality=90)
    from_png = load_image(tmp_path / "cam.png", aug)
    from_jpeg = load_image(textured_jpeg, aug)
    valid, _ = _output_masks(aug, (W, H), margin=2.0)
    # Full-resolution PNG vs 1/2-decoded JPEG of the same pixels: close, not equal.
    psnr, _ = _psnr(from_png, from_jpeg, valid)
    assert psnr > 33.0
    gray = load_image(tmp_path / "gray.jpg", aug)
    assert gray.shape == (256, 704, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_output_is_writable(textured_jpeg):
    out = load_image(textured_jpeg, AUGS["test"])
    out[0, 0] = 1  # the dataset may normalise in place or hand it to torch.from_numpy


# --- (c) errors -----------------------------------------------------------------------------------


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_truncated, "corrupt or truncated"),
        (lambda data: data[:-2], "corrupt or truncated"),  # no end-of-image marker
        (lambda data: data[:600], "corrupt or truncated"),  # headers only
        (lambda data: b"", "not a readable image"),
        (lambda data: b"this is not a JPEG", "not a readable image"),
    ],
)
def test_bad_files_raise_data_error_naming_the_path(tmp_path, textured_jpeg, make, expected):
    # Not tested: bytes garbled inside the entropy-coded data. libjpeg resynchronises and decodes them
    # with only a warning that PIL does not surface, so such a file loads (with visible damage).
    path = tmp_path / "bad.jpg"
    path.write_bytes(make(textured_jpeg.read_bytes()))
    with pytest.raises(DataError, match=expected) as info:
        load_image(path, AUGS["r0.42_rot-5.4"])
    assert str(path) in str(info.value)


def test_missing_file_and_folder_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="image file not found") as info:
        load_image(tmp_path / "nope.jpg", AUGS["test"])
    assert str(tmp_path / "nope.jpg") in str(info.value)
    with pytest.raises(DataError, match="cannot read the image file"):
        load_image(tmp_path, AUGS["test"])


def test_unknown_resample_is_a_value_error(textured_jpeg):
    with pytest.raises(ValueError, match="resample"):
        load_image(textured_jpeg, AUGS["test"], resample="lanczos")
    assert set(image_io.RESAMPLE_FILTERS) == {"nearest", "bilinear", "bicubic"}
