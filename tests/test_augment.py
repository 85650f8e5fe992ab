"""Batched training augmentation (augment.py): flip/crop, Random Erasing, Mixup/CutMix, targets, reproducibility."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smallvit import augment
from smallvit.augment import resize
from smallvit.config import AugConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def within_sigmas(count: float, n: int, p: float, k: float = 4.0) -> bool:
    """Binomial count within k standard deviations of n * p."""
    return abs(count - n * p) <= k * math.sqrt(n * p * (1 - p)) + 1e-9


def rand_u8(shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_flip_rate_is_half_and_only_flips():
    B = 8000
    x = rand_u8((B, 3, 4, 6))
    y = augment.crop_flip(x, pad=0, flip=True, g=torch.Generator().manual_seed(1))
    flipped = (y == x.flip(3)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert y.dtype == torch.uint8 and bool((flipped | same).all())  # nothing else happens
    assert within_sigmas(int(flipped.sum()), B, 0.5)
    assert torch.equal(augment.crop_flip(x, pad=0, flip=False, g=torch.Generator()), x)


def test_crop_is_a_window_of_the_zero_padded_image():
    B, pad = 400, 4
    x = rand_u8((B, 3, 8, 8)) | 1  # no zero pixels in the image, so padding is recognisable
    y = augment.crop_flip(x, pad=pad, flip=False, g=torch.Generator().manual_seed(2))
    assert y.shape == x.shape and y.dtype == torch.uint8
    xp = F.pad(x, (pad,) * 4)
    windows = xp.unfold(2, 8, 1).unfold(3, 8, 1)  # (B, C, 9, 9, 8, 8): every offset
    match = (windows == y[:, :, None, None]).flatten(4).all(4).all(1)  # (B, 9, 9)
    assert bool((match.flatten(1).sum(1) == 1).all())  # each sample is exactly one window
    offsets = match.flatten(1).float().argmax(1)
    counts = torch.bincount(offsets, minlength=81)
    assert bool((counts > 0).all())  # every offset 0..2*pad in both directions occurs
    assert within_sigmas(int(counts[40]), B, 1 / 81)  # the centre (no shift) is not special


def test_random_erasing_rate_area_and_fill():
    B, H, W = 6000, 32, 32
    cfg = AugConfig()
    x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(MEAN)
    y = augment.random_erasing(x, cfg, mean, np.random.default_rng(3))
    changed = y != x
    erased = changed.flatten(1).any(1)
    assert within_sigmas(int(erased.sum()), B, cfg.erase_p)
    lo, hi = cfg.erase_area
    for i in torch.nonzero(erased).flatten()[:500].tolist():
        m = changed[i].all(0)  # all channels of an erased pixel change
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert int(m.sum()) == h * w and rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # a rectangle
        assert h < H and w < W
        # h and w are rounded from sqrt(area * r) and sqrt(area / r), with area in [lo, hi] * H * W.
        assert (h - 0.5) * (w - 0.5) <= hi * H * W and (h + 0.5) * (w + 0.5) >= lo * H * W
        assert torch.allclose(y[i][:, m], mean[:, None].expand(3, h * w))  # raw means, as the reference
    frac = changed[erased].all(1).flatten(1).float().mean(1)
    assert lo * 0.7 < float(frac.min()) and float(frac.max()) < hi * 1.1
    assert abs(float(frac.mean()) - (lo + hi) / 2) < 0.05  # area ~ U[lo, hi] (a few large boxes are rejected)
    zero = augment.random_erasing(x, replace(cfg, erase_fill="zero", erase_p=1.0), mean, np.random.default_rng(4))
    assert bool((zero[zero != x] == 0).all()) and float((zero != x).flatten(1).any(1).float().mean()) > 0.99
    noise = augment.random_erasing(x, replace(cfg, erase_fill="noise", erase_p=1.0), mean, np.random.default_rng(5),
                                   torch.Generator().manual_seed(6))
    assert abs(float(noise[noise != x].std()) - 1.0) < 0.05  # Gaussian noise from the device generator
    # The boxes come from the host generator alone: the same seed gives the same boxes on any device.
    boxes = [augment.erase_boxes(B, H, W, cfg, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(*boxes) and boxes[0].dtype == np.float32 and boxes[0].shape == (B, 5)
    # Only the boxes' samples are written; the input is left alone unless inplace=True, which gives the same images.
    erased_rows = torch.from_numpy(augment.erase_boxes(B, H, W, cfg, np.random.default_rng(3))[:, 4] > 0)
    assert torch.equal(erased, erased_rows)
    x0 = x.clone()
    z = augment.random_erasing(x, cfg, mean, np.random.default_rng(3), inplace=True)
    assert z.data_ptr() == x.data_ptr() and torch.equal(z, y) and not torch.equal(x, x0)


def test_smooth_targets_rows_sum_to_one():
    y = torch.tensor([0, 3, 9, 3])
    t = augment.smooth_targets(y, 10, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert torch.allclose(t[torch.arange(4), y], torch.full((4,), 0.91)) and float(t.min()) == pytest.approx(0.01)
    assert torch.equal(augment.smooth_targets(y, 10, 0.0).argmax(1), y)


def test_cutmix_box_lambda_is_the_kept_area():
    rng = np.random.default_rng(0)
    for lam in np.linspace(0, 1, 41):
        y0, y1, x0, x1, lam_adj = augment.cutmix_box(32, 32, float(lam), rng)
        assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 32
        assert lam_adj == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 1024) and lam_adj >= lam - 1e-9


@pytest.mark.parametrize("kind", ["cutmix", "mixup"])
def test_mix_targets_sum_to_one_and_cutmix_lambda_matches_pixels(kind):
    B, K = 64, 10
    cfg = replace(AugConfig(), mix_p=1.0, mixup=kind == "mixup", cutmix=kind == "cutmix")
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(B) % K
    t = augment.smooth_targets(y, K, 0.1)
    for seed in range(5):
        xm, tm, got = augment.mix(x, t, cfg, np.random.default_rng(seed), torch.Generator().manual_seed(seed))
        assert got == kind and xm.shape == x.shape
        assert torch.allclose(tm.sum(1), torch.ones(B))
        if kind == "cutmix":
            # With one-hot targets, lambda is the weight left on a sample's own label when its partner differs.
            _, t1, _ = augment.mix(x, F.one_hot(y, K).float(), cfg, np.random.default_rng(seed),
                                   torch.Generator().manual_seed(seed))
            kept = (xm == x).all(1).flatten(1).float().mean(1)  # share of each image left in place
            other = t1.max(1).values < 1  # the partner has another label
            assert bool(other.any())
            assert torch.allclose(t1[other, y[other]], kept[other], atol=1e-6)
    none = augment.mix(x, t, replace(cfg, mix_p=0.0), np.random.default_rng(0), torch.Generator())
    assert none[2] == "none" and none[0] is x


def test_mix_switch_rates():
    cfg = AugConfig()  # both on, mix_p 0.5: 25 % CutMix, 25 % Mixup, 50 % clean (reference §5.4)
    x, t = torch.zeros(4, 3, 8, 8), torch.full((4, 10), 0.1)
    rng = np.random.default_rng(0)
    kinds = [augment.mix(x, t, cfg, rng, torch.Generator())[2] for _ in range(4000)]
    for kind, p in (("cutmix", 0.25), ("mixup", 0.25), ("none", 0.5)):
        assert within_sigmas(kinds.count(kind), 4000, p), kind


def _batch_augment(cfg=None, seed=0, device="cpu"):
    return augment.BatchAugment(cfg or AugConfig(), MEAN, STD, num_classes=10, label_smoothing=0.1,
                                device=torch.device(device), seed=seed)


@pytest.mark.parametrize("aa", ["cifar10", "svhn", "rand", "none"])
def test_batch_augment_repeats_exactly_for_seed_and_step(aa):
    cfg = replace(AugConfig(), autoaugment=aa)
    x, y = rand_u8((64, 3, 32, 32)), torch.arange(64) % 10
    a = _batch_augment(cfg)
    out5 = a(x, y, step=5)
    a(x, y, step=6)
    again = _batch_augment(cfg)(x, y, step=5)  # a fresh object (a resumed run) sees the same augmentation
    assert torch.equal(out5[0], a(x, y, step=5)[0]) and torch.equal(out5[0], again[0])
    assert torch.equal(out5[1], again[1])
    assert out5[0].dtype == torch.float32 and out5[0].shape == x.shape and out5[1].shape == (64, 10)
    assert torch.allclose(out5[1].sum(1), torch.ones(64))
    assert not torch.equal(out5[0], a(x, y, step=6)[0])
    assert not torch.equal(out5[0], _batch_augment(cfg, seed=1)(x, y, step=5)[0])


def test_batch_augment_without_augmentation_is_normalisation():
    cfg = replace(AugConfig(), crop_pad=0, flip=False, autoaugment="none", erase_p=0.0, mixup=False, cutmix=False)
    x, y = rand_u8((8, 3, 32, 32)), torch.arange(8)
    xo, t = _batch_augment(cfg)(x, y, step=0)
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(xo, ref, atol=1e-6) and torch.equal(t.argmax(1), y)


@CUDA
def test_batch_augment_on_cuda():
    x, y = rand_u8((128, 3, 32, 32)).cuda(), (torch.arange(128) % 10).cuda()
    a = _batch_augment(device="cuda")
    xo, t = a(x, y, step=3)
    assert xo.device == x.device and t.device == x.device and xo.shape == x.shape
    assert torch.equal(xo, a(x, y, step=3)[0]) and torch.allclose(t.sum(1), torch.ones(128, device="cuda"))


def test_resize_averages_when_shrinking():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    small = resize(x, 2)
    torch.testing.assert_close(small[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))  # 2x2 block means
    assert resize(x, 4) is x
