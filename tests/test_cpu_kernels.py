"""The fused CPU kernels (cpu_kernels.py, numba) give exactly the PyTorch path's values, op by op and end to end."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smallvit import augment, cpu_kernels
from smallvit import autoaugment as A
from smallvit.config import AugConfig

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(cpu_kernels.numba is None, reason="numba is not installed")]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@contextmanager
def kernels(on: bool):
    before = cpu_kernels.ENABLED
    cpu_kernels.ENABLED = on
    try:
        yield
    finally:
        cpu_kernels.ENABLED = before


def both(fn):
    """fn() with the kernels, then with the PyTorch path."""
    with kernels(True):
        fast = fn()
    with kernels(False):
        slow = fn()
    return fast, slow


def images(n: int, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth images plus noise, a few flat channels and a few single-valued images (edge cases of the point ops)."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, c, max(h // 4, 1), max(w // 4, 1), generator=g) * 255, size=(h, w),
                         mode="bilinear", align_corners=False)
    x = (base + 20 * torch.randn(base.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    x[0] = 7  # one value everywhere: equalize leaves it, autocontrast leaves it
    if n > 2:
        x[1, 0] = 255
        x[2] = x[2] // 64 * 64  # four values per channel
    return x


def test_usable_only_when_enabled_and_on_cpu():
    x = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with kernels(True):
        assert cpu_kernels.usable(x)
    with kernels(False):
        assert not cpu_kernels.usable(x)
    assert not cpu_kernels.usable(torch.zeros(1, device="meta"))


@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (9, 1, 16, 24), (5, 3, 7, 5)])
@pytest.mark.parametrize("pad,flip", [(4, True), (4, False), (0, True), (2, True)])
def test_crop_flip_equals_the_gather(shape, pad, flip):
    x = images(*shape)
    fast, slow = both(lambda: augment.crop_flip(x, pad, flip, torch.Generator().manual_seed(3)))
    assert fast.dtype == torch.uint8 and torch.equal(fast, slow)


def test_normalise_and_constant_erasing_equal_the_torch_ops():
    x = images(200)
    scale = (1.0 / (255.0 * torch.tensor(STD))).view(1, -1, 1, 1)
    shift = (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, -1, 1, 1)
    normed, slow = both(lambda: augment.normalise(x, scale, shift))
    assert normed.dtype == torch.float32 and torch.equal(normed, slow)
    for fill in ("reference", "zero"):
        cfg = replace(AugConfig(), erase_fill=fill, erase_p=0.6)
        fast, slow = both(lambda cfg=cfg: augment.random_erasing(normed, cfg, torch.tensor(MEAN),
                                                                 np.random.default_rng(4)))
        assert torch.equal(fast, slow) and not torch.equal(fast, normed)


def test_lookup_tables_histograms_and_warps_equal_the_torch_ops():
    x = images(40)
    lut = torch.randint(0, 256, (40, 3, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(*both(lambda: A._apply_lut(x, lut)))
    assert torch.equal(*both(lambda: A._point_lut(x, "equalize", torch.zeros(40))))  # histogram kernel
    hist = cpu_kernels.histograms(x)
    assert torch.equal(hist.long(), torch.stack([torch.stack([torch.bincount(x[i, c].flatten(), minlength=256)
                                                              for c in range(3)]) for i in range(40)]))
    v = torch.linspace(-1, 1, 40)
    for op, top in (("rotate", 30.0), ("translate_x", 150 / 331), ("translate_y", 150 / 331), ("shear_x", 0.3),
                    ("shear_y", 0.3)):
        fast, slow = both(lambda op=op, top=top: A.apply_op(x, op, v * top))
        assert torch.equal(fast, slow), op


@pytest.mark.parametrize("op", A.POINT)
def test_point_ops_kernel_equals_the_tables_of_point_lut(op):
    """cpu_kernels.point_ops (tables computed in the kernel) against autoaugment._point_lut, value by value."""
    x = images(60)
    if op == "posterize":
        values = torch.tensor([8.0, 7, 6, 5, 4, 1, 0] * 9)[:60]
    elif op == "solarize":
        values = torch.linspace(0, 256, 60)
    else:
        values = torch.linspace(-1.2, 1.2, 60)  # enhance factors beyond the policy's range clamp too
    code = torch.full((60,), A.POINT.index(op))
    means = A._grey(x.float()).mean(dim=(1, 2, 3)) if op == "contrast" else torch.zeros(60)
    with kernels(False):
        ref = A._apply_lut(x, A._point_lut(x, op, values))
    assert torch.equal(cpu_kernels.point_ops(x, code, values, means), ref)


@pytest.mark.parametrize("run", ["cifar10", "svhn", "imagenet", "rand"])
def test_autoaugment_equal_with_and_without_kernels(run):
    x = images(300, seed=2)
    if run == "rand":
        fast, slow = both(lambda: A.randaugment(x, 2, 14, torch.Generator().manual_seed(7)))
    else:
        fast, slow = both(lambda: A.autoaugment(x, run, torch.Generator().manual_seed(7)))
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("cfg", [AugConfig(), replace(AugConfig(), autoaugment="rand", erase_fill="zero"),
                                 replace(AugConfig(), erase_fill="noise", erase_p=0.5, crop_pad=2)])
def test_batch_augment_images_equal_with_and_without_kernels(cfg):
    x = images(256, seed=5)
    aug = augment.BatchAugment(cfg, MEAN, STD, num_classes=10, label_smoothing=0.1, device=torch.device("cpu"),
                               seed=11)
    fast, slow = both(lambda: aug.images(x, 3))
    assert fast.dtype == torch.float32 and torch.equal(fast, slow)
