"""Throughput of the batched training augmentation against the reference's per-image PIL pipeline.

Compares, side by side in one run on the current device:
  * smallvit.augment.BatchAugment with the default AugConfig (flip, pad-4 crop, CIFAR-10 AutoAugment, normalise,
    Random Erasing, Mixup/CutMix, label smoothing) on uint8 batches already on the device;
  * the standard torchvision pipeline, image by image on PIL images in a plain loop (single process): RandomCrop(32,
    padding=4), RandomHorizontalFlip, AutoAugment(CIFAR10), ToTensor, Normalize, RandomErasing; the PIL conversion
    of each image is timed too, as a torchvision dataset does it in __getitem__;
  * optionally the same per-image pipeline in a DataLoader with worker processes (the reference's set-up).

Usage: python benchmarks/bench_augment.py [--device cpu|cuda] [--threads 1] [--out results.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout's smallvit, installed or not
from timing import images_per_second

from smallvit import augment, cpu_kernels, data
from smallvit.config import AugConfig
from smallvit.datasets import DATASETS
from smallvit.train import chunk_steps

MEAN, STD = DATASETS["cifar10"].mean, DATASETS["cifar10"].std


def load_images(data_dir: str, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first n CIFAR-10 training images if present under data_dir, else random uint8 images."""
    try:
        x, y = data.load("cifar10", data_dir=data_dir, download=False, train=True)
        return x[:n].contiguous(), y[:n].contiguous(), f"CIFAR-10 train ({data_dir})"
    except data.DataError:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        return x, torch.randint(0, 10, (n,), generator=g), "random uint8 (CIFAR-10 not found)"


def bench_batched(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, device: torch.device,
                  k: int = 1) -> float:
    """img/s of BatchAugment as train.py runs it: the per-sample part on k batches per call, the mixing
    per batch; inputs already on the device, 3 warm-up chunks, `steps` rounded up to whole chunks."""
    aug = augment.BatchAugment(AugConfig(), MEAN, STD, num_classes=10, label_smoothing=0.1, device=device, seed=0)
    x, y = x.to(device), y.to(device)
    n = batch * k
    nc = x.shape[0] // n

    def run(c: int) -> None:
        xs, ys = x[(c % nc) * n:(c % nc + 1) * n], y[(c % nc) * n:(c % nc + 1) * n]
        xa = aug.images(xs, c)
        for j in range(k):
            aug.targets(xa[j * batch:(j + 1) * batch], ys[j * batch:(j + 1) * batch], c * k + j)

    return images_per_second(run, -(-steps // k), 3, n, device)


def bench_stages(x: torch.Tensor, y: torch.Tensor, batch: int, call: int, steps: int, device: torch.device
                 ) -> list[tuple[str, int, float]]:
    """(stage, images per call, ms per call) of each stage of BatchAugment, timed alone on the same images: the
    per-sample stages on `call` images at a time (train.py's chunk), the batch mixing on `batch`."""
    from smallvit import autoaugment

    cfg, g = AugConfig(), torch.Generator(device=device)
    aug = augment.BatchAugment(cfg, MEAN, STD, num_classes=10, label_smoothing=0.1, device=device, seed=0)
    x, y = x.to(device), y.to(device)
    nb = x.shape[0] // call
    xb = lambda i: x[(i % nb) * call:(i % nb + 1) * call]
    cropped = augment.crop_flip(xb(0), cfg.crop_pad, cfg.flip, g)
    normed = augment.normalise(cropped, aug.scale, aug.shift)
    targets = augment.smooth_targets(y[:batch], 10, 0.1)
    aa = lambda i, sync_free=None: autoaugment.autoaugment(xb(i), "cifar10", g, sync_free=sync_free)
    stages = {
        "crop + flip": (call, lambda i: augment.crop_flip(xb(i), cfg.crop_pad, cfg.flip, g)),
        "AutoAugment (CIFAR-10 policy)": (call, aa),
        # Both AutoAugment paths on this device, whichever is the default here: sorted sub-batches (one host sync
        # per call) or every op family on the whole batch with neutral parameters (no sync).
        "&nbsp;&nbsp;AutoAugment, sorted sub-batches": (call, lambda i: aa(i, False)),
        "&nbsp;&nbsp;AutoAugment, sync-free (whole batch)": (call, lambda i: aa(i, True)),
        "normalise": (call, lambda i: augment.normalise(cropped, aug.scale, aug.shift)),
        "Random Erasing": (call, lambda i: augment.random_erasing(normed, cfg, aug.mean, np.random.default_rng(i),
                                                                   inplace=True)),
        "Mixup / CutMix + smoothing (per step)": (batch, lambda i: augment.mix(normed[:batch], targets, cfg,
                                                                               np.random.default_rng(i), g)),
    }
    return [(name, n, 1e3 * n / images_per_second(fn, max(1, steps * batch // n), 3, n, device))
            for name, (n, fn) in stages.items()]


def without_kernels(fn):
    """fn() with smallvit's fused CPU kernels (cpu_kernels.py) switched off."""
    before, cpu_kernels.ENABLED = cpu_kernels.ENABLED, False
    try:
        return fn()
    finally:
        cpu_kernels.ENABLED = before


def pil_pipeline() -> T.Compose:
    """The reference's per-image training transform (reference §5.3), built from standard torchvision parts."""
    return T.Compose([
        T.RandomCrop(32, padding=4),
        T.RandomHorizontalFlip(),
        T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, fill=[128, 128, 128]),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
        T.RandomErasing(p=0.25, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=list(MEAN)),
    ])


class PILDataset(torch.utils.data.Dataset):
    """uint8 CHW images served as PIL images through a transform, like torchvision's CIFAR10 dataset."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.tf = x.permute(0, 2, 3, 1).contiguous().numpy(), y.numpy(), pil_pipeline()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.tf(Image.fromarray(self.x[i])), int(self.y[i])


def bench_pil_loop(x: torch.Tensor, n: int) -> float:
    """img/s of the per-image pipeline in a plain loop in this process."""
    ds = PILDataset(x[:n], torch.zeros(n, dtype=torch.long))
    for i in range(20):  # warm-up
        ds[i]
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - t0)


def bench_loader(x: torch.Tensor, y: torch.Tensor, batch: int, workers: int, batches: int) -> float:
    """img/s of a DataLoader with `workers` processes running the per-image pipeline (first batch not timed)."""
    n = min(x.shape[0], batch * (batches + 1))
    loader = torch.utils.data.DataLoader(PILDataset(x[:n], y[:n]), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    count = sum(xb.shape[0] for xb, _ in it)
    return count / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for this process (default 1)")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=100, help="timed batches for BatchAugment")
    p.add_argument("--pil-images", type=int, default=8000, help="images for the per-image PIL loop")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers; 0 skips that row")
    p.add_argument("--loader-batches", type=int, default=30, help="timed DataLoader batches")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds; medians are reported")
    p.add_argument("--out", default="", help="also write the Markdown table to this file")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = max(args.batch_size * 8, args.pil_images, args.batch_size * (args.loader_batches + 1),
            2 * chunk_steps(AugConfig().chunk_images, args.batch_size, device) * args.batch_size)
    x, y, source = load_images(args.data_dir, n)

    # The rows are measured in alternating rounds and each reported as its median: this VM's speed drifts by up to
    # 30% within minutes, and one long measurement per row would compare rows taken at different speeds.
    k = chunk_steps(AugConfig().chunk_images, args.batch_size, device)
    runs = {"torchvision per-image PIL loop (1 process)":
            lambda: bench_pil_loop(x, min(args.pil_images // args.rounds, x.shape[0]))}
    if args.loader_workers > 0:
        runs[f"torchvision per-image PIL, DataLoader ({args.loader_workers} workers)"] = \
            lambda: bench_loader(x, y, args.batch_size, args.loader_workers, args.loader_batches)
    runs[f"smallvit BatchAugment, batch {args.batch_size} on {device.type}, one batch per call"] = \
        lambda: bench_batched(x, y, args.batch_size, args.steps, device)
    if k > 1:
        runs[f"smallvit BatchAugment, batch {args.batch_size} on {device.type}, {k * args.batch_size} images per call "
             f"(train.py's default, aug.chunk_images=0)"] = lambda: bench_batched(x, y, args.batch_size, args.steps,
                                                                                 device, k)
    if device.type == "cpu" and cpu_kernels.ENABLED and k > 1:  # the same work without the fused CPU kernels
        runs["&nbsp;&nbsp;the same, PyTorch ops only (SMALLVIT_NUMBA=0, the code path CUDA runs)"] = \
            lambda: without_kernels(lambda: bench_batched(x, y, args.batch_size, args.steps, device, k))
    rates: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.rounds):
        for label, run in runs.items():
            rates[label].append(run())
    pils = rates[next(iter(runs))]
    pil = statistics.median(pils)
    rows = [(label, statistics.median(r), min(a / b for a, b in zip(r, pils)), max(a / b for a, b in zip(r, pils)))
            for label, r in rates.items()]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    title = (f"Augmentation throughput on {device} ({name}), torch {torch.__version__}, "
             f"{args.threads} torch thread(s), data: {source}.")
    note = ("Speed-up is relative to the per-image PIL loop; the range is each round's rate over the same round's PIL "
            "loop. BatchAugment also does Mixup/CutMix and label "
            "smoothing; the PIL pipeline stops at Random Erasing (batch mixing costs little either way).")
    head = f"| pipeline | img/s (median of {args.rounds} rounds) | speed-up | speed-up range over rounds |"
    lines = [title, "", head, "|---|---:|---:|---:|"]
    lines += [f"| {label} | {rate:,.0f} | {rate / pil:.1f}x | {lo:.1f}-{hi:.1f}x |" for label, rate, lo, hi in rows]
    where = "Where BatchAugment's time goes (each stage timed alone, at train.py's images per call):"
    lines += ["", note, "", where, "", "| stage | images per call | ms per call | µs per image |",
              "|---|---:|---:|---:|"]
    call = k * args.batch_size
    lines += [f"| {name} | {n} | {ms:.2f} | {1e3 * ms / n:.2f} |"
              for name, n, ms in bench_stages(x, y, args.batch_size, call, args.steps, device)]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
