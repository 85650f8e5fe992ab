"""Whitening initialisation of the patch embedding (reference §6.9), computed from un-augmented training images.

The reference uses augmented images, an uncentred second moment, and sets only the first c*k*k filters
(reference §12.3). Here the images are the first `n_images` of the training set without augmentation (so every
process computes the same filters), the covariance is centred and the bias removes the patch mean, so the
whitened channels have zero mean and identity covariance on the data they were fitted on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import normalize


@torch.no_grad()
def patch_covariance(images: torch.Tensor, mean, std, k: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and centred covariance (d, d) of all stride-1 k x k patches, d = C*k*k, in float64."""
    m = torch.tensor(mean, device=images.device)
    s = torch.tensor(std, device=images.device)
    d = images.shape[1] * k * k
    total = torch.zeros(d, dtype=torch.float64, device=images.device)
    outer = torch.zeros(d, d, dtype=torch.float64, device=images.device)
    n = 0
    for i in range(0, len(images), chunk):  # chunks keep memory small: 5000 images give 4.2 M patches
        x = normalize(images[i : i + chunk], m, s)
        p = F.unfold(x, k, stride=1).transpose(1, 2).reshape(-1, d).double()  # (n*L, d), (C, k, k) layout
        total += p.sum(0)
        outer += p.T @ p
        n += p.shape[0]
    mu = total / n
    return mu, outer / n - torch.outer(mu, mu)


@torch.no_grad()
def whiten_patch_embed(conv: nn.Conv2d, images: torch.Tensor, mean, std, filters: str = "first",
                       eps: float = 5e-4, seed: int = 0) -> None:
    """Set the conv's filters to ZCA-style whitening filters e_j / sqrt(lambda_j + eps), largest first.

    filters="first": the reference's layout, output channels 0..d-1 whitened, the rest left as they are.
    filters="all": every output channel is a random unit-norm combination of the d whitening filters, so each
    has unit variance on the fitted data (and the first d channels are exactly whitening filters).
    """
    k = conv.kernel_size[0]
    mu, cov = patch_covariance(images, mean, std, k)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending, as the reference
    w = evecs.T / torch.sqrt(evals.clamp(min=0) + eps)[:, None]  # (d, d): row j = e_j / sqrt(lambda_j + eps)
    d, out = w.shape[0], conv.out_channels
    if filters == "all" and out > d:
        g = torch.Generator(device="cpu").manual_seed(seed)
        mixw = torch.randn(out - d, d, generator=g, dtype=torch.float64).to(w.device)
        w = torch.cat([w, F.normalize(mixw, dim=1) @ w])
    n = min(d, out) if filters == "first" else min(w.shape[0], out)
    w = w[:n]
    conv.weight[:n] = w.view(n, *conv.weight.shape[1:]).to(conv.weight)
    if conv.bias is not None:
        conv.bias[:n] = (-(w @ mu)).to(conv.bias)
