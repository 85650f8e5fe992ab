"""Evaluate a saved run: accuracy, per-class accuracy, confusion matrix, optional flip test-time augmentation."""

from __future__ import annotations

from pathlib import Path

import torch

from . import data as D
from .config import Config, from_dict
from .model import ViT, build_model
from .distributed import resolve_device
from .runs import evaluated_weights, load_checkpoint, load_model_state


def load(run_or_checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[ViT, Config]:
    """A ready model (eval mode) and its config, from a run folder, a checkpoint or an exported .safetensors file."""
    if Path(run_or_checkpoint).suffix == ".safetensors":
        from .export import read_safetensors

        weights, config, dataset = read_safetensors(Path(run_or_checkpoint))
        state = {"model": weights, "config": config, "dataset": dataset}
    else:
        state = load_checkpoint(Path(run_or_checkpoint))
    cfg = from_dict(state["config"])
    model = build_model(cfg.model)
    load_model_state(model, evaluated_weights(state), str(run_or_checkpoint))
    model.saved_dataset = state.get("dataset")  # classes and normalisation as trained (D.meta_of)
    return model.to(device).eval(), cfg


@torch.no_grad()
def predict_logits(model: ViT, x_uint8: torch.Tensor, mean, std, batch_size: int = 500,
                   tta_flip: bool = False) -> torch.Tensor:
    """Logits for uint8 images (N, C, H, W); with tta_flip, the mean of the image's and its mirror's logits."""
    dev = next(model.parameters()).device
    m = torch.tensor(mean, device=dev)
    s = torch.tensor(std, device=dev)
    out = []
    for i in range(0, len(x_uint8), batch_size):
        xb = D.normalize(x_uint8[i : i + batch_size].to(dev), m, s)
        logits = model(xb)
        if tta_flip:
            logits = (logits + model(xb.flip(3))) / 2
        out.append(logits.float().cpu())
    return torch.cat(out)


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
    model, cfg = load(run, dev)
    name = cfg.data.dataset
    root = data_dir if data_dir is not None else cfg.data.data_dir
    info = D.meta_of(cfg, model.saved_dataset)
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
