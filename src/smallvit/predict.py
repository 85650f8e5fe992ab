"""Use a trained model: `load(run)` gives the model, its preprocessing and its class names; top-k on image files.

Preprocessing is the test-time pipeline of training (reference §5.2): RGB, resize to model.img_size (bilinear,
antialiased; a no-op for images already that size), scale to [0, 1], normalise with the dataset's mean/std.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import data as D
from .config import Config
from .model import ViT


class Preprocess:
    """Images -> the normalised batch (B, 3, S, S) the model expects.

    Accepts a PIL image, an image file path, a uint8 tensor (C, H, W) or (B, C, H, W), or a list of these.
    Any size (resized to S x S), grey or RGBA (converted to RGB).
    """

    def __init__(self, img_size: int, mean, std):
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __repr__(self) -> str:
        return (f"Preprocess(img_size={self.img_size}, mean={tuple(round(v, 4) for v in self.mean.tolist())}, "
                f"std={tuple(round(v, 4) for v in self.std.tolist())})")

    def to_uint8(self, images) -> torch.Tensor:
        """uint8 (B, 3, S, S), before normalisation."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self._one(im) for im in images])

    def _one(self, im) -> torch.Tensor:
        from PIL import Image

        s = self.img_size
        if isinstance(im, (str, Path)):
            try:
                with Image.open(im) as img:
                    return torch.from_numpy(D.image_to_uint8(img, s))
            except OSError as e:  # missing file, not an image (PIL's UnidentifiedImageError is an OSError)
                raise D.DataError(f"cannot read image {im}: {e}") from None
        if isinstance(im, Image.Image):
            return torch.from_numpy(D.image_to_uint8(im, s))
        if isinstance(im, torch.Tensor):
            if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] not in (1, 3, 4):
                raise ValueError(f"expected a uint8 tensor (C, H, W) with C in 1, 3, 4; got {im.dtype} "
                                 f"{tuple(im.shape)}")
            im = im.cpu()
            if im.shape[1:] == (s, s):
                return im[:3] if im.shape[0] > 1 else im.expand(3, s, s)
            # Other sizes take the same PIL path as files, so a tensor and its PNG give the same input.
            arr = im.permute(1, 2, 0).numpy()  # (H, W, C): PIL reads it as L, RGB or RGBA
            return torch.from_numpy(D.image_to_uint8(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr), s))
        if isinstance(im, np.ndarray):
            raise TypeError("pass a PIL image or a uint8 tensor (C, H, W); for a numpy array (H, W, C) use "
                            "PIL.Image.fromarray(array)")
        raise TypeError(f"cannot preprocess a {type(im).__name__}")

    def __call__(self, images) -> torch.Tensor:
        return D.normalize(self.to_uint8(images), self.mean, self.std)


class Predictor(NamedTuple):
    """A trained model ready for inference; unpacks as `model, preprocess, class_names = smallvit.load(run)`."""

    model: ViT
    preprocess: Preprocess
    class_names: tuple[str, ...]

    @torch.no_grad()
    def logits(self, images) -> torch.Tensor:
        """Logits (B, num_classes) on the CPU for images in any form `Preprocess` accepts."""
        dev = next(self.model.parameters()).device
        return self.model(self.preprocess(images).to(dev)).float().cpu()

    def probs(self, images) -> torch.Tensor:
        return self.logits(images).softmax(-1)

    def topk(self, images, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each image, the k most likely (class name, probability), most likely first."""
        p, i = self.probs(images).topk(min(k, len(self.class_names)), dim=-1)
        return [[(self.class_names[c], float(q)) for q, c in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, i)]


def load(run_or_checkpoint: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """A run folder or checkpoint -> Predictor(model in eval mode, preprocessing, class names)."""
    from .evaluate import load_saved

    saved = load_saved(run_or_checkpoint, device)
    return predictor(saved.model, saved.cfg, saved.dataset)


def predictor(model: ViT, cfg: Config, dataset: dict | None = None) -> Predictor:
    """Wrap a loaded model with the preprocessing and class names of its dataset: `dataset` as saved with the
    weights (evaluate.Saved.dataset), else the dataset in its config."""
    meta = D.meta_of(cfg, dataset)
    names = tuple(meta.class_names)
    if len(names) != cfg.model.num_classes:  # a head trained for another label count: show indices
        names = tuple(str(i) for i in range(cfg.model.num_classes))
    return Predictor(model, Preprocess(cfg.model.img_size, meta.mean, meta.std), names)


def predict_files(run_or_checkpoint: str | Path, paths: list[str | Path], topk: int = 5,
                  device: str = "cpu", batch_size: int = 64) -> list[dict]:
    """[{"image": path, "top": [{"class", "index", "prob"}, ...]}] for image files of any size."""
    p = load(run_or_checkpoint, device)
    out = []
    for i in range(0, len(paths), batch_size):
        chunk = [str(x) for x in paths[i : i + batch_size]]
        probs = p.probs(chunk)
        val, idx = probs.topk(min(topk, probs.shape[1]), dim=-1)
        for path, v, c in zip(chunk, val.tolist(), idx.tolist()):
            out.append({"image": path,
                        "top": [{"class": p.class_names[j], "index": j, "prob": q} for q, j in zip(v, c)]})
    return out


def format_table(results: list[dict]) -> str:
    """The top-k list as an aligned text table: one line per (image, rank)."""
    w_img = max([len("image")] + [len(r["image"]) for r in results])
    w_cls = max([len("class")] + [len(t["class"]) for r in results for t in r["top"]])
    lines = [f"{'image':<{w_img}}  rank  {'class':<{w_cls}}  prob"]
    for r in results:
        for rank, t in enumerate(r["top"], 1):
            name = r["image"] if rank == 1 else ""
            lines.append(f"{name:<{w_img}}  {rank:>4}  {t['class']:<{w_cls}}  {t['prob']:.4f}")
    return "\n".join(lines)
