"""How well a classifier's probabilities are calibrated: expected calibration error (torchmetrics), negative
log-likelihood, Brier score, temperature scaling (Guo et al., ICML 2017) and the reliability diagram.

torchmetrics is imported inside the functions that use it: `smallvit train` and `eval` run without it (a machine
that lacks it gets no ECE, everything else).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

N_BINS = 15  # equal-width confidence bins, as in Guo et al. and torchmetrics' default


def have_torchmetrics() -> bool:
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        return False
    return True


def ece(logits: torch.Tensor, y: torch.Tensor, n_bins: int = N_BINS) -> float:
    """Expected calibration error of the top-1 confidence, L1 over n_bins equal-width bins, in [0, 1]
    (torchmetrics' multiclass_calibration_error on the softmax)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    p = logits.float().softmax(1)
    return multiclass_calibration_error(p, y, num_classes=p.shape[1], n_bins=n_bins, norm="l1").item()


def scores(logits: torch.Tensor, y: torch.Tensor, n_bins: int = N_BINS) -> dict:
    """Accuracy (%), ECE (None without torchmetrics), NLL (mean cross-entropy, nats) and Brier score (the squared
    distance of the probability vector to the one-hot label, summed over classes, mean over images: 0 to 2)."""
    logits, y = logits.float().cpu(), y.cpu()
    p = logits.softmax(1)
    return {
        "acc": 100.0 * (p.argmax(1) == y).double().mean().item(),
        "ece": ece(logits, y, n_bins) if have_torchmetrics() else None,
        "nll": F.cross_entropy(logits, y).item(),
        "brier": ((p - F.one_hot(y, p.shape[1])) ** 2).sum(1).mean().item(),
    }


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, max_iter: int = 200) -> float:
    """The single temperature T minimising the NLL of softmax(logits / T): LBFGS on log T (T > 0 by construction).
    Fit it on held-out images (a validation split), never on the images it is then scored on."""
    z, y = logits.detach().double().cpu(), y.cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.detach().exp().item()


def bins(logits: torch.Tensor, y: torch.Tensor, n_bins: int = N_BINS) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of each equal-width confidence bin, for the reliability diagram (the ECE
    itself comes from torchmetrics, whose bins these are: [lo, hi), the last one holding 1.0)."""
    p = logits.float().cpu().softmax(1)
    conf, pred = p.max(1)
    right = (pred == y.cpu()).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    which = torch.bucketize(conf, edges[1:-1], right=True)
    out = []
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        out.append((conf[sel].mean().item() if n else float("nan"), right[sel].mean().item() if n else float("nan"),
                    n))
    return out


def plot_reliability(panels: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, n_bins: int = N_BINS) -> None:
    """One reliability diagram per (logits, labels) panel: accuracy against confidence per bin, the gap to the
    diagonal shaded, the share of images per bin as a histogram below; each title carries its ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(panels)
    fig, axes = plt.subplots(2, k, figsize=(3.6 * k, 4.6), dpi=100, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    width = 1 / n_bins
    centres = [(b + 0.5) * width for b in range(n_bins)]
    for i, (title, (logits, y)) in enumerate(panels.items()):
        rows = bins(logits, y, n_bins)
        s = scores(logits, y, n_bins)
        ax, hist = axes[0, i], axes[1, i]
        acc = [a if n else 0.0 for _, a, n in rows]  # empty bins: no bar
        gap = [c - a if n else 0.0 for c, a, n in rows]
        ax.bar(centres, acc, width, edgecolor="black", lw=0.5, label="accuracy")
        ax.bar(centres, gap, width, bottom=acc, color="tab:red", alpha=0.3, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ece_txt = f"ECE {100 * s['ece']:.2f}%" if s["ece"] is not None else "ECE n/a"
        ax.set_title(f"{title}\n{ece_txt}, acc {s['acc']:.1f}%", fontsize=9)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="upper left")
        total = sum(n for *_, n in rows) or 1
        hist.bar(centres, [n / total for *_, n in rows], width, color="tab:gray")
        hist.set_xlim(0, 1)
        hist.set_xlabel("confidence (top-1 probability)")
        hist.set_ylabel("share")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
