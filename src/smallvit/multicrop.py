"""DINO's multi-crop augmentation, batched on the training device with independent parameters per sample.

The reference (vits-for-small-scale-datasets train_ssl.py DataAugmentation, after DINO main_dino.py) runs per image
in PIL: global view 1: RandomResizedCrop(img_size, global_scale, bicubic) -> flip -> ColorJitter (p 0.8) -> grey
(p 0.2) -> Gaussian blur (p 1.0) -> normalise; global view 2: the same with blur p 0.1 and solarize p 0.2; each local
view: RandomResizedCrop(img_size // 2, local_scale) -> flip -> jitter -> grey -> blur (p 0.5) -> normalise.

Written by hand for the reason augment.py gives: torchvision's v2 transforms draw one parameter set per call, and
kornia (which draws per sample) is not a dependency; here every random draw comes from a generator seeded by a key
(the step), so a resumed run crops exactly as the uninterrupted one; under torchrun each draw is made for the
global batch and cut to the rank's slice (data.Shard), so the views do not depend on the number of processes.
Differences from the PIL pipeline, for speed:
the crop and its resize are one bicubic `grid_sample` (no antialiasing when a crop shrinks), and ColorJitter's four
operations run in a fixed order (brightness, contrast, saturation, hue) instead of a random order per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import SSLConfig
from .data import Shard

_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def crop_boxes(n: int, H: int, W: int, scale: tuple[float, float], g: torch.Generator, device,
               ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes for n images: float (n, 4) rows of top, left, height, width in pixels.

    torchvision's sampling (area fraction uniform in `scale`, log-uniform aspect ratio, the first of `attempts` that
    fits), vectorised; when none fits, the whole image (torchvision's fallback for square images).
    """
    area = torch.empty(n, attempts, device=device).uniform_(*scale, generator=g) * H * W
    log_r = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    w = torch.sqrt(area * log_r.exp()).round()
    h = torch.sqrt(area / log_r.exp()).round()
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.float().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    w, h, any_ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
    w, h = torch.where(any_ok, w, float(W)), torch.where(any_ok, h, float(H))
    u = torch.rand(n, 2, device=device, generator=g)
    top = (u[:, 0] * (H - h + 1)).floor().clamp(max=H - h)  # torch.randint(0, H - h + 1) per sample
    left = (u[:, 1] * (W - w + 1)).floor().clamp(max=W - w)
    return torch.stack([top, left, h, w], 1)


def resized_crops(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, flip where `flip`, resize to size x size (bicubic): float (n, C, size, size) in
    the input's range. One affine grid per sample: output pixel centres map into the box (align_corners=False)."""
    n, C, H, W = x.shape
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.where(flip, -w / W, w / W)
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [n, C, size, size], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:  # (n, 3, H, W) -> (n, 1, H, W)
    r, gr, b = x.unbind(1)
    return (_GREY[0] * r + _GREY[1] * gr + _GREY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend: f * x + (1 - f) * other, clamped to [0, 1]; f per sample."""
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] by `shift` turns per sample (torchvision adjust_hue, via HSV)."""
    v, _ = x.max(1)
    c = v - x.min(1)[0]
    s = torch.where(v > 0, c / v.clamp_min(1e-12), torch.zeros_like(v))
    r, g, b = x.unbind(1)
    cc = c.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / cc, torch.where(v == g, 2 + (b - r) / cc, 4 + (r - g) / cc))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB in closed form: channel n is v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * h.unsqueeze(1)) % 6
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (<= max_sigma) per sample (sigma 0: unchanged), reflect padding;
    (n, C, H, W). The kernel radius comes from max_sigma, not from the drawn sigmas: no host sync on a GPU."""
    n, C, H, W = x.shape
    r = min(math.ceil(3 * max_sigma), H - 1, W - 1)
    if r < 1:
        return x
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma.clamp_min(1e-6).view(-1, 1) ** 2))  # (n, 2r+1)
    k = torch.where(sigma.view(-1, 1) > 0, k, (t == 0).to(x.dtype))  # a delta where there is no blur
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (n*C, 2r+1)
    y = F.pad(x.reshape(1, n * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(n * C, 1, 1, -1), groups=n * C)  # rows
    y = F.conv2d(y, k.view(n * C, 1, -1, 1), groups=n * C)  # columns
    return y.view(n, C, H, W)


class MultiCrop:
    """uint8 images (B, C, H, W) -> [global views (G*B, C, S, S), local views (L*B, C, s, s)], normalised float32.

    Views are crop-major (all images' first view, then all images' second view, ...), as DINO's chunking expects.
    `views(x, key)` is a pure function of (seed, key); with a `shard` (torchrun), x is that shard's slice of the
    global batch and every draw is the global batch's.
    """

    def __init__(self, cfg: SSLConfig, img_size: int, mean, std, device: torch.device, seed: int = 0,
                 shard: Shard | None = None):
        self.cfg, self.img_size, self.seed = cfg, img_size, seed
        self.shard = shard if shard is not None and shard.world > 1 else None
        self.local_size = cfg.local_size or img_size // 2
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.g = torch.Generator(device=device)

    def views(self, x: torch.Tensor, key: int) -> list[torch.Tensor]:
        c = self.cfg
        self.g.manual_seed((self.seed * 1_000_003 + key) * 2 + 1)
        B = len(x)
        out = []
        for size, scale, count, blur in ((self.img_size, c.global_scale, c.global_crops, None),
                                         (self.local_size, c.local_scale, c.local_crops, c.blur_p[2])):
            if count == 0:
                continue
            # Per view index: global view 0 is always blurred, the others rarely and sometimes solarized.
            view = torch.arange(count, device=x.device).repeat_interleave(B)
            blur_p = torch.full((count * B,), blur, device=x.device) if blur is not None else torch.where(
                view == 0, c.blur_p[0], c.blur_p[1])
            solar_p = 0.0 if blur is not None else torch.where(view == 0, 0.0, c.solarize_p)
            out.append(self._augment(x.repeat(count, 1, 1, 1), size, scale, blur_p, solar_p))
        return out

    def _augment(self, x: torch.Tensor, size: int, scale, blur_p, solar_p) -> torch.Tensor:
        c, g, n, dev = self.cfg, self.g, len(x), x.device
        # Drawn for all N samples of the global batch's views, then this shard's n rows (all of them in one process).
        N, pick = (n, lambda t: t) if self.shard is None else (self.shard.global_n(n), self.shard.pick)
        rand = lambda: pick(torch.rand(N, device=dev, generator=g))  # noqa: E731
        boxes = pick(crop_boxes(N, x.shape[2], x.shape[3], scale, g, dev))
        y = resized_crops(x, boxes, rand() < 0.5, size).div_(255.0).clamp_(0, 1)  # (n, C, S, S) in [0, 1]
        jitter = rand() < c.jitter_p
        b, ct, sat, hue = c.jitter

        def factor(spread: float) -> torch.Tensor:  # U(1 - spread, 1 + spread) where jittered, else 1
            f = 1 + spread * (2 * rand() - 1)
            return torch.where(jitter, f, torch.ones_like(f))

        y = (y * factor(b).view(-1, 1, 1, 1)).clamp_(0, 1)
        y = _blend(y, _grey(y).mean((2, 3), keepdim=True), factor(ct))
        y = _blend(y, _grey(y), factor(sat))
        shift = hue * (2 * rand() - 1)
        if hue > 0:
            y = torch.where(jitter.view(-1, 1, 1, 1), shift_hue(y, torch.where(jitter, shift, 0.0)), y)
        grey = (rand() < c.grey_p).view(-1, 1, 1, 1)
        y = torch.where(grey, _grey(y).expand_as(y), y)
        sigma = pick(torch.empty(N, device=dev).uniform_(*c.blur_sigma, generator=g))
        y = gaussian_blur(y, torch.where(rand() < blur_p, sigma, 0.0), c.blur_sigma[1])
        solar = (rand() < solar_p).view(-1, 1, 1, 1)
        y = torch.where(solar & (y >= 128 / 255), 1 - y, y)  # PIL ImageOps.solarize: threshold 128
        return (y - self.mean) / self.std
