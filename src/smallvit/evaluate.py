"""Evaluate a saved run: accuracy, per-class accuracy, confusion matrix, optional flip test-time augmentation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as D
from .backbones import build_model
from .config import Config, from_dict
from .distributed import resolve_device
from .model import ViT
from .runs import evaluated_weights, load_checkpoint, load_model_state, read_safetensors


@dataclass(frozen=True)
class Saved:
    """A saved model, ready (eval mode): its config, the dataset facts it was trained with (classes,
    normalisation; None for older files), whether it is a DINO run's teacher backbone (no head), and its step."""

    model: torch.nn.Module
    cfg: Config
    dataset: dict | None
    backbone_only: bool
    step: int | None

    @property
    def meta(self) -> D.DatasetMeta:
        """Classes and normalisation as trained (from the file), else from the dataset's registry or files."""
        return D.meta_of(self.cfg, self.dataset)


def load_saved(run_or_checkpoint: str | Path, device: str | torch.device = "cpu") -> Saved:
    """The one model loader: a run folder, a checkpoint (a training run's evaluated weights, or a pretrain run's
    teacher backbone) or an exported .safetensors file. eval, predict, export, inspect and knn all use it."""
    path = Path(run_or_checkpoint)
    if path.suffix == ".safetensors":
        weights, config, dataset = read_safetensors(path)
        state = {"model": weights, "config": config, "dataset": dataset}
    else:
        state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    backbone_only = "teacher" in state  # pretrain.py saves "model" as the teacher backbone, without a head
    model = build_model(replace(cfg.model, num_classes=0) if backbone_only else cfg.model)
    load_model_state(model, evaluated_weights(state), str(run_or_checkpoint))
    return Saved(model.to(device).eval(), cfg, state.get("dataset"), backbone_only, state.get("step"))


def load(run_or_checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[ViT, Config]:
    """(model in eval mode, config): `load_saved` for callers that need only these two."""
    saved = load_saved(run_or_checkpoint, device)
    return saved.model, saved.cfg


@torch.no_grad()
def batch_logits(model, x_uint8: torch.Tensor, mean, std, batch_size: int = 500, flip: bool = False,
                 autocast=contextlib.nullcontext):
    """The one evaluator: (start index, float32 logits) for each batch of uint8 images (N, C, H, W), normalised on
    the model's device; with `flip`, the mean of each image's and its mirror's logits (flip test-time augmentation,
    train.eval_flip). Training's evaluations, `smallvit eval` and `predict` all read their logits from here."""
    dev = next(model.parameters()).device
    mean, std = torch.as_tensor(mean, device=dev), torch.as_tensor(std, device=dev)
    for i in range(0, len(x_uint8), batch_size):
        xb = D.normalize(x_uint8[i : i + batch_size].to(dev), mean, std)
        with autocast():
            logits = model(xb).float()
            if flip:
                logits = (logits + model(xb.flip(3)).float()) / 2
        yield i, logits


def predict_logits(model, x_uint8: torch.Tensor, mean, std, batch_size: int = 500,
                   tta_flip: bool = False) -> torch.Tensor:
    """Logits (on the CPU) for uint8 images; with tta_flip, the mean of the image's and its mirror's logits."""
    return torch.cat([logits.cpu() for _, logits in batch_logits(model, x_uint8, mean, std, batch_size, tta_flip)])


def accuracy_and_loss(model, x_uint8: torch.Tensor, y: torch.Tensor, mean, std, batch_size: int = 500,
                      autocast=contextlib.nullcontext, flip: bool = False) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of a labelled uint8 set held on the model's device (training's
    evaluations): in eval mode, the model's mode restored after."""
    was = model.training
    model.eval()
    correct = torch.zeros((), device=x_uint8.device)
    loss = torch.zeros((), device=x_uint8.device)
    for i, logits in batch_logits(model, x_uint8, mean, std, batch_size, flip, autocast):
        yb = y[i : i + batch_size]
        loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was)
    return 100.0 * correct.item() / len(x_uint8), loss.item() / len(x_uint8)


def confusion(pred: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) counts: row = true class, column = predicted class."""
    return torch.bincount(y * k + pred, minlength=k * k).view(k, k)


def plot_confusion(cm: torch.Tensor, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = cm.shape[0]
    fig, ax = plt.subplots(figsize=(max(5, k * 0.55), max(4.5, k * 0.5)), dpi=100)
    norm = cm.float() / cm.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test set)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate_run(run: str | Path, data_dir: str | None = None, tta_flip: bool = False,
                 out_dir: str | Path | None = None, device: str = "auto") -> dict:
    """Test accuracy, per-class accuracy and a confusion-matrix PNG for a run folder or checkpoint."""
    dev = resolve_device(device)
    saved = load_saved(run, dev)
    model, cfg, info = saved.model, saved.cfg, saved.meta
    name = cfg.data.dataset
    root = data_dir if data_dir is not None else cfg.data.data_dir
    x, y = D.load(name, root, cfg.data.download, train=False, img_size=cfg.model.img_size)
    logits = predict_logits(model, x, info.mean, info.std)
    pred = logits.argmax(1)
    k = info.num_classes
    cm = confusion(pred, y, k)
    names = list(info.class_names or [str(i) for i in range(k)])
    per_class = (cm.diag().float() / cm.sum(1).clamp(min=1) * 100).tolist()
    report = {
        "checkpoint": str(run),
        "dataset": name,
        "n": len(y),
        "test_acc": 100.0 * (pred == y).float().mean().item(),
        "per_class_acc": {names[i]: round(a, 2) for i, a in enumerate(per_class)},
    }
    if tta_flip:
        tta = predict_logits(model, x, info.mean, info.std, tta_flip=True).argmax(1)
        report["test_acc_tta_flip"] = 100.0 * (tta == y).float().mean().item()
    run_path = Path(run)
    out = Path(out_dir) if out_dir else (run_path if run_path.is_dir() else run_path.parent)
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(cm, names, out / "confusion.png")
    report["confusion_png"] = str(out / "confusion.png")
    return report
