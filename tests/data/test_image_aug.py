"""The augmentation matrix agrees with the reference's resize -> crop -> flip -> rotate steps."""

import math

import numpy as np
import pytest

from bevnext.data.image_aug import ImageAug


def _steps(aug: ImageAug, u: float, v: float) -> tuple[float, float]:
    # The reference's steps applied one at a time to a point, written out independently.
    x0, y0, x1, y1 = aug.crop
    u, v = u * aug.resize, v * aug.resize
    u, v = u - x0, v - y0
    w, h = x1 - x0, y1 - y0
    if aug.flip:
        u = w - u
    a = math.radians(aug.rotate_deg)
    du, dv = u - w / 2, v - h / 2
    # A screen-counter-clockwise rotation with y down: a point right of the centre moves up.
    u = w / 2 + math.cos(a) * du + math.sin(a) * dv
    v = h / 2 - math.sin(a) * du + math.cos(a) * dv
    return u, v


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("rotate", [0.0, 5.4, -3.0])
def test_matrix_matches_step_by_step(flip, rotate):
    aug = ImageAug(resize=0.44, crop=(10, 140, 714, 396), flip=flip, rotate_deg=rotate)
    m = aug.matrix()
    rng = np.random.default_rng(0)
    for u, v in rng.uniform(0, [1600, 900], size=(20, 2)):
        got = m @ [u, v, 1.0]
        np.testing.assert_allclose(got[:2], _steps(aug, u, v), atol=1e-9)
        assert got[2] == 1.0


def test_rotation_direction_is_counter_clockwise_on_screen():
    aug = ImageAug(resize=1.0, crop=(0, 0, 100, 100), rotate_deg=90.0)
    # The point right of the centre goes to the top (smaller v) under a CCW screen rotation.
    np.testing.assert_allclose((aug.matrix() @ [90.0, 50.0, 1.0])[:2], [50.0, 10.0], atol=1e-9)


def test_post_rot_trans_layout():
    aug = ImageAug(resize=0.5, crop=(0, 10, 704, 266), flip=True)
    post_rot, post_trans = aug.post_rot_trans()
    assert post_rot.shape == (3, 3) and post_trans.shape == (3,)
    np.testing.assert_allclose(post_rot[2], [0, 0, 1])
    assert post_trans[2] == 0
    assert aug.out_size == (704, 256)
