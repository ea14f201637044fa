"""Camera image loading: decode and augment a JPEG in one resampling step.

The reference (``reference/bevnext-model.md`` §4.3) decodes every camera image at full resolution
(1600 x 900 on nuScenes), resizes it with PIL's default bicubic filter, crops, flips and rotates
(nearest neighbour). In stage 2 that happens 54 times per sample, and the full-size bicubic resize
alone costs more than everything else together (``reference/performance.md`` §6).

``load_image`` computes the same picture with less work:

1. **Reduced-size decoding.** A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size directly from
   its DCT coefficients (PIL ``Image.draft``), which both skips work in the decoder and acts as an
   anti-aliasing pre-filter. The largest reduction is chosen that keeps at least as many decoded
   pixels per original pixel as the output has, so no detail the output could show is dropped:
   the reference's resize range 0.38-0.55 decodes at 1/2 whenever the factor is <= 0.5.
2. **One resampling.** Resize, crop, flip and rotation are one affine map (``ImageAug.matrix``);
   composed with the decoding scale it becomes a single warp from the decoded image straight to the
   output window, so the image is interpolated once instead of twice.
3. **Reference borders.** Where the output samples outside the image, it is black, as in the
   reference's padded crop. Because the reference rotates the *cropped* window, the corners that
   the rotation brings in are black too, even where the original image has content there; that is
   reproduced so the network sees what the reference's network saw.

Warp backends (``backend=``): ``"pil"`` is PIL's ``Image.transform`` (always available, the reference
implementation); ``"opencv"`` is ``cv2.warpAffine`` (OpenCV comes with nuscenes-devkit), about 5x
faster for the same bilinear interpolation. ``"auto"`` (default) uses OpenCV when it imports and the
warp is nearest or bilinear, PIL otherwise; ``BEVNEXT_OPS=reference`` forces PIL, as for the ops.
Both give the same geometry and borders; pixel values differ by the backends' rounding (OpenCV
interpolates in fixed point at 1/32 px), a grey level or two.

Pixel convention (shared with ``ImageAug`` and the synthetic renderer): coordinates are continuous
and corner-based, pixel ``(c, r)`` covers ``[c, c + 1) x [r, r + 1)``. PIL's affine transform uses
the same convention: it maps the centre ``(x + 0.5, y + 0.5)`` of output pixel ``(x, y)`` through
the given coefficients and samples the input at that continuous position (bilinear interpolation
between input pixel centres, nearest = the pixel containing it; outside ``[0, W) x [0, H)`` = the
fill colour). OpenCV puts pixel centres at integers, so its matrix is conjugated by a half-pixel shift.
A source point ``(u, v)`` therefore appears at ``aug.matrix() @ (u, v, 1)`` in the output, which
``tests/data/test_image_io.py`` pins down for both backends.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image, UnidentifiedImageError

from bevnext.data.image_aug import ImageAug
from bevnext.errors import DataError

# Pillow >= 9.1 moved the constants into enums; Pillow 9.0 (our minimum) only has the module-level names.
_Resampling = getattr(Image, "Resampling", Image)
_AFFINE = getattr(Image, "Transform", Image).AFFINE

RESAMPLE_FILTERS = {
    "nearest": _Resampling.NEAREST,
    "bilinear": _Resampling.BILINEAR,
    "bicubic": _Resampling.BICUBIC,
}
"""The interpolation names ``load_image`` accepts and the PIL filters they select."""

DRAFT_SCALES = (8, 4, 2)
"""The JPEG decoder's size reductions (libjpeg scales by 1/8, 1/4, 1/2), largest first."""

BACKENDS = ("auto", "pil", "opencv")
"""Warp implementations ``load_image`` accepts (see the module docstring)."""

# OpenCV's interpolation flags for the filters whose kernels match PIL's. Its cubic kernel (a = -0.75)
# differs from PIL's (a = -0.5), so "bicubic" always uses PIL.
_CV2_FLAGS = {"nearest": "INTER_NEAREST", "bilinear": "INTER_LINEAR"}

# Import state of OpenCV: not tried yet (False), unavailable (None) or the module.
_cv2: ModuleType | None | bool = False

# Float slack when comparing a sampling density with 1/scale: a resize of exactly 0.5 computed as
# 704 / 1408 must still decode at 1/2.
_DENSITY_TOL = 1e-9


def draft_scale(density: float, size: tuple[int, int]) -> int:
    """The largest JPEG decoding reduction that keeps enough resolution for the output.

    Args:
        density: output pixels per original pixel along the most finely sampled direction
            (the largest singular value of the augmentation's linear part; ``resize`` for a
            resize + flip + rotation).
        size: original image ``(W, H)``.

    Returns:
        ``s`` in (8, 4, 2, 1): decode at 1/s, with ``s * density <= 1`` so the decoded image has at
        least as many pixels per unit length as the output samples.
    """
    for s in DRAFT_SCALES:
        if s * density <= 1.0 + _DENSITY_TOL and size[0] >= s and size[1] >= s:
            return s
    return 1


def pil_affine_data(matrix: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """PIL ``Image.AFFINE`` coefficients for a map from input to output pixel coordinates.

    PIL wants the inverse map (output -> input), applied to output pixel centres; since both PIL
    and ``ImageAug`` use continuous corner-based coordinates, that is exactly the inverse matrix.

    Args:
        matrix: (3, 3) affine, input (decoded image) coordinates -> output coordinates.

    Returns:
        ``(a, b, c, d, e, f)`` such that output position ``(x, y)`` samples input ``(a x + b y + c,
        d x + e y + f)``.
    """
    inv = affine_inverse(matrix)
    a, b, c = inv[0]
    d, e, f = inv[1]
    return float(a), float(b), float(c), float(d), float(e), float(f)


def affine_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a (3, 3) 2D affine matrix (last row ``0 0 1``), in closed form.

    ``np.linalg.inv`` goes through LAPACK, which in a data-loader worker whose BLAS was left
    multi-threaded costs milliseconds per 3x3 call; this is a few float operations.

    Args:
        matrix: (3, 3) ``[[A, t], [0, 1]]`` with invertible (2, 2) ``A``.

    Returns:
        (3, 3) float64 ``[[A^-1, -A^-1 t], [0, 1]]``.
    """
    (a, b, tx), (c, d, ty) = np.asarray(matrix, dtype=np.float64)[:2].tolist()
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    return np.array([[ia, ib, -(ia * tx + ib * ty)], [ic, id_, -(ic * tx + id_ * ty)], [0.0, 0.0, 1.0]])


def max_scale(matrix: np.ndarray) -> float:
    """Largest singular value of the linear part of a (3, 3) affine: its finest sampling density.

    Closed form for 2 x 2 (no LAPACK, see ``affine_inverse``): sigma_max^2 = (F + sqrt(F^2 - 4 det^2)) / 2
    with F the squared Frobenius norm.
    """
    (a, b), (c, d) = np.asarray(matrix, dtype=np.float64)[:2, :2].tolist()
    frob = a * a + b * b + c * c + d * d
    det = a * d - b * c
    return math.sqrt(0.5 * (frob + math.sqrt(max(0.0, frob * frob - 4.0 * det * det))))


def _decode(path: Path, density: float) -> tuple[Image.Image, float, float]:
    """Open and decode an image, at reduced size when it is a JPEG and ``density`` allows.

    Returns:
        The decoded RGB image and ``(sx, sy)``: decoded pixel coordinates = original * (sx, sy).
    """
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found (expected a JPEG or PNG camera image)") from None
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: not a readable image (unknown format or empty file; expected a JPEG or PNG camera image)"
        ) from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's answer: a folder, no permission, an I/O error
            raise DataError(f"{path}: cannot read the image file ({exc.strerror or exc})") from None
        # PIL's own complaint while parsing the headers ("Truncated File Read", a bad marker).
        raise DataError(f"{path}: corrupt or truncated image ({exc}); expected a complete JPEG or PNG") from None
    with im:
        orig_w, orig_h = im.size
        sx = sy = 1.0
        s = draft_scale(density, im.size) if im.format == "JPEG" else 1
        if s > 1:
            # Requesting (W // s, H // s) makes PIL pick exactly 1/s (W // (W // s) lies in [s, 2s)).
            drafted = im.draft("RGB", (orig_w // s, orig_h // s))
            if drafted is not None:
                # PIL reports the decoded image's extent in its own coordinates as (W / s, H / s): the
                # DCT scaling maps each 8x8 block onto an (8/s)x(8/s) block, so decoded coordinates are
                # exactly original / s. The decoded size is ceil(W / s); when W is not a multiple of s
                # its last column covers the encoder's edge padding (so decoded_w / W would be wrong).
                _, box = drafted
                sx, sy = box[2] / orig_w, box[3] / orig_h
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as exc:
            # Truncated or corrupt data surfaces from the decoder as OSError ("image file is truncated",
            # "broken data stream"), from some plugins as SyntaxError/ValueError.
            raise DataError(f"{path}: corrupt or truncated image ({exc}); expected a complete JPEG or PNG") from None
        rgb = im if im.mode == "RGB" else im.convert("RGB")
    return rgb, sx, sy


def resolve_backend(backend: str, resample: str) -> str:
    """The warp implementation ``load_image`` uses: ``"pil"`` or ``"opencv"``.

    Args:
        backend: ``"auto"``, ``"pil"`` or ``"opencv"``.
        resample: the interpolation name (OpenCV is used for ``"nearest"`` and ``"bilinear"`` only).

    Raises:
        ValueError: unknown ``backend``, or ``"opencv"`` asked for but not importable or not
            matching ``resample``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "pil":
        return "pil"
    usable = resample in _CV2_FLAGS and _opencv() is not None
    if backend == "opencv":
        if not usable:
            raise ValueError(f"backend 'opencv' needs an importable cv2 and resample in {sorted(_CV2_FLAGS)}")
        return "opencv"
    forced = os.environ.get("BEVNEXT_OPS", "").strip().lower() == "reference"
    return "opencv" if usable and not forced else "pil"


def set_opencv_threads(count: int) -> None:
    """Limit OpenCV's own worker threads (for the warps) in this process; no-op without OpenCV."""
    cv2 = _opencv()
    if cv2 is not None:
        cv2.setNumThreads(count)


def _opencv() -> ModuleType | None:
    """``cv2`` when it imports, else None (tried once per process)."""
    global _cv2
    if _cv2 is False:
        try:
            import cv2
        except Exception:  # any import failure (missing, broken shared libraries) means: use PIL
            _cv2 = None
        else:
            _cv2 = cv2
    return _cv2 if isinstance(_cv2, ModuleType) else None


def load_image(path: str | Path, aug: ImageAug, resample: str = "bilinear", *, backend: str = "auto") -> np.ndarray:
    """Decode a camera image and apply its augmentation in one resampling step.

    Args:
        path: image file (JPEG as in nuScenes; any format PIL reads works, without reduced decoding).
        aug: the augmentation; its ``matrix()`` is in the original image's pixel coordinates.
        resample: ``"bilinear"`` (default), ``"nearest"`` or ``"bicubic"``.
        backend: warp implementation, ``"auto"`` (default), ``"pil"`` or ``"opencv"`` (see the
            module docstring); the result's geometry does not depend on it.

    Returns:
        (H_out, W_out, 3) uint8 RGB, ``(W_out, H_out) = aug.out_size``, writable. A point at original
        pixel coordinates ``(u, v)`` appears at ``aug.matrix() @ (u, v, 1)``; output pixels that
        sample outside the image, or outside the crop window before the rotation (as in the
        reference, which rotates the cropped image), are black.

    Raises:
        DataError: the file is missing, not an image, or corrupt/truncated; the message names the path.
        ValueError: unknown ``resample`` or ``backend`` (a programming error).
    """
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}")
    which = resolve_backend(backend, resample)
    path = Path(path)
    m = aug.matrix()
    # The output's sampling density in original pixels (resize, for resize + flip + rotation).
    density = max_scale(m)
    img, sx, sy = _decode(path, density)

    # decoded -> original is diag(1/sx, 1/sy); compose with original -> output (scale m's columns).
    to_output = m * np.array([1.0 / sx, 1.0 / sy, 1.0])
    out_w, out_h = aug.out_size
    inverse = affine_inverse(to_output)  # output -> decoded image
    # Regions to blacken, as (output -> region coordinates, region size).
    regions = []
    if which == "opencv":
        cv2 = _opencv()
        # OpenCV's pixel centres are at integers: conjugate the corner-based map by half-pixel shifts,
        # src_cv = T(-1/2) inverse T(+1/2) dst_cv. Replicated borders keep the interpolation at the image
        # edge the same as PIL's (which clamps to the edge pixels); beyond the edge is blackened below.
        inverse_cv = inverse.copy()
        inverse_cv[:2, 2] += 0.5 * (inverse[:2, 0] + inverse[:2, 1]) - 0.5
        arr = cv2.warpAffine(
            np.asarray(img),
            inverse_cv[:2],
            (out_w, out_h),
            flags=getattr(cv2, _CV2_FLAGS[resample]) | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        regions.append((inverse, img.size))
    else:
        out = img.transform(
            (out_w, out_h),
            _AFFINE,
            pil_affine_data(to_output),
            resample=RESAMPLE_FILTERS[resample],
            fillcolor=(0, 0, 0),
        )
        # np.array copies into a writable array (np.asarray of a PIL image is read-only).
        arr = np.array(out)
    if aug.rotate_deg:
        # Output -> crop-window coordinates before the rotation.
        unrotated = dataclasses.replace(aug, rotate_deg=0.0).matrix()
        regions.append((unrotated @ affine_inverse(m), (out_w, out_h)))
    if regions:
        _black_outside(arr, regions)
    return arr


def _black_outside(img: np.ndarray, regions: list[tuple[np.ndarray, tuple[int, int]]]) -> None:
    """Blacken, in place, output pixels whose centre lies outside any of the given rectangles.

    Each region is an affine map from output coordinates to the region's own coordinates and the
    region's size ``(w, h)``; a pixel is inside when its centre maps into ``[0, w) x [0, h)``, the same
    half-open rule as PIL's fill and as the reference's nearest rotation of the cropped window. Along an
    output row the mapped centre moves linearly, so the inside part of each row is one interval of
    columns, found in closed form; zeroing the runs either side of it costs far less than a per-pixel
    mask (PIL's masked paste is ~5x slower).

    Args:
        img: (H, W, 3) uint8 output image, modified in place.
        regions: ``(matrix (3, 3), (w, h))`` pairs.
    """
    height, width = img.shape[:2]
    rows = np.arange(height) + 0.5
    lo = np.zeros(height)
    hi = np.full(height, float(width))
    for back, size in regions:
        for k in (0, 1):
            limit = size[k]
            # Region coordinate k of the centre (x + 0.5, y + 0.5) of column x in each row: slope * x + offset.
            slope = back[k, 0]
            offset = back[k, 0] * 0.5 + back[k, 1] * rows + back[k, 2]
            if abs(slope) < 1e-12:  # constant along the row: the whole row is in or out
                lo[(offset < 0) | (offset >= limit)] = width
                continue
            x_a, x_b = -offset / slope, (limit - offset) / slope
            lo = np.maximum(lo, np.minimum(x_a, x_b))
            hi = np.minimum(hi, np.maximum(x_a, x_b))
    first = np.clip(np.ceil(lo), 0, width).astype(np.int64)
    stop = np.clip(np.ceil(hi), 0, width).astype(np.int64)
    stop = np.maximum(stop, first)  # an empty row: everything is black
    for y in np.flatnonzero((first > 0) | (stop < width)):
        img[y, : first[y]] = 0
        img[y, stop[y] :] = 0
