"""Batched training augmentation on the training device, with independent random parameters per sample.

Written by hand because no maintained library does per-sample random crop / erasing on a whole batch
of tensors on the GPU (torchvision v2 draws one parameter set per call; timm's Mixup works per batch
but on CPU-side numpy RNG). Semantics follow reference §5.3-5.4; the order is the reference's:
flip -> pad-crop -> AutoAugment (uint8) -> normalise -> Random Erasing -> Mixup/CutMix.

All randomness comes from generators reseeded from (seed, step), so a resumed run augments exactly as an
uninterrupted one would. Under torchrun every per-sample parameter is drawn for the whole global batch and cut to
this process's shard (data.Shard), and Mixup/CutMix partners are taken from the whole global batch, so a sample is
augmented the same on any number of processes.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from . import cpu_kernels
from .config import AugConfig
from .data import Shard


@functools.cache
def _crop_flip_index(H: int, W: int, pad: int, device: torch.device) -> torch.Tensor:
    """For every (flip, oy, ox): the flat index into the padded image of each output pixel, (2, 2p+1, 2p+1, H * W).

    Output pixel (i, j) reads padded pixel (i + oy, j + ox), or (i + oy, Wp - 1 - ox - j) when flipped (flipping then
    padding = padding then flipping). 2 x 81 x 1024 entries for CIFAR: built once, then one row per sample.
    """
    Wp, k = W + 2 * pad, 2 * pad + 1
    o = torch.arange(k, device=device)
    i, j = torch.arange(H, device=device), torch.arange(W, device=device)
    rows = (o.view(k, 1, 1) + i.view(1, H, 1)) * Wp  # (oy, i, 1)
    cols = torch.stack([o.view(k, 1) + j, Wp - 1 - o.view(k, 1) - j])  # (flip, ox, j)
    return (rows.view(1, k, 1, H, 1) + cols.view(2, 1, k, 1, W)).reshape(2, k, k, H * W)


def crop_flip(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator, shard: Shard | None = None
              ) -> torch.Tensor:
    """Per-sample horizontal flip with p = 0.5, then a random crop after zero padding `pad`. Keeps dtype.

    Both are one gather from the padded batch through a precomputed index row per (flip, oy, ox). With a shard,
    x is that shard's rows and the parameters are drawn for the global batches (data.Shard).
    """
    B, C, H, W = x.shape
    dev = x.device
    n, pick = (B, _all) if shard is None else (shard.global_n(B), shard.pick)
    do = pick((torch.rand(n, device=dev, generator=g) < 0.5).long()) if flip else torch.zeros(B, dtype=torch.long,
                                                                                             device=dev)
    if pad == 0 and not flip:
        return x
    k = 2 * pad + 1
    oy = pick(torch.randint(0, k, (n,), device=dev, generator=g))
    ox = pick(torch.randint(0, k, (n,), device=dev, generator=g))
    if cpu_kernels.usable(x):  # one pass, the same images (cpu_kernels.py)
        return cpu_kernels.crop_flip(x, do, oy, ox, pad)
    index = _crop_flip_index(H, W, pad, dev).view(2 * k * k, H * W).index_select(0, (do * k + oy) * k + ox)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x  # zero (black) padding, as the reference
    return xp.reshape(B, C, -1).gather(2, index.view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)


def normalise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 x * scale + shift, scale and shift (1, C, 1, 1): (x / 255 - mean) / std in one
    multiply-add. One fused pass on CPU (cpu_kernels), the same values."""
    if cpu_kernels.usable(x):
        return cpu_kernels.normalise(x, scale, shift)
    return x.float().mul_(scale).add_(shift)


def erase_boxes(n: int, H: int, W: int, cfg: AugConfig, rng: np.random.Generator, attempts: int = 10) -> np.ndarray:
    """Random Erasing rectangles (reference §5.3.3) for n images: float32 (n, 5) rows of y0, y1, x0, x1, erase (0 or 1).

    Up to `attempts` boxes are drawn per image and the first that fits is used (the reference tries 100 times one by
    one; with these ranges 10 tries fail for fewer than 1 in 10^6 images, which are left unchanged). Drawn on the
    host, like the Mixup/CutMix decisions: a few small arrays, so the same seed erases the same boxes on any device.
    """
    lo, hi = cfg.erase_area
    r1 = cfg.erase_min_aspect
    area = rng.uniform(lo, hi, (n, attempts)) * H * W
    u = rng.random((n, attempts))
    if cfg.erase_log_aspect:
        aspect = np.exp(math.log(r1) + (math.log(1 / r1) - math.log(r1)) * u)
    else:  # the reference: uniform on [r1, 1/r1]
        aspect = r1 + (1 / r1 - r1) * u
    h, w = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))
    ok = (h < H) & (w < W) & (h > 0) & (w > 0)
    first = ok.argmax(1)  # the first box that fits (0 when none does; then nothing is erased)
    h, w = h[np.arange(n), first], w[np.arange(n), first]
    erase = (rng.random(n) < cfg.erase_p) & ok.any(1)
    y0 = np.floor(rng.random(n) * np.maximum(H - h + 1, 1))
    x0 = np.floor(rng.random(n) * np.maximum(W - w + 1, 1))
    return np.stack([y0, y0 + h, x0, x0 + w, erase], 1).astype(np.float32)


def random_erasing(x: torch.Tensor, cfg: AugConfig, fill_mean: torch.Tensor, rng: np.random.Generator,
                   g: torch.Generator | None = None, inplace: bool = False, shard: Shard | None = None
                   ) -> torch.Tensor:
    """Random Erasing on a normalised float batch (reference §5.3.3), one rectangle per selected sample (erase_boxes).

    The fill is the reference's (the raw dataset mean written into normalised space), zero, or Gaussian noise drawn
    from the device generator `g` for the erased samples only. inplace=True writes into x. With a shard, x is that
    shard's rows and boxes and noise are drawn for the global batches (data.Shard).
    """
    B, C, H, W = x.shape
    dev = x.device
    n, pick = (B, _all) if shard is None else (shard.global_n(B), shard.pick)
    drawn = erase_boxes(n, H, W, cfg, rng)
    boxes = pick(drawn)
    rows = np.flatnonzero(boxes[:, 4])
    out = x if inplace else x.clone()
    if rows.size == 0:
        return out
    if cfg.erase_fill != "noise" and cpu_kernels.usable(out) and out.is_contiguous() and out.dtype == torch.float32:
        return cpu_kernels.fill_boxes(out, boxes, fill_mean if cfg.erase_fill == "reference" else torch.zeros(C))
    # Only the erased samples (a quarter at the default p) are picked out, erased and written back; the rows are
    # known on the host, so this needs no device sync.
    idx = torch.from_numpy(rows).to(dev, non_blocking=True)
    box = torch.from_numpy(boxes[rows]).to(dev, non_blocking=True)  # no wait for the device
    ys = torch.arange(H, device=dev, dtype=torch.float32)
    xs = torch.arange(W, device=dev, dtype=torch.float32)
    my = ((ys >= box[:, 0:1]) & (ys < box[:, 1:2])).float()  # (n, H)
    mx = ((xs >= box[:, 2:3]) & (xs < box[:, 3:4])).float()  # (n, W)
    mask = (my[:, :, None] * mx[:, None, :])[:, None]  # (n, 1, H, W), 0 or 1
    if cfg.erase_fill == "reference":  # raw dataset mean written into normalised space (reference §5.3.3)
        fill = fill_mean.view(1, C, 1, 1).to(x.dtype).expand(1, C, 1, 1)
    elif cfg.erase_fill == "zero":
        fill = x.new_zeros(1, 1, 1, 1).expand(1, C, 1, 1)
    else:  # noise for every erased sample of the global batches, then the shard's own
        erased_before = np.cumsum(drawn[:, 4]).astype(np.int64) - 1  # each sample's place among the erased ones
        noise = torch.randn((int(drawn[:, 4].sum()), C, H, W), device=dev, generator=g, dtype=x.dtype)
        fill = noise if shard is None else noise[torch.from_numpy(pick(erased_before)[rows]).to(dev)]
    # Rows copied as 8-byte words where they divide evenly (faster on CPU than 4-byte elements); an in-place lerp with
    # a 0/1 weight is exact (weight 1 writes `fill`) and, on CPU, ~10x faster than torch.where.
    flat = out.view(B, C * H * W)
    wide = flat.view(torch.int64) if out.element_size() == 4 and (C * H * W) % 2 == 0 and out.is_contiguous() else flat
    erased = wide.index_select(0, idx).view(out.dtype).view(rows.size, C, H, W).lerp_(fill, mask)
    wide.index_copy_(0, idx, erased.view(rows.size, -1).view(wide.dtype))
    return out


def smooth_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(1 - eps) * onehot + eps / K (reference §5.6)."""
    t = torch.full((y.shape[0], num_classes), smoothing / num_classes, device=y.device)
    return t.scatter_(1, y[:, None], 1.0 - smoothing + smoothing / num_classes)


def cutmix_box(H: int, W: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int, float]:
    """Box (y0, y1, x0, x1) for CutMix and lambda corrected to the area actually kept (reference §5.4)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    return y0, y1, x0, x1, 1.0 - (y1 - y0) * (x1 - x0) / (H * W)


def mix(x: torch.Tensor, t: torch.Tensor, cfg: AugConfig, rng: np.random.Generator, g_dev: torch.Generator,
        shard: Shard | None = None, gather=None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Batch-level Mixup or CutMix with the reference's switch (reference §5.4). Returns (x, soft targets, kind).

    Scalar decisions (switch, lambda, box) use a host RNG so that a GPU run never waits on the device for them.
    Partners are a permutation of the global batch: with a shard, x and t are that shard's rows of one global batch,
    and gather(tensor) must return the concatenation of every shard's tensor in rank order (an all-gather), which
    is called only when the batch is mixed (with just the CutMix box, for CutMix).
    """
    if not (cfg.mixup or cfg.cutmix):
        return x, t, "none"
    if rng.random() >= cfg.mix_p:
        return x, t, "none"
    if cfg.mixup and cfg.cutmix:
        kind = "cutmix" if rng.random() < 0.5 else "mixup"
    else:
        kind = "mixup" if cfg.mixup else "cutmix"
    a = cfg.mixup_alpha if kind == "mixup" else cfg.cutmix_beta
    lam = float(rng.beta(a, a)) if a > 0 else 1.0
    n, pick = (len(x), _all) if shard is None else (shard.global_n(len(x)), shard.pick)
    whole = _all if shard is None else gather  # the global batch's tensor, where partners are taken from
    perm = pick(torch.randperm(n, device=x.device, generator=g_dev))  # the partner of each of this shard's samples
    if kind == "mixup":
        x = torch.lerp(x, whole(x).index_select(0, perm), 1 - lam)  # lam x + (1 - lam) x[perm]
    else:
        y0, y1, x0, x1, lam = cutmix_box(x.shape[2], x.shape[3], lam, rng)
        box = whole(x[:, :, y0:y1, x0:x1].contiguous()).index_select(0, perm)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = box
    return x, lam * t + (1 - lam) * whole(t).index_select(0, perm), kind


def _all(drawn):
    """The rows of a draw that one process takes when it holds the whole batch: all of them."""
    return drawn


def resolution_at(step: int, total_steps: int, stages: tuple[tuple[int, float], ...], full: int) -> int:
    """Progressive resizing (train.res_schedule, config.res_stages): the training image size at `step`."""
    for size, until in stages:
        if step < until * total_steps:
            return size
    return full


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """A float batch (B, C, H, W) at size x size by area averaging (adaptive average pooling): each output pixel is
    the mean of the input pixels its window covers, so shrinking skips none (32 -> 16: exact 2x2 means)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="area")


class BatchAugment:
    """The whole training augmentation: uint8 images + labels -> normalised floats + soft targets.

    Two parts, so that the per-image part can run on several steps' batches at once (train.py, aug.chunk_images):
    images(x, key) does the per-sample work (crop, flip, AutoAugment, normalise, Random Erasing), seeded by `key`;
    targets(x, y, step) does the per-batch work (label smoothing, Mixup/CutMix), seeded by the step. One call for
    many images amortises the fixed cost of each op: on a GPU, kernel launches (hundreds per call for the
    sync-free AutoAugment); on a CPU, per-op overhead. __call__ is both for one batch, keyed by its step.
    Under torchrun, `shard` is this process's part of each global batch and `gather` an all-gather of one step's
    tensors (mix()); the batches passed are then the shard's rows, and every draw is the global batch's (data.Shard).
    """

    def __init__(self, cfg: AugConfig, mean, std, num_classes: int, label_smoothing: float,
                 device: torch.device, seed: int = 0, shard: Shard | None = None, gather=None):
        self.cfg, self.num_classes, self.smoothing, self.seed = cfg, num_classes, label_smoothing, seed
        self.shard = shard if shard is not None and shard.world > 1 else None
        self.gather = gather
        self.mean = torch.tensor(mean, device=device)
        std = torch.tensor(std, device=device)
        # (x / 255 - mean) / std as one multiply-add on the float batch.
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-self.mean / std).view(1, -1, 1, 1)
        self.g_dev = torch.Generator(device=device)
        self.g_mix = torch.Generator(device=device)

    def _seed(self, key: int) -> int:
        return (self.seed * 1_000_003 + key) * 2 + 1

    @record_function("augment")  # a named range for `smallvit profile`
    def images(self, x: torch.Tensor, key: int) -> torch.Tensor:
        """Per-sample augmentation of uint8 images (B, C, H, W) -> normalised float32; a pure function of key."""
        cfg = self.cfg
        self.g_dev.manual_seed(self._seed(key))
        x = crop_flip(x, cfg.crop_pad, cfg.flip, self.g_dev, self.shard)
        if cfg.autoaugment != "none":
            x = self._autoaugment(x)
        x = normalise(x, self.scale, self.shift)
        if cfg.erase_p > 0:  # host draws from their own stream: (seed, key, 1), apart from targets()' (seed, step)
            x = random_erasing(x, cfg, self.mean, np.random.default_rng([self._seed(key), 1]), self.g_dev,
                               inplace=True, shard=self.shard)
        return x

    @record_function("augment")
    def targets(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Smoothed soft targets and the batch-level Mixup/CutMix of one step's batch; a pure function of step."""
        s = self._seed(step)
        self.g_mix.manual_seed(s - 1)
        t = smooth_targets(y, self.num_classes, self.smoothing)
        x, t, _ = mix(x, t, self.cfg, np.random.default_rng(s), self.g_mix, self.shard, self.gather)
        return x, t

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.targets(self.images(x, step), y, step)

    def _autoaugment(self, x: torch.Tensor) -> torch.Tensor:
        from . import autoaugment

        cfg = self.cfg
        if cfg.autoaugment == "rand":
            return autoaugment.randaugment(x, cfg.randaugment_ops, cfg.randaugment_magnitude, self.g_dev,
                                           shard=self.shard)
        return autoaugment.autoaugment(x, cfg.autoaugment, self.g_dev, rotate_sign=cfg.rotate_sign, shard=self.shard)
