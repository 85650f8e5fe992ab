"""Affine resampling of uint8 image batches in exact integer arithmetic (nearest and bilinear), one map per image.

Why not grid_sample: its sampling coordinates are float32 sums of products, so which source pixel a
nearest-neighbour warp reads, and how a bilinear value rounds, depends on the order of operations: BLAS blocking in
the grid matmul, FMA or not, and the vector-or-scalar code path an element falls into, which changes with the batch's
composition. Two runs that must give the same images (the CPU and CUDA paths, the sync-free and the grouped
AutoAugment paths, a resumed run on another machine) then disagree in a few pixels (issue "Reproducible anywhere").
Here every map is a matrix of integers in units of 1/K (K = 2^16), and the source position of every output pixel,
its rounding and the bilinear weights and sums are integer operations, identical on every machine and device.

Coordinates are doubled and centred: output pixel (row i, column j) of an H x W image is (X, Y) = (2j + 1 - W,
2i + 1 - H), so pixel centres are odd integers and the image centre is 0. A map M (N, 2, 3) sends (X, Y) to the
source position (M00 X + M01 Y + M02, M10 X + M11 Y + M12) / K in the same units; the source pixel column is then
(Xs + W - 1) / 2, as in grid_sample with align_corners=False. Nearest rounds half to even (grid_sample's
nearbyint); bilinear reads the position to 2^-11 pixel (rounded down) and rounds the weighted sum half to even.
Pixels whose source lies outside the image take `fill`.

Only the float-to-fixed step of a map touches floating point (rotate's cos and sin, in float64): a 1-ulp difference
there changes an entry only within 2^-36 of a rounding boundary, and `tests/test_autoaugment.py` checks that every
angle and shear the policies can draw is far from one.
"""

from __future__ import annotations

import functools

import torch

SHIFT = 16
K = 1 << SHIFT  # fixed-point scale of a map's entries


def fixed(v: torch.Tensor) -> torch.Tensor:
    """Round float values to the nearest multiple of 1/K (half to even), as int64; float64 scaling by K is exact."""
    return torch.round(v.double() * K).long()


def identity(n: int, device: torch.device) -> torch.Tensor:
    """n identity maps (n, 2, 3) int64."""
    return (torch.eye(2, 3, dtype=torch.int64, device=device) * K).expand(n, 2, 3)


def shear_x(v: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """x_in = x + v y with the origin at the top-left corner (PIL's affine), y_in = y."""
    s = fixed(v)
    one, zero = torch.full_like(s, K), torch.zeros_like(s)
    return torch.stack([one, s, s * H, zero, one, zero], 1).view(-1, 2, 3)


def shear_y(v: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """y_in = y + v x with the origin at the top-left corner, x_in = x."""
    s = fixed(v)
    one, zero = torch.full_like(s, K), torch.zeros_like(s)
    return torch.stack([one, zero, zero, s, one, s * W], 1).view(-1, 2, 3)


def translate(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift by whole pixels (dx, dy) (int64): output (x, y) reads input (x - dx, y - dy)."""
    one, zero = torch.full_like(dx, K), torch.zeros_like(dx)
    return torch.stack([one, zero, -2 * K * dx, zero, one, -2 * K * dy], 1).view(-1, 2, 3)


def rotate(degrees: torch.Tensor) -> torch.Tensor:
    """Rotation about the image centre, positive = counter-clockwise on screen (PIL's and torchvision's sign)."""
    a = torch.deg2rad(degrees.double())
    c, s = fixed(a.cos()), fixed(a.sin())
    zero = torch.zeros_like(c)
    return torch.stack([c, -s, zero, s, c, zero], 1).view(-1, 2, 3)


@functools.cache
def _centres(H: int, W: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Doubled centred coordinates (X, Y) of every output pixel, each (1, H * W) int64."""
    X = (torch.arange(W, device=device) * 2 + 1 - W).repeat(H)
    Y = (torch.arange(H, device=device) * 2 + 1 - H).repeat_interleave(W)
    return X.view(1, -1), Y.view(1, -1)


def _source(M: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source positions of every output pixel as 2K x (pixel column, pixel row), int64 (N, H * W) each."""
    X, Y = _centres(H, W, M.device)
    px = M[:, 0, 0:1] * X + M[:, 0, 1:2] * Y + (M[:, 0, 2:3] + (W - 1) * K)
    py = M[:, 1, 0:1] * X + M[:, 1, 1:2] * Y + (M[:, 1, 2:3] + (H - 1) * K)
    return px, py


def _round_shift(v: torch.Tensor, shift: int) -> torch.Tensor:
    """v / 2^shift rounded half to even, for integer v of any sign (arithmetic shifts: exact everywhere)."""
    q = v >> shift
    r = v & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    return q + ((r > half) | ((r == half) & (q & 1 == 1))).to(v.dtype)


def nearest(x: torch.Tensor, M: torch.Tensor, fill: int) -> torch.Tensor:
    """Resample uint8 images (N, C, H, W) through integer maps M (N, 2, 3) with nearest-neighbour sampling."""
    N, C, H, W = x.shape
    px, py = _source(M, H, W)
    col, row = _round_shift(px, SHIFT + 1), _round_shift(py, SHIFT + 1)
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    src = torch.where(inside, row * W + col, 0)
    out = x.reshape(N, C, H * W).gather(2, src.unsqueeze(1).expand(N, C, H * W))
    return torch.where(inside.unsqueeze(1), out, fill).view(N, C, H, W)


FRAC = 11  # bilinear weights in units of 2^-FRAC pixel: 4 products of 2 weights and a value stay within int32


def bilinear_taps(M: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, ...]:
    """Top-left source pixel (column, row) and the position's fraction in units of 2^-FRAC, int32 (N, H * W) each.
    The fraction is the exact position rounded down to 2^-FRAC pixel (an integer shift: the same everywhere)."""
    px, py = _source(M, H, W)
    drop = SHIFT + 1 - FRAC
    px, py = px >> drop, py >> drop  # now in units of 2^-FRAC pixel
    mask = (1 << FRAC) - 1
    return ((px >> FRAC).int(), (py >> FRAC).int(), (px & mask).int(), (py & mask).int())


def bilinear(x: torch.Tensor, M: torch.Tensor, fill: int) -> torch.Tensor:
    """Resample uint8 images (N, C, H, W) through integer maps M (N, 2, 3) with bilinear sampling: each of the four
    neighbours of the source position weighs its share in whole units of 2^-2FRAC; neighbours outside the image
    count as `fill` (PyTorch's constant padding), and the weighted sum is rounded half to even."""
    N, C, H, W = x.shape
    c0, r0, fx, fy = bilinear_taps(M, H, W)
    one = 1 << FRAC
    flat = x.reshape(N, C, H * W).int() - fill  # fill counts as 0: the constant-padding blend
    acc = torch.zeros(N, C, H * W, dtype=torch.int32, device=x.device)
    for dr, wy in ((0, one - fy), (1, fy)):
        for dc, wx in ((0, one - fx), (1, fx)):
            r, c = r0 + dr, c0 + dc
            inside = (c >= 0) & (c < W) & (r >= 0) & (r < H)
            v = flat.gather(2, torch.where(inside, r * W + c, 0).long().unsqueeze(1).expand(N, C, H * W))
            acc += v * torch.where(inside, wx * wy, 0).unsqueeze(1)
    return (_round_shift(acc, 2 * FRAC) + fill).to(torch.uint8).view(N, C, H, W)

