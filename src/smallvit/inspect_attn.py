"""Where the CLS token(s) look: attention maps per layer and head, and attention rollout, as PNG grids.

Maps are read with forward pre-hooks that call each block's `attention_map` on the block's attention input,
so the model runs exactly as in training and evaluation. Rollout follows Abnar & Zuidema (2020): per layer,
the head-averaged attention plus the residual identity, rows renormalised, multiplied through the layers.
A class-attention block mixes only into the CLS rows; its patch rows are the identity (patches do not attend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import data as D
from .model import ViT

DPI = 96  # every panel is one inch, so a grid of R x C panels is exactly (C * DPI, R * DPI) pixels
HEADER_PX = 24  # a title line above a grid


def figure_size_px(rows: int, cols: int, header: bool = False) -> tuple[int, int]:
    """(width, height) in pixels of a saved grid."""
    return cols * DPI, rows * DPI + (HEADER_PX if header else 0)


@torch.no_grad()
def attention_maps(model: ViT, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """Logits and, for every block in order, (name, softmax weights (B, heads, Q, N)) for a normalised batch.

    Q = N for self-attention blocks, Q = K (the CLS tokens) for class-attention blocks.
    """
    named = [(f"layer {i + 1}", b) for i, b in enumerate(model.blocks)]
    named += [(f"class-attn {i + 1}", b) for i, b in enumerate(model.cls_blocks)]
    maps: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        return lambda mod, args: maps.append((name, mod.attention_map(args[0]).float()))

    handles = [b.attn.register_forward_pre_hook(hook(name)) for name, b in named]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, maps


def rollout(maps: list[torch.Tensor], num_cls: int) -> torch.Tensor:
    """Attention rollout of every token (B, N, N): rows are where each output token's information came from."""
    B, _, _, N = maps[0].shape
    eye = torch.eye(N, dtype=maps[0].dtype, device=maps[0].device).expand(B, N, N)
    r = eye
    for a in maps:
        a = a.mean(1)  # (B, Q, N), heads averaged
        if a.shape[1] != N:  # class attention: only the CLS rows mix tokens
            a = torch.cat([a, eye[:, num_cls:]], dim=1)
        a = 0.5 * a + 0.5 * eye  # the residual connection
        r = (a / a.sum(-1, keepdim=True)) @ r
    return r


def _grid(map_row: torch.Tensor, num_cls: int, grid: int) -> np.ndarray:
    """Attention over the tokens (N,) -> the patches' part as a (grid, grid) image."""
    return map_row[num_cls:].reshape(grid, grid).cpu().numpy()


def _image(x_uint8: torch.Tensor) -> np.ndarray:
    return x_uint8.permute(1, 2, 0).cpu().numpy()


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _figure(rows: int, cols: int, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = HEADER_PX / DPI if title else 0.0  # inches
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows + head), dpi=DPI, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01 / (rows + head), top=1 - (head + 0.2) / (rows + head),
                        wspace=0.05, hspace=0.3)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.03 / (rows + head), va="top")
    for ax in axes.flat:
        _blank(ax)
    return plt, fig, axes


def _overlay(ax, img: np.ndarray, amap: np.ndarray) -> None:
    s = img.shape[0]
    ax.imshow(img, extent=(0, s, s, 0), interpolation="nearest")
    ax.imshow(amap, extent=(0, s, s, 0), cmap="inferno", alpha=0.6, interpolation="bilinear")


def plot_heads(img: np.ndarray, maps: list[tuple[str, torch.Tensor]], num_cls: int, grid: int, title: str,
               path: Path) -> tuple[int, int]:
    """One image: a row per (layer, CLS token), the input then one column per head and the head mean."""
    heads = maps[0][1].shape[0]
    rows, cols = len(maps) * num_cls, heads + 2
    plt, fig, axes = _figure(rows, cols, title)
    for li, (name, a) in enumerate(maps):  # a: (heads, Q, N)
        for k in range(num_cls):
            r = li * num_cls + k
            axes[r, 0].imshow(img, interpolation="nearest")
            label = f"{name}" + (f", CLS {k + 1}" if num_cls > 1 else "")
            axes[r, 0].set_title(label, fontsize=6, pad=2)
            for h in range(heads):
                axes[r, 1 + h].imshow(_grid(a[h, k], num_cls, grid), cmap="viridis", interpolation="nearest")
                axes[r, 1 + h].set_title(f"head {h + 1}", fontsize=6, pad=2)
            axes[r, -1].imshow(_grid(a[:, k].mean(0), num_cls, grid), cmap="viridis", interpolation="nearest")
            axes[r, -1].set_title("mean", fontsize=6, pad=2)
    fig.savefig(path)
    plt.close(fig)
    return figure_size_px(rows, cols, header=True)


def plot_rollout(imgs: list[np.ndarray], rolls: torch.Tensor, num_cls: int, grid: int, labels: list[str],
                 path: Path) -> tuple[int, int]:
    """A row per (image, CLS token): the input, the CLS token's rollout over the patches, and the overlay."""
    rows, cols = len(imgs) * num_cls, 3
    plt, fig, axes = _figure(rows, cols)
    for i, img in enumerate(imgs):
        for k in range(num_cls):
            r = i * num_cls + k
            amap = _grid(rolls[i, k], num_cls, grid)
            axes[r, 0].imshow(img, interpolation="nearest")
            axes[r, 0].set_title(labels[i], fontsize=6, pad=2)
            axes[r, 1].imshow(amap, cmap="inferno", interpolation="nearest")
            axes[r, 1].set_title("rollout" + (f", CLS {k + 1}" if num_cls > 1 else ""), fontsize=6, pad=2)
            _overlay(axes[r, 2], img, amap)
            axes[r, 2].set_title("overlay", fontsize=6, pad=2)
    fig.savefig(path)
    plt.close(fig)
    return figure_size_px(rows, cols)


def inspect_run(run_or_checkpoint: str | Path, images: int = 4, indices: list[int] | None = None,
                data_dir: str | None = None, out_dir: str | Path | None = None) -> dict:
    """Attention PNGs for test images of a run's dataset: attn_<index>.png per image and rollout.png for all."""
    from .evaluate import load
    from .predict import predictor

    run = Path(run_or_checkpoint)
    model, cfg = load(run, "cpu")
    _, preprocess, names = predictor(model, cfg)
    d = cfg.data
    x, y = D.load(d.dataset, data_dir if data_dir is not None else d.data_dir, d.download, train=False,
                  img_size=cfg.model.img_size)
    idx = list(indices) if indices else list(range(min(images, len(x))))
    bad = [i for i in idx if not 0 <= i < len(x)]
    if bad:
        raise D.DataError(f"test image indices {bad} are outside 0..{len(x) - 1}")
    xs = x[idx]
    logits, maps = attention_maps(model, preprocess(xs))
    pred = logits.argmax(1).tolist()
    grid, K = model.grid, model.num_cls
    rolls = rollout([a for _, a in maps], K)[:, :K]  # (B, K, N)
    out = Path(out_dir) if out_dir else (run if run.is_dir() else run.parent) / "attention"
    out.mkdir(parents=True, exist_ok=True)
    imgs = [_image(im) for im in xs]
    labels = [f"#{i}: {names[int(y[i])]} (pred. {names[p]})" for i, p in zip(idx, pred)]
    files = []
    for b, i in enumerate(idx):
        path = out / f"attn_{i}.png"
        plot_heads(imgs[b], [(n, a[b]) for n, a in maps], K, grid, f"test image {labels[b]}", path)
        files.append(str(path))
    plot_rollout(imgs, rolls, K, grid, labels, out / "rollout.png")
    files.append(str(out / "rollout.png"))
    return {"indices": idx, "labels": [int(y[i]) for i in idx], "predicted": pred, "files": files}
