"""The k-NN monitor: does a backbone's feature space already separate the classes, with no training on labels?

DINO's weighted k-NN classifier (facebookresearch/dino eval_knn.py): L2-normalised features of the un-augmented
training images form the bank; each test image takes its k most cosine-similar bank images, which vote for their
class with weight exp(similarity / T). k = 20 and T = 0.07 are DINO's defaults (ssl.knn_k, ssl.knn_temp).
Written by hand: a dozen lines of torch, and no maintained library offers it on tensors already on the device.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as D


@torch.no_grad()
def embed(model, x_uint8: torch.Tensor, mean, std, batch_size: int = 500,
          autocast=contextlib.nullcontext) -> torch.Tensor:
    """L2-normalised features (N, F) of uint8 images: what the classifier head would read (Backbone.pooled)."""
    was = model.training
    model.eval()
    mean, std = torch.as_tensor(mean, device=x_uint8.device), torch.as_tensor(std, device=x_uint8.device)
    out = []
    for i in range(0, len(x_uint8), batch_size):
        with autocast():
            f = model.pooled(D.normalize(x_uint8[i : i + batch_size], mean, std))  # (B, F), any backbones.Backbone
        out.append(F.normalize(f.float(), dim=1))
    model.train(was)
    return torch.cat(out)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1000) -> torch.Tensor:
    """Class votes (Q, num_classes) of normalised query features against a normalised bank, DINO's weighting."""
    k = min(k, len(bank))
    votes = []
    for i in range(0, len(query), chunk):
        sim, idx = (query[i : i + chunk] @ bank.T).topk(k, dim=1)  # (q, k) cosine similarities
        weight = (sim / temperature).exp()
        onehot = F.one_hot(bank_labels[idx], num_classes).float()  # (q, k, C)
        votes.append((onehot * weight.unsqueeze(-1)).sum(1))
    return torch.cat(votes)


def knn_accuracy(model, x_train, y_train, x_test, y_test, mean, std, num_classes: int, k: int = 20,
                 temperature: float = 0.07, autocast=contextlib.nullcontext) -> float:
    """Top-1 accuracy (%) of the weighted k-NN classifier on the model's features."""
    bank = embed(model, x_train, mean, std, autocast=autocast)
    query = embed(model, x_test, mean, std, autocast=autocast)
    pred = knn_predict(bank, y_train, query, num_classes, k, temperature).argmax(1)
    return 100.0 * (pred == y_test).float().mean().item()


def knn_run(run: str | Path, k: int | None = None, temperature: float | None = None, train_images: int = 0,
            test_images: int = 0, data_dir: str | None = None, device: str = "auto") -> dict:
    """k-NN accuracy of a saved run's backbone (a pretrain run's teacher, or a trained classifier before its head)."""
    from .distributed import resolve_device
    from .evaluate import load_saved

    dev = resolve_device(device)
    saved = load_saved(run, dev)
    model, cfg, meta = saved.model, saved.cfg, saved.meta
    d = cfg.data
    root = data_dir if data_dir is not None else d.data_dir
    x_train, y_train = D.load(d.dataset, root, d.download, train=True, device=dev, img_size=cfg.model.img_size)
    x_test, y_test = D.load(d.dataset, root, d.download, train=False, device=dev, img_size=cfg.model.img_size)
    if train_images:
        x_train, y_train = x_train[:train_images], y_train[:train_images]
    if test_images:
        x_test, y_test = x_test[:test_images], y_test[:test_images]
    k = k or cfg.ssl.knn_k
    temperature = temperature or cfg.ssl.knn_temp
    acc = knn_accuracy(model, x_train, y_train, x_test, y_test, meta.mean, meta.std, meta.num_classes, k, temperature)
    return {"run": str(run), "knn_acc": acc, "k": k, "temperature": temperature, "train_images": len(x_train),
            "test_images": len(x_test), "backbone": "teacher" if saved.backbone_only else "model", "step": saved.step}
