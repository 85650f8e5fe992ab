"""Fused CPU loops (numba) for the memory-bound steps of the per-sample augmentation, used on CPU tensors.

Written by hand because no maintained library does these on whole uint8 batches with per-sample parameters, and in
eager PyTorch each is several passes over the batch plus an int64 index tensor: a random crop is a pad, a row of
indices per image and a gather; a per-image lookup table is an int64 copy of the images and a gather; normalising is
a conversion, a multiply and an add. A compiled loop does each in one pass: 2-7x faster per step on this project's
2-core CPU, the whole training augmentation about 1.6x (benchmarks/bench_augment.py prints both paths).

Every kernel returns exactly the values of the PyTorch code it replaces (tests/test_cpu_kernels.py); that code
stays the path for CUDA tensors, and for CPUs where numba is missing or SMALLVIT_NUMBA=0. The random draws are
made by the callers with torch generators, so a seed gives the same images on either path.
Compiled on first use and cached on disk by numba (about a second per kernel).
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    import numba
except ImportError:  # the PyTorch path does everything, only slower
    numba = None

# Module-level switch (tests flip it to compare both paths); SMALLVIT_NUMBA=0 turns the kernels off.
ENABLED = numba is not None and os.environ.get("SMALLVIT_NUMBA", "1") != "0"


def _jit(fn):
    # nogil: the loops hold no Python objects; cache: compiled once per machine, not per process.
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache folder (numba: "no locator available"): compile in every process
        return numba.njit(nogil=True)(fn)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels run for these tensors: enabled, and every tensor in CPU memory."""
    return ENABLED and all(t.device.type == "cpu" for t in tensors)


@_jit
def _crop_flip(x, flip, oy, ox, pad, out):  # pragma: no cover - compiled
    B, C, H, W = x.shape
    for b in range(B):
        dy = oy[b] - pad
        dx = ox[b] - pad
        f = flip[b]
        for c in range(C):
            for i in range(H):
                si = i + dy
                if si < 0 or si >= H:
                    for j in range(W):
                        out[b, c, i, j] = 0
                    continue
                for j in range(W):
                    jj = j + dx
                    sj = W - 1 - jj if f else jj
                    out[b, c, i, j] = x[b, c, si, sj] if 0 <= sj < W else 0


def crop_flip(x: torch.Tensor, flip: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, pad: int) -> torch.Tensor:
    """Per sample: flip horizontally where flip (B,) is set, then crop at (oy, ox) of the image zero-padded by pad."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _crop_flip(x.numpy(), flip.to(torch.bool).contiguous().numpy(), oy.contiguous().numpy(),
               ox.contiguous().numpy(), pad, out.numpy())
    return out


@_jit
def _apply_lut(x, lut, out):  # pragma: no cover - compiled
    N, C, H, W = x.shape
    for n in range(N):
        for c in range(C):
            t = lut[n, c]
            for i in range(H):
                for j in range(W):
                    out[n, c, i, j] = t[x[n, c, i, j]]


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Map every pixel of uint8 images (N, C, H, W) through its image's and channel's table, lut (N, C, 256) uint8."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _apply_lut(x.numpy(), lut.contiguous().numpy(), out.numpy())
    return out


@_jit
def _source_position(M, n, i, j, H, W, K):  # pragma: no cover - compiled
    """warp._source for output pixel (i, j) of image n: 2K x (source column, source row), int64."""
    X, Y = 2 * j + 1 - W, 2 * i + 1 - H
    px = M[n, 0, 0] * X + M[n, 0, 1] * Y + M[n, 0, 2] + (W - 1) * K
    py = M[n, 1, 0] * X + M[n, 1, 1] * Y + M[n, 1, 2] + (H - 1) * K
    return px, py


@_jit
def _warp_nearest(x, M, shift, fill, out):  # pragma: no cover - compiled
    N, C, H, W = x.shape
    K = np.int64(1) << shift
    mask = 2 * K - 1  # positions in units of 1 / (2K) pixel; round half to even at K
    src = np.empty(H * W, np.int64)  # the source pixel of each output pixel, -1 outside: then channel by channel
    for n in range(N):
        dx, dy = 2 * M[n, 0, 0], 2 * M[n, 1, 0]  # one column to the right: X grows by 2
        for i in range(H):
            px, py = _source_position(M, n, i, 0, H, W, K)
            for j in range(W):
                col, rc = px >> (shift + 1), px & mask
                row, rr = py >> (shift + 1), py & mask
                col += 1 if rc > K or (rc == K and col & 1 == 1) else 0
                row += 1 if rr > K or (rr == K and row & 1 == 1) else 0
                src[i * W + j] = row * W + col if 0 <= col < W and 0 <= row < H else -1
                px += dx
                py += dy
        for c in range(C):
            xc, oc = x[n, c].ravel(), out[n, c].ravel()
            for k in range(H * W):
                oc[k] = xc[src[k]] if src[k] >= 0 else fill


def warp_nearest(x: torch.Tensor, M: torch.Tensor, fill: int) -> torch.Tensor:
    """warp.nearest in one compiled pass: uint8 images resampled through integer maps M (N, 2, 3) (warp.py), the
    same integer arithmetic; pixels whose source is outside the image get `fill`."""
    from .warp import SHIFT

    x = x.contiguous()
    out = torch.empty_like(x)
    _warp_nearest(x.numpy(), M.long().contiguous().numpy(), SHIFT, fill, out.numpy())
    return out


@_jit
def _warp_bilinear(x, M, shift, frac, fill, out):  # pragma: no cover - compiled
    N, C, H, W = x.shape
    K = np.int64(1) << shift
    one, drop = np.int64(1) << frac, shift + 1 - frac
    half = np.int64(1) << (2 * frac - 1)
    taps = np.empty((H * W, 4), np.int64)  # the four neighbours' flat indices and weights, per pixel
    weights = np.empty((H * W, 4), np.int64)
    for n in range(N):
        dx, dy = 2 * M[n, 0, 0], 2 * M[n, 1, 0]
        for i in range(H):
            px0, py0 = _source_position(M, n, i, 0, H, W, K)
            for j in range(W):
                px, py = (px0 + j * dx) >> drop, (py0 + j * dy) >> drop  # 2^-frac pixel, rounded down
                c0, fx = px >> frac, px & (one - 1)
                r0, fy = py >> frac, py & (one - 1)
                k = i * W + j
                for t in range(4):  # a neighbour outside the image counts as fill: weight 0 on a valid index
                    r, cc = r0 + (t >> 1), c0 + (t & 1)
                    inside = 0 <= cc < W and 0 <= r < H
                    taps[k, t] = r * W + cc if inside else 0
                    weights[k, t] = (fy if t >> 1 else one - fy) * (fx if t & 1 else one - fx) if inside else 0
        for c in range(C):
            xc, oc = x[n, c].ravel(), out[n, c].ravel()
            for k in range(H * W):
                acc = np.int64(0)
                for t in range(4):
                    acc += (np.int64(xc[taps[k, t]]) - fill) * weights[k, t]
                q, rem = acc >> (2 * frac), acc & (2 * half - 1)
                q += 1 if rem > half or (rem == half and q & 1 == 1) else 0
                oc[k] = q + fill


def warp_bilinear(x: torch.Tensor, M: torch.Tensor, fill: int) -> torch.Tensor:
    """warp.bilinear in one compiled pass (the same integer taps, weights and rounding)."""
    from .warp import FRAC, SHIFT

    x = x.contiguous()
    out = torch.empty_like(x)
    _warp_bilinear(x.numpy(), M.long().contiguous().numpy(), SHIFT, FRAC, fill, out.numpy())
    return out


@_jit
def _histograms(x, out):  # pragma: no cover - compiled
    N, C, H, W = x.shape
    for n in range(N):
        for c in range(C):
            h = out[n, c]
            for i in range(H):
                for j in range(W):
                    h[x[n, c, i, j]] += 1


def histograms(x: torch.Tensor) -> torch.Tensor:
    """Counts of each value 0..255 per image and channel of uint8 images: (N, C, 256) int32."""
    x = x.contiguous()
    out = torch.zeros(*x.shape[:2], 256, dtype=torch.int32)
    _histograms(x.numpy(), out.numpy())
    return out


# Point ops in autoaugment.POINT order; point_ops computes each table as autoaugment._point_lut does.
BRIGHTNESS, CONTRAST, POSTERIZE, SOLARIZE, AUTOCONTRAST, EQUALIZE, INVERT = range(7)


@_jit
def _blend_table(f, degenerate, table):  # pragma: no cover - compiled
    # autoaugment._blend on the values 0..255: x + (degenerate - x)(1 - f), clamped, truncated; float32 throughout
    w = np.float32(1) - f
    for v in range(256):
        x = np.float32(v)
        y = x + (degenerate - x) * w
        table[v] = np.uint8(min(max(y, np.float32(0)), np.float32(255)))


@_jit
def _point_ops(x, codes, values, means, out):  # pragma: no cover - compiled
    N, C, HW = x.shape
    table = np.empty(256, np.uint8)
    hist = np.empty(256, np.float32)
    for n in range(N):
        code, value = codes[n], values[n]
        for c in range(C):
            img = x[n, c]
            if code == BRIGHTNESS:
                _blend_table(np.float32(1) + value, np.float32(0), table)
            elif code == CONTRAST:
                _blend_table(np.float32(1) + value, means[n], table)
            elif code == POSTERIZE:
                keep = np.uint8(np.float32(256) - np.exp2(np.float32(8) - value))
                for v in range(256):
                    table[v] = np.uint8(v) & keep
            elif code == SOLARIZE:
                for v in range(256):
                    table[v] = 255 - v if np.float32(v) >= value else v
            elif code == INVERT:
                for v in range(256):
                    table[v] = 255 - v
            else:  # per-channel statistics: autocontrast (min, max) and equalize (histogram)
                lo, hi = img[0], img[0]
                for k in range(HW):
                    lo = min(lo, img[k])
                    hi = max(hi, img[k])
                if code == AUTOCONTRAST:
                    flo, fhi = np.float32(lo), np.float32(hi)
                    flat = fhi == flo
                    scale = np.float32(1) if flat else (fhi - flo) * np.float32(1.0 / 255.0)
                    off = np.float32(0) if flat else flo
                    for v in range(256):
                        y = (np.float32(v) - off) / scale
                        table[v] = np.uint8(min(max(y, np.float32(0)), np.float32(255)))
                else:  # EQUALIZE
                    hist[:] = 0
                    for k in range(HW):
                        hist[img[k]] += 1
                    step = np.floor((np.float32(HW) - hist[hi]) / np.float32(255))
                    half = np.floor(step / np.float32(2))
                    div = max(step, np.float32(1))
                    below = np.float32(0)  # counts of the values below v: whole numbers, exact in float32
                    for v in range(256):
                        t = min(np.floor((below + half) / div), np.float32(255))
                        table[v] = np.uint8(t) if step > 0 else v
                        below += hist[v]
            o = out[n, c]
            for k in range(HW):
                o[k] = table[img[k]]


def point_ops(x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Each uint8 image (N, C, H, W) through its point op (codes (N,) in autoaugment.POINT order) with its value
    (N,), in one pass: the table of autoaugment._point_lut, then the lookup. means (N,) is the grey mean that
    contrast blends with (autoaugment computes it, so that its float rounding is PyTorch's)."""
    x = x.contiguous()
    N, C, H, W = x.shape
    out = torch.empty_like(x)
    _point_ops(x.view(N, C, H * W).numpy(), codes.to(torch.int64).contiguous().numpy(),
               values.float().contiguous().numpy(), means.float().contiguous().numpy(), out.view(N, C, H * W).numpy())
    return out


@_jit
def _normalise(x, scale, shift, out):  # pragma: no cover - compiled
    N, C, H, W = x.shape
    for n in range(N):
        for c in range(C):
            s = scale[c]
            t = shift[c]
            for i in range(H):
                for j in range(W):
                    out[n, c, i, j] = np.float32(x[n, c, i, j]) * s + t  # float32 multiply, then add: no fused FMA


def normalise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 x * scale[c] + shift[c], as x.float().mul_(scale).add_(shift) computes it."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    _normalise(x.numpy(), scale.reshape(-1).float().contiguous().numpy(),
               shift.reshape(-1).float().contiguous().numpy(), out.numpy())
    return out


@_jit
def _fill_boxes(x, boxes, fill):  # pragma: no cover - compiled
    N, C, H, W = x.shape
    for n in range(N):
        if boxes[n, 4] == 0:
            continue
        y0, y1, x0, x1 = int(boxes[n, 0]), int(boxes[n, 1]), int(boxes[n, 2]), int(boxes[n, 3])
        for c in range(C):
            v = fill[c]
            for i in range(y0, y1):
                for j in range(x0, x1):
                    x[n, c, i, j] = v


def fill_boxes(x: torch.Tensor, boxes: np.ndarray, fill: torch.Tensor) -> torch.Tensor:
    """In place: write fill[c] into rows y0:y1, columns x0:x1 of every image whose boxes row (y0, y1, x0, x1, erase)
    has erase set. x is a contiguous float32 batch (N, C, H, W); fill has C values."""
    if not x.is_contiguous():
        raise ValueError("fill_boxes writes in place and needs a contiguous batch")
    _fill_boxes(x.numpy(), np.ascontiguousarray(boxes, dtype=np.float32),
                fill.reshape(-1).to(x.dtype).expand(x.shape[1]).contiguous().numpy())
    return x
