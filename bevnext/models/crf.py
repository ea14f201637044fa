"""Mean-field CRF refinement of the per-pixel depth distribution (the reference's "MeanField" module).

Each feature pixel ``p`` has a distribution ``Q_p`` over D depth bins. Starting from ``Q = softmax(logits)``, every
iteration gathers a colour-weighted message from the 3x3 neighbourhood (the pixel itself included) and penalises
depth bins far from the neighbours' beliefs::

    m_p     = w * sum_k K[k, p] * Q_{p + o_k}                 (o_k: the 9 offsets, zero outside the image)
    Q_p    <- softmax_over_depth(logits_p - M @ m_p)          (M[i, j] = |i - j|, the label compatibility)

with ``K[k, p] = exp(-|colour(p + o_k) - colour(p)|^2 / (2 zeta^2))`` from the 8x8 patch means of the key-frame
RGB canvas (0...255, zero outside the image; the centre tap is 1), and ``w`` a learnable scalar (init 0.015).

Memory. The reference gathers neighbours with a 3x3 ``unfold`` of the (B*N, D, h*w) beliefs every iteration and
lets autograd keep everything: about 12 belief-sized tensors per iteration, ~1.9 GB per sample for 20 iterations at
D = 118, 32 x 88, 6 cameras (see ``bench/crf.py``). Here the message is 9 shifted multiply-adds into one buffer
(no 9x expansion), and :func:`mean_field` is an autograd Function with its own backward that keeps only the
logits and the beliefs at every ``ceil(sqrt(T))``-th iteration; the backward recomputes one segment of iterations
at a time. Activation memory is ~``(1 + sqrt(T))`` belief-sized tensors, the price one extra CRF forward in the
backward (the CRF is cheap next to the convolutions around it). Results and gradients equal plain autograd's.

The CRF computes in at least float32 (under autocast too): with zeta = 0.001 the kernel is 0 or 1 except for
colour differences below ~1e-3, which half precision cannot resolve.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bevnext.errors import ConfigError

__all__ = ["NEIGHBOUR_OFFSETS", "MeanFieldCRF", "color_kernel", "label_compatibility", "mean_field", "patch_colors"]

# (dy, dx) of the 3x3 taps in row-major order (the order of a 3x3 unfold); index 4 is the pixel itself.
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def patch_colors(canvas: Tensor, patch_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Mean colour of every non-overlapping ``patch_size`` x ``patch_size`` patch.

    Args:
        canvas: (B*N, H, W, 3) RGB images, uint8 or float, values 0...255.
        patch_size: patch side; H and W must be multiples of it.
        dtype: float dtype of the result.

    Returns:
        (B*N, 3, H / patch_size, W / patch_size) patch means.
    """
    if canvas.dim() != 4 or canvas.shape[-1] != 3:
        raise ValueError(f"canvas must have shape (B*N, H, W, 3), got {tuple(canvas.shape)}")
    if canvas.shape[1] % patch_size or canvas.shape[2] % patch_size:
        raise ValueError(f"canvas size {tuple(canvas.shape[1:3])} is not a multiple of patch_size={patch_size}")
    return F.avg_pool2d(canvas.to(dtype).permute(0, 3, 1, 2), patch_size, stride=patch_size)


def color_kernel(colors: Tensor, zeta: float) -> Tensor:
    """Appearance affinities of every pixel to its 3x3 neighbours.

    Args:
        colors: (B*N, 3, h, w) patch colours.
        zeta: colour bandwidth.

    Returns:
        (B*N, 9, h, w): tap ``k`` (offset ``NEIGHBOUR_OFFSETS[k]``) holds ``exp(-sum_c (colour(p + o_k) -
        colour(p))^2 / (2 zeta^2))``, with colour 0 outside the image (as a zero-padded unfold gives).
    """
    h, w = colors.shape[-2:]
    padded = F.pad(colors, (1, 1, 1, 1))
    taps = []
    for dy, dx in NEIGHBOUR_OFFSETS:
        diff = padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] - colors
        taps.append(diff.square().sum(dim=1))
    return torch.exp(torch.stack(taps, dim=1) / (-2.0 * zeta * zeta))


def label_compatibility(depth_bins: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """(D, D) matrix ``|i - j|``: the penalty for bin i per unit of neighbour belief in bin j."""
    idx = torch.arange(depth_bins, device=device)
    return (idx[:, None] - idx[None, :]).abs().to(dtype)


def _message(q: Tensor, kernel: Tensor) -> Tensor:
    """``S(q)[p] = sum_k kernel[k, p] * q[p + o_k]`` (zero outside): (B*N, D, h, w)."""
    h, w = q.shape[-2:]
    padded = F.pad(q, (1, 1, 1, 1))
    out = torch.zeros_like(q)
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        out.addcmul_(padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w], kernel[:, k : k + 1])
    return out


def _message_adjoint(g: Tensor, kernel: Tensor) -> Tensor:
    """The transpose of :func:`_message`: ``S^T(g)[q] = sum_k kernel[k, q - o_k] * g[q - o_k]``."""
    h, w = g.shape[-2:]
    padded = g.new_zeros(*g.shape[:2], h + 2, w + 2)
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        # Pixel p sends kernel[k, p] * g[p] to p + o_k, i.e. padded position p + o_k + 1.
        padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w].addcmul_(g, kernel[:, k : k + 1])
    return padded[:, :, 1 : 1 + h, 1 : 1 + w].contiguous()


def _step(q: Tensor, logits: Tensor, kernel: Tensor, weight: Tensor, compat: Tensor) -> Tensor:
    """One mean-field update: softmax(logits - w * M @ S(q))."""
    pairwise = torch.matmul(compat, _message(q, kernel).flatten(2)).view_as(q)
    return torch.softmax(logits - weight * pairwise, dim=1)


def _softmax_backward(grad: Tensor, prob: Tensor) -> Tensor:
    """Gradient w.r.t. the softmax input (over dim 1) given the output ``prob`` and its gradient."""
    return prob * (grad - (grad * prob).sum(dim=1, keepdim=True))


class _MeanFieldFunction(torch.autograd.Function):
    """T mean-field iterations with segment-wise recomputation in the backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits, weight, kernel, compat, num_iters, segment):
        q = torch.softmax(logits, dim=1)
        checkpoints = []
        for t in range(num_iters):
            if t and t % segment == 0:
                checkpoints.append(q)  # the input of iteration t
            q = _step(q, logits, kernel, weight, compat)
        ctx.save_for_backward(logits, weight, kernel, compat, *checkpoints)
        ctx.num_iters, ctx.segment = num_iters, segment
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q):
        logits, weight, kernel, compat, *checkpoints = ctx.saved_tensors
        num_iters, segment = ctx.num_iters, ctx.segment
        with torch.autocast(device_type=logits.device.type, enabled=False):
            grad = grad_q.to(logits.dtype).contiguous()
            grad_logits = torch.zeros_like(logits)
            grad_weight = torch.zeros((), dtype=weight.dtype, device=weight.device)
            compat_t = compat.transpose(0, 1)
            q_first = torch.softmax(logits, dim=1)
            for seg_index in reversed(range(math.ceil(num_iters / segment))):
                start, stop = seg_index * segment, min((seg_index + 1) * segment, num_iters)
                # Recompute the beliefs of this segment: beliefs[i] is the input of iteration start + i.
                beliefs = [q_first if seg_index == 0 else checkpoints[seg_index - 1]]
                for _ in range(start, stop):
                    beliefs.append(_step(beliefs[-1], logits, kernel, weight, compat))
                for t in reversed(range(start, stop)):
                    q_in, q_out = beliefs[t - start], beliefs.pop()  # drop each output once used
                    grad_pre = _softmax_backward(grad, q_out)  # w.r.t. logits - w * M @ S(q_in)
                    grad_logits += grad_pre
                    grad_pairwise = torch.matmul(compat_t, grad_pre.flatten(2)).view_as(grad_pre)
                    grad_weight -= (grad_pairwise * _message(q_in, kernel)).sum()
                    grad = _message_adjoint(grad_pairwise, kernel).mul_(-weight)
            grad_logits += _softmax_backward(grad, q_first)
        return grad_logits, grad_weight.reshape(weight.shape), None, None, None, None


def mean_field(
    logits: Tensor, kernel: Tensor, weight: Tensor, compat: Tensor, num_iters: int, segment: int | None = None
) -> Tensor:
    """Mean-field inference over depth bins with a 3x3 appearance kernel.

    Differentiable w.r.t. ``logits`` and ``weight``; the backward keeps only ``logits`` and every
    ``segment``-th belief and recomputes the rest (module docstring).

    Args:
        logits: (B*N, D, h, w) unary depth scores.
        kernel: (B*N, 9, h, w) neighbour affinities from :func:`color_kernel` (no gradient).
        weight: (1,) message weight w.
        compat: (D, D) label compatibility M (no gradient).
        num_iters: T >= 0 iterations.
        segment: iterations per recomputation segment; None = ``ceil(sqrt(T))`` (fewest kept beliefs).

    Returns:
        (B*N, D, h, w) depth probabilities (softmax over D).
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape (B*N, D, h, w), got {tuple(logits.shape)}")
    BN, D, h, w = logits.shape
    if tuple(kernel.shape) != (BN, len(NEIGHBOUR_OFFSETS), h, w):
        raise ValueError(f"kernel must have shape {(BN, len(NEIGHBOUR_OFFSETS), h, w)}, got {tuple(kernel.shape)}")
    if tuple(compat.shape) != (D, D):
        raise ValueError(f"compat must have shape {(D, D)}, got {tuple(compat.shape)}")
    if weight.numel() != 1:
        raise ValueError(f"weight must hold one value, got shape {tuple(weight.shape)}")
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    if segment is None:
        segment = max(1, math.ceil(math.sqrt(num_iters)))
    kernel, compat = kernel.detach(), compat.detach()
    if torch.is_grad_enabled() and (logits.requires_grad or weight.requires_grad):
        return _MeanFieldFunction.apply(logits, weight.reshape(1), kernel, compat, num_iters, segment)
    q = torch.softmax(logits, dim=1)
    for _ in range(num_iters):
        q = _step(q, logits, kernel, weight.reshape(1), compat)
    return q


class MeanFieldCRF(nn.Module):
    """Colour-guided mean-field refinement of depth distributions.

    The one learnable value is stored as ``ws.0`` (shape [1]), the reference's state-dict name.

    Args:
        num_iters: mean-field iterations (20).
        zeta: colour bandwidth of the appearance kernel, in 0...255 colour units (0.001).
        init_weight: initial message weight w (0.015).
        patch_size: side of the colour patches = the feature stride (8).
        depth_bins: D (118).
    """

    def __init__(
        self,
        num_iters: int = 20,
        zeta: float = 0.001,
        init_weight: float = 0.015,
        patch_size: int = 8,
        depth_bins: int = 118,
    ) -> None:
        super().__init__()
        if num_iters < 0:
            raise ConfigError(f"crf num_iters must be >= 0, got {num_iters}")
        if not zeta > 0:
            raise ConfigError(f"crf zeta must be positive, got {zeta}")
        if patch_size < 1:
            raise ConfigError(f"crf patch_size must be positive, got {patch_size}")
        if depth_bins < 1:
            raise ConfigError(f"crf depth_bins must be positive, got {depth_bins}")
        self.num_iters = num_iters
        self.zeta = zeta
        self.patch_size = patch_size
        self.depth_bins = depth_bins
        self.ws = nn.ParameterList([nn.Parameter(torch.full((1,), float(init_weight)))])
        self.register_buffer("compat", label_compatibility(depth_bins), persistent=False)

    def forward(self, depth_logits: Tensor, canvas: Tensor) -> Tensor:
        """Refine depth distributions.

        Args:
            depth_logits: (B*N, D, h, w) depth scores of every camera.
            canvas: (B*N, h * patch_size, w * patch_size, 3) RGB images (uint8 or float, 0...255) of the same
                cameras; the reference passes the key frame's images for every frame.

        Returns:
            (B*N, D, h, w) depth probabilities (float32, or float64 for float64 logits).
        """
        BN, D, h, w = depth_logits.shape
        if D != self.depth_bins:
            raise ValueError(f"depth_logits have {D} bins, the CRF was built for {self.depth_bins}")
        if tuple(canvas.shape[:3]) != (BN, h * self.patch_size, w * self.patch_size):
            raise ValueError(
                f"canvas {tuple(canvas.shape)} does not match depth_logits {tuple(depth_logits.shape)} with "
                f"patch_size={self.patch_size}: expected ({BN}, {h * self.patch_size}, {w * self.patch_size}, 3)"
            )
        dtype = torch.promote_types(depth_logits.dtype, torch.float32)
        with torch.autocast(device_type=depth_logits.device.type, enabled=False):
            with torch.no_grad():
                kernel = color_kernel(patch_colors(canvas, self.patch_size, dtype), self.zeta)
            return mean_field(
                depth_logits.to(dtype), kernel, self.ws[0].to(dtype), self.compat.to(dtype), self.num_iters
            )

    def extra_repr(self) -> str:
        return (
            f"num_iters={self.num_iters}, zeta={self.zeta}, patch_size={self.patch_size}, depth_bins={self.depth_bins}"
        )
