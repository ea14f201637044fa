"""Reuse of per-image features across the samples of a scene at test time (stage 2's history frames).

A stage-2 sample carries its key frame and the eight previous key frames of its scene; the next sample of the
scene carries the same frames shifted by one. Without augmentation (the test pipeline) the part of a frame's
computation that depends only on that frame's images — the image backbone, the image neck and the depth net's
first 3x3 reduction — is therefore the same every time the frame returns, and is computed once and kept while the
window still needs it.

The rest of a frame's path depends on the sample it appears in, so it is recomputed: the depth net's
camera-aware input uses the current key frame's extrinsics for every frame (a reference quirk), the CRF is
guided by the current key frame's colours (another one), and lifting uses the frame's pose relative to the
current key frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["ImageFeatureCache"]


class ImageFeatureCache:
    """Image-only features of the frames of the current window, keyed by the frame's sample token.

    Valid only when a token always stands for the same input images, i.e. under the test pipeline (no
    augmentation); the detector refuses it in training mode.

    Attributes:
        hits: frames served from the cache so far (one per sample and frame).
        misses: frames computed so far.
    """

    def __init__(self) -> None:
        self._features: dict[str, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._features)

    def features(self, images: Tensor, tokens: Sequence[str], compute: Callable[[Tensor], Tensor]) -> Tensor:
        """The features of one frame of a batch, computing only those not kept yet.

        Args:
            images: (B, N, 3, H, W) this frame's normalised images.
            tokens: B sample tokens, the frame of each sample (``meta["frame_tokens"][f]``).
            compute: (B'*N, 3, H, W) -> (B'*N, C, h, w), the image-only part of the model.

        Returns:
            (B*N, C, h, w), sample-major as ``compute`` would return it for all of ``images``.
        """
        if len(tokens) != images.shape[0]:
            raise ValueError(f"got {len(tokens)} frame tokens for a batch of {images.shape[0]}")
        num_cams = images.shape[1]
        # A token may appear twice in a batch (a scene start repeats its key frame): compute it once.
        first: dict[str, int] = {}
        for i, token in enumerate(tokens):
            if token not in self._features:
                first.setdefault(token, i)
        todo = sorted(first.values())
        if todo:
            computed = compute(images[todo].flatten(0, 1))
            for k, i in enumerate(todo):
                self._features[tokens[i]] = computed[k * num_cams:(k + 1) * num_cams]
        self.misses += len(todo)
        self.hits += len(tokens) - len(todo)
        kept = [self._features[token] for token in tokens]
        return kept[0] if len(kept) == 1 else torch.cat(kept)  # batch 1 (the eval default): no copy

    def keep_only(self, tokens: Iterable[str]) -> None:
        """Forget every frame not in ``tokens`` (call after each batch with all its frame tokens)."""
        keep = set(tokens)
        for token in [t for t in self._features if t not in keep]:
            del self._features[token]

    def clear(self) -> None:
        self._features.clear()
