"""The data pipeline's configuration: every number of the reference's train and test pipelines.

``BEVDataset`` (``bevnext.data.dataset``) and the samplers read it; the transforms in
``bevnext.data.transforms`` take its values as explicit arguments. Numbers and their meaning follow
``reference/bevnext-model.md`` §4.2-4.4.
"""

from __future__ import annotations

from dataclasses import dataclass

from bevnext.errors import ConfigError

REFERENCE_SRC_WIDTH = 1600
"""Width (px) of the nuScenes camera images the reference's resize numbers are written for."""
REFERENCE_INPUT_WIDTH = 704
"""Network input width (px) the reference's resize numbers are written for."""

BAD_FILE_POLICIES = ("raise", "skip")
"""Values of ``DataConfig.on_bad_file``."""
CBGS_COUNTS = ("gt_labels", "all_labels")
"""Values of ``DataConfig.cbgs_count``: which per-sample label list CBGS counts classes in."""


@dataclass(frozen=True)
class DataConfig:
    """Data pipeline settings (defaults = the reference's stage-1 pipeline on nuScenes).

    Image augmentation (per camera, one draw per sample shared by all frames of that camera):
    resize by ``r``, crop a ``input_size`` window at the bottom of the resized image (random
    horizontal offset), flip horizontally with ``flip_prob``, rotate by U(``rot_lim``) degrees.

    Resize units. ``resize_lim`` and ``resize_test`` are the reference's numbers, which are scale
    factors of a 1600-wide original into a 704-wide input (704/1600 = 0.44 fills the input width
    exactly; the train range is 0.44 + U(-0.06, 0.11)). For another source width ``W`` or input
    width ``w`` the factor actually applied is ``value * resize_unit`` with
    ``resize_unit = (w / W) / (704 / 1600)``: the same relative zoom around "fill the input
    width", hence the same fraction of each camera's field of view in the crop. This is exactly
    1 for the reference sizes; for the 800 x 450 synthetic images it is 2 (train r in [0.76, 1.10],
    test 0.88 -> a 704 x 396 resized image, crop (0, 140, 704, 396), as on real data).

    The BGR quirk (``bgr_normalize``). The reference loads camera images as RGB and then calls
    mmcv's ``imnormalize(..., to_rgb=True)``, which swaps the channels, so the network is fed
    (B, G, R) normalised with the RGB-ordered ImageNet ``mean``/``std`` below — the opposite of the
    channel order of the ImageNet-pretrained backbone it starts from. We keep this by default
    (``True``): the released checkpoints and the reference's training curves were made with it, and
    a network trained one way sees garbage colours the other way. ``False`` feeds RGB in the
    backbone's own order (each channel normalised with its own mean/std), the natural choice when
    training from an RGB-pretrained backbone without reference checkpoints in mind.

    Attributes:
        data_root: the nuScenes (or synthetic) data root; info files are
            ``<data_root>/bevnext_infos_<split>.json`` (``bevnext create-data`` writes them).
        train_split: the split trained on (``train``; synthetic data: ``synth_train``).
        val_split: the split evaluated on (``val``; synthetic data: ``synth_val``).
        input_size: network input ``(H, W)`` of every camera image (256, 704).
        src_size: ``(W, H)`` of the dataset's camera images (nuScenes 1600 x 900; set it to the
            synthetic image size for synthetic data). The dataset checks the info files against it.
        resize_lim: train resize range, reference units (see above).
        resize_test: test resize, reference units (0.44 = 704/1600).
        crop_h: range of the fraction of the resized height left out below the crop window
            (0 = bottom crop, as in the reference; the test crop uses the range's mean).
        flip_prob: probability of a horizontal image flip (train).
        rot_lim: image rotation range in degrees, counter-clockwise on screen (train).
        bda_rot_lim: BEV augmentation rotation range in degrees about +z (train).
        bda_scale_lim: BEV augmentation isotropic scale range (train).
        bda_flip_x_prob: probability of mirroring the BEV along x (x -> -x) (train).
        bda_flip_y_prob: probability of mirroring the BEV along y (y -> -y) (train).
        depth_range: ``[min, max)`` camera depth in metres of the sparse LiDAR depth targets.
        point_cloud_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)``; boxes whose BEV centre
            is not strictly inside the x/y range are dropped (z is not filtered, as in the reference).
        num_prev_frames: previous key frames per sample (stage 1: 0, stage 2: 8).
        mean: normalisation mean per channel, RGB order (ImageNet, 0-255 scale).
        std: normalisation std per channel, RGB order.
        bgr_normalize: reproduce the reference's channel swap (see above).
        cbgs: wrap training in class-balanced group sampling (``CBGSSampler``).
        cbgs_count: which labels CBGS counts: ``"gt_labels"`` (boxes with at least one LiDAR or
            radar point, the reference's valid-flag filter) or ``"all_labels"``.
        on_bad_file: a missing or corrupt image / LiDAR file: ``"raise"`` a ``DataError`` naming
            the file and the sample, or ``"skip"`` it (warn, count, load another sample).
    """

    data_root: str = "data/nuscenes"
    train_split: str = "train"
    val_split: str = "val"
    input_size: tuple[int, int] = (256, 704)
    src_size: tuple[int, int] = (1600, 900)
    resize_lim: tuple[float, float] = (0.38, 0.55)
    resize_test: float = 0.44
    crop_h: tuple[float, float] = (0.0, 0.0)
    flip_prob: float = 0.5
    rot_lim: tuple[float, float] = (-5.4, 5.4)
    bda_rot_lim: tuple[float, float] = (-22.5, 22.5)
    bda_scale_lim: tuple[float, float] = (0.95, 1.05)
    bda_flip_x_prob: float = 0.5
    bda_flip_y_prob: float = 0.5
    depth_range: tuple[float, float] = (1.0, 60.0)
    point_cloud_range: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    num_prev_frames: int = 0
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    bgr_normalize: bool = True
    cbgs: bool = False
    cbgs_count: str = "gt_labels"
    on_bad_file: str = "raise"

    @property
    def num_frames(self) -> int:
        """Frames per sample: the key frame plus ``num_prev_frames``."""
        return 1 + self.num_prev_frames

    @property
    def resize_unit(self) -> float:
        """Factor from the reference's resize units to this source/input geometry (1 for 1600 -> 704)."""
        return (self.input_size[1] / self.src_size[0]) / (REFERENCE_INPUT_WIDTH / REFERENCE_SRC_WIDTH)

    def validate(self) -> None:
        """Check every value; the ``ConfigError`` names the key (``data.<field>``)."""

        def ordered(name: str, lim: tuple[float, float], low: float | None = None) -> None:
            if not lim[0] <= lim[1] or (low is not None and lim[0] < low):
                bound = f" and values >= {low:g}" if low is not None else ""
                raise ConfigError(f"data.{name}={lim}: expected (min, max) with min <= max{bound}")

        h, w = self.input_size
        if h <= 0 or w <= 0:
            raise ConfigError(f"data.input_size={self.input_size}: expected positive (H, W)")
        if self.src_size[0] <= 0 or self.src_size[1] <= 0:
            raise ConfigError(f"data.src_size={self.src_size}: expected positive (W, H)")
        ordered("resize_lim", self.resize_lim)
        if self.resize_lim[0] <= 0 or self.resize_test <= 0:
            raise ConfigError(f"data.resize_lim={self.resize_lim} / data.resize_test={self.resize_test}: "
                              "resize factors must be positive")
        ordered("crop_h", self.crop_h, 0.0)
        if self.crop_h[1] >= 1.0:
            raise ConfigError(f"data.crop_h={self.crop_h}: fractions must be < 1")
        ordered("rot_lim", self.rot_lim)
        ordered("bda_rot_lim", self.bda_rot_lim)
        ordered("bda_scale_lim", self.bda_scale_lim)
        if self.bda_scale_lim[0] <= 0:
            raise ConfigError(f"data.bda_scale_lim={self.bda_scale_lim}: scales must be positive")
        for name in ("flip_prob", "bda_flip_x_prob", "bda_flip_y_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"data.{name}={p}: expected a probability in [0, 1]")
        ordered("depth_range", self.depth_range, 0.0)
        pcr = self.point_cloud_range
        if not (pcr[0] < pcr[3] and pcr[1] < pcr[4] and pcr[2] < pcr[5]):
            raise ConfigError(f"data.point_cloud_range={pcr}: expected (x_min, y_min, z_min, x_max, y_max, z_max)"
                              " with each min < max")
        if self.num_prev_frames < 0:
            raise ConfigError(f"data.num_prev_frames={self.num_prev_frames} must be >= 0")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std={self.std}: expected positive values")
        if self.cbgs_count not in CBGS_COUNTS:
            raise ConfigError(f"data.cbgs_count={self.cbgs_count!r}: expected one of {CBGS_COUNTS}")
        if self.on_bad_file not in BAD_FILE_POLICIES:
            raise ConfigError(f"data.on_bad_file={self.on_bad_file!r}: expected one of {BAD_FILE_POLICIES}")


__all__ = ["BAD_FILE_POLICIES", "CBGS_COUNTS", "REFERENCE_INPUT_WIDTH", "REFERENCE_SRC_WIDTH", "DataConfig"]
