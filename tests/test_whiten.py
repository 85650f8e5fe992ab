import torch

from smallvit.experiments import make_config
from smallvit.backbones import build_model
from smallvit.whiten import whiten_patch_embed


def _images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, 8, 8), generator=g).float()
    x = torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)  # correlated pixels
    return (x + torch.randint(0, 20, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)


MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _whitened_outputs(conv, images, n):
    x = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=1)
    return out[:, :n].permute(0, 2, 3, 1).reshape(-1, n)  # every stride-1 patch


def test_whitening_gives_identity_covariance_on_fitted_data():
    model = build_model(make_config("smoke", {"model.embed_dim": 64}).model)
    imgs = _images()
    whiten_patch_embed(model.patch_embed, imgs, MEAN, STD, "first", eps=1e-9)
    z = _whitened_outputs(model.patch_embed, imgs, 48)
    cov = torch.cov(z.T)
    assert z.mean(0).abs().max() < 1e-6
    assert (cov - torch.eye(48, dtype=cov.dtype)).abs().max() < 1e-3


def test_whiten_all_filters_have_unit_variance_and_first_mode_keeps_the_rest():
    model = build_model(make_config("smoke", {"model.embed_dim": 64}).model)
    untouched = model.patch_embed.weight[48:].detach().clone()
    imgs = _images()
    whiten_patch_embed(model.patch_embed, imgs, MEAN, STD, "first")
    assert torch.equal(model.patch_embed.weight[48:], untouched)
    whiten_patch_embed(model.patch_embed, imgs, MEAN, STD, "all", eps=1e-9)
    z = _whitened_outputs(model.patch_embed, imgs, 64)
    var = z.var(0)
    assert torch.allclose(var, torch.ones_like(var), atol=1e-3)
