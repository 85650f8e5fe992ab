"""DINO's multi-crop views (multicrop.py), against torchvision where it has the same op."""

import torch

from conftest import MEAN, STD
from smallvit.config import SSLConfig
from smallvit.multicrop import MultiCrop, crop_boxes, gaussian_blur, shift_hue


def test_views_shapes_order_and_determinism():
    s = SSLConfig(local_crops=3)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    mc = MultiCrop(s, 32, MEAN, STD, torch.device("cpu"), seed=1)
    g, loc = mc.views(x, 7)
    assert g.shape == (2 * 5, 3, 32, 32) and loc.shape == (3 * 5, 3, 16, 16) and g.dtype == torch.float32
    again = mc.views(x, 7)
    assert torch.equal(g, again[0]) and torch.equal(loc, again[1])  # a pure function of (seed, key)
    assert not torch.equal(g, mc.views(x, 8)[0])
    assert not torch.equal(g[:5], g[5:])  # the two global views of an image differ


def test_crop_boxes_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    boxes = crop_boxes(4000, 32, 32, (0.2, 0.5), g, "cpu")
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() > 0.15 and area.max() < 0.56  # the scale range, up to the rounding of h and w
    ratio = w / h
    assert ratio.min() > 0.6 and ratio.max() < 1.6  # log-uniform in (3/4, 4/3), up to rounding
    assert 0.3 < area.mean() < 0.4
    whole = crop_boxes(100, 32, 32, (1.0, 1.0), g, "cpu")
    assert (whole[:, 2] * whole[:, 3] >= 0.9 * 1024).all()


def test_identity_views_reproduce_the_image():
    """Scale 1, ratio-preserving crops without colour, blur or flip give back the normalised image (the affine
    grid maps output pixel centres onto input pixel centres); a flip gives the mirrored image."""
    s = SSLConfig(global_scale=(1.0, 1.0), local_crops=0, jitter_p=0.0, grey_p=0.0, blur_p=(0.0, 0.0, 0.0),
                  solarize_p=0.0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    (g,) = MultiCrop(s, 32, MEAN, STD, torch.device("cpu")).views(x, 0)
    expect = (x.float() / 255 - 0.5) / 0.25
    same = [(g[i] - expect[i % 64]).abs().max() < 1e-4 for i in range(128)]
    mirrored = [(g[i] - expect[i % 64].flip(-1)).abs().max() < 1e-4 for i in range(128)]
    assert all(a or b for a, b in zip(same, mirrored)) and 30 < sum(mirrored) < 98  # flip p = 0.5


def test_hue_shift_matches_torchvision():
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(3, 3, 8, 8)
    for h in (-0.3, 0.1, 0.45):
        assert (shift_hue(x, torch.full((3,), h)) - TF.adjust_hue(x, h)).abs().max() < 1e-5


def test_blur_matches_torchvision_and_sigma_zero_is_identity():
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(3, 3, 16, 16)
    out = gaussian_blur(x, torch.tensor([1.0, 0.0, 1.0]), max_sigma=1.0)
    assert (out[0] - TF.gaussian_blur(x[0], [7, 7], [1.0, 1.0])).abs().max() < 1e-5
    assert torch.equal(out[1], x[1])
