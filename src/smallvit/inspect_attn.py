"""Where the CLS token(s) look: attention maps per layer and head, and attention rollout, as PNG grids.

Maps are read with forward pre-hooks that call each block's `attention_map` on the block's attention input,
so the model runs exactly as in training and evaluation. Rollout follows Abnar & Zuidema (2020): per layer,
the head-averaged attention plus the residual identity, rows renormalised, multiplied through the layers.
A class-attention block mixes only into the CLS rows; its patch rows are the identity (patches do not attend).
CaiT (arch=cait, timm's class) is read through its attention dropout's input, the weights that multiply the values
(after the talking-heads mix); its self-attention covers the patches only, so those maps gain an identity CLS row.
Swin has no CLS token and attends within 4x4 windows, so it has no map of this kind: inspect says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import data as D
from .backbones import Cait, Swin
from .config import ConfigError
from .model import ViT

DPI = 96
CELL = 96  # pixels per panel: a title band, then the picture; a grid of R x C panels is (C * CELL, R * CELL) pixels
TITLE_PX = 14
PIC_PX = 78
HEADER_PX = 24  # a title line above a grid


def figure_size_px(rows: int, cols: int, header: bool = False) -> tuple[int, int]:
    """(width, height) in pixels of a saved grid."""
    return cols * CELL, rows * CELL + (HEADER_PX if header else 0)


@torch.no_grad()
def attention_maps(model: ViT, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """Logits and, for every block in order, (name, softmax weights (B, heads, Q, N)) for a normalised batch.

    Q = N for self-attention blocks, Q = K (the CLS tokens) for class-attention blocks.
    """
    if isinstance(model, Swin):
        raise ConfigError("inspect: arch=swin has no CLS token; its window attention mixes 4x4 patches within "
                          "shifted windows, so there is no attention map over the image. Use arch=vit or cait.")
    if isinstance(model, Cait):
        return _cait_maps(model, x)
    if not model.num_cls:
        raise ConfigError("inspect: this ViT has no CLS token (model.num_cls_tokens=0, average pooling), and the "
                          "maps drawn here are the CLS token's attention over the patches; inspect a CLS-token run")
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


def _cait_maps(model: Cait, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    named = [(f"layer {i + 1}", b.attn) for i, b in enumerate(model.blocks)]
    named += [(f"class-attn {i + 1}", b.attn) for i, b in enumerate(model.blocks_token_only)]
    maps: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def read(mod, args):
            a = args[0].float()  # (B, h, Q, N)
            if not name.startswith("class"):  # patches only: add the CLS token, which self-attention leaves alone
                B, h, N, _ = a.shape
                full = torch.zeros(B, h, N + 1, N + 1, dtype=a.dtype, device=a.device)
                full[..., 0, 0] = 1.0
                full[..., 1:, 1:] = a
                a = full
            maps.append((name, a))
        return read

    fused = [(m, m.fused_attn) for _, m in named if hasattr(m, "fused_attn")]
    handles = [m.attn_drop.register_forward_pre_hook(hook(name)) for name, m in named]
    try:
        for m, _ in fused:  # the fused kernel never forms the weights; the unfused path computes the same output
            m.fused_attn = False
        logits = model(x)
    finally:
        for m, f in fused:
            m.fused_attn = f
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
    """uint8 (3, H, W) -> float RGB (H, W, 3) in [0, 1]."""
    return x_uint8.permute(1, 2, 0).cpu().float().div(255).numpy()


def _colour(amap: np.ndarray, cmap: str) -> np.ndarray:
    """A map scaled to its own min..max, coloured: (h, w) -> RGB (h, w, 3)."""
    import matplotlib

    lo, hi = float(amap.min()), float(amap.max())
    return matplotlib.colormaps[cmap]((amap - lo) / (hi - lo if hi > lo else 1.0))[..., :3]


def _fit(pic: np.ndarray, px: int, smooth: bool = False) -> np.ndarray:
    """Scale an (h, w[, 3]) picture to (px, px[, 3]): nearest (each patch a block), or bilinear with `smooth`."""
    if smooth:
        t = torch.from_numpy(np.ascontiguousarray(pic, dtype=np.float32))[None, None]
        return torch.nn.functional.interpolate(t, size=(px, px), mode="bilinear", align_corners=False)[0, 0].numpy()
    rows = np.arange(px) * pic.shape[0] // px
    cols = np.arange(px) * pic.shape[1] // px
    return pic[rows][:, cols]


def _overlay(img: np.ndarray, amap: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The image with the map (smoothly upsampled, coloured) laid over it, at PIC_PX."""
    return (1 - alpha) * _fit(img, PIC_PX) + alpha * _colour(_fit(amap, PIC_PX, smooth=True), "inferno")


def _render(cells: list[list[tuple[np.ndarray, str]]], path: Path, title: str = "") -> tuple[int, int]:
    """Save a grid of (picture, label) panels as one PNG; pictures are RGB in [0, 1] at any size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(cells), max(len(r) for r in cells)
    top = HEADER_PX if title else 0
    W, H = figure_size_px(rows, cols, bool(title))
    canvas = np.ones((H, W, 3))
    fig = plt.figure(figsize=(W / DPI, H / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    for r, row in enumerate(cells):
        for c, (pic, label) in enumerate(row):
            y0, x0 = top + r * CELL + TITLE_PX, c * CELL + (CELL - PIC_PX) // 2
            canvas[y0 : y0 + PIC_PX, x0 : x0 + PIC_PX] = _fit(pic, PIC_PX)
            label = label if len(label) <= 22 else label[:21] + "\u2026"  # what fits above one panel
            ax.text(x0 + PIC_PX / 2, y0 - TITLE_PX / 2, label, ha="center", va="center", fontsize=6)
    if title:
        ax.text(W / 2, HEADER_PX / 2, title, ha="center", va="center", fontsize=8)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)  # text positions in canvas pixels, y down
    fig.figimage((canvas * 255).round().astype(np.uint8), origin="upper", zorder=-1)  # pixel for pixel, under the text
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return W, H


def plot_heads(img: np.ndarray, maps: list[tuple[str, torch.Tensor]], num_cls: int, grid: int, title: str,
               path: Path) -> tuple[int, int]:
    """One image: a row per (layer, CLS token), the input then one column per head and the head mean."""
    cells = []
    for name, a in maps:  # a: (heads, Q, N)
        for k in range(num_cls):
            row = [(img, name + (f", CLS {k + 1}" if num_cls > 1 else ""))]
            row += [(_colour(_grid(a[h, k], num_cls, grid), "viridis"), f"head {h + 1}") for h in range(a.shape[0])]
            row.append((_colour(_grid(a[:, k].mean(0), num_cls, grid), "viridis"), "mean"))
            cells.append(row)
    return _render(cells, path, title)


def plot_rollout(imgs: list[np.ndarray], rolls: torch.Tensor, num_cls: int, grid: int, labels: list[str],
                 predicted: list[str], path: Path) -> tuple[int, int]:
    """A row per (image, CLS token): the input, the CLS token's rollout over the patches, and the overlay."""
    cells = []
    for i, img in enumerate(imgs):
        for k in range(num_cls):
            amap = _grid(rolls[i, k], num_cls, grid)
            name = "rollout" + (f", CLS {k + 1}" if num_cls > 1 else "")
            cells.append([(img, labels[i]), (_colour(amap, "inferno"), name),
                          (_overlay(img, amap), f"pred. {predicted[i]}")])
    return _render(cells, path)


def inspect_run(run_or_checkpoint: str | Path, images: int = 4, indices: list[int] | None = None,
                data_dir: str | None = None, out_dir: str | Path | None = None) -> dict:
    """Attention PNGs for test images of a run's dataset: attn_<index>.png per image and rollout.png for all."""
    from .evaluate import load_saved
    from .predict import predictor

    run = Path(run_or_checkpoint)
    saved = load_saved(run, "cpu")
    model, cfg = saved.model, saved.cfg
    _, preprocess, names = predictor(model, cfg, saved.dataset)
    d = cfg.data
    x, y = D.load(d.dataset, data_dir if data_dir is not None else d.data_dir, d.download, train=False,
                  img_size=cfg.model.img_size)
    idx = list(indices) if indices else list(range(min(images, len(x))))
    if not idx:
        raise D.DataError("no test images chosen: pass --images N with N >= 1, or --indices")
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
    labels = [f"#{i} {names[int(y[i])]}" for i in idx]
    files = []
    for b, i in enumerate(idx):
        path = out / f"attn_{i}.png"
        title = f"test image {labels[b]} (predicted {names[pred[b]]})"
        plot_heads(imgs[b], [(n, a[b]) for n, a in maps], K, grid, title, path)
        files.append(str(path))
    plot_rollout(imgs, rolls, K, grid, labels, [names[p] for p in pred], out / "rollout.png")
    files.append(str(out / "rollout.png"))
    return {"indices": idx, "labels": [int(y[i]) for i in idx], "predicted": pred, "files": files}
