"""Honest timing shared by the benchmark scripts: synchronise the device before every clock read, skip warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(fn: Callable[[int], object], steps: int, warmup: int, images_per_step: int,
                      device: torch.device) -> float:
    """Run fn(0..warmup-1) untimed, then fn(0..steps-1) timed; return images per second."""
    for i in range(warmup):
        fn(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(i)
    sync(device)
    return steps * images_per_step / (time.perf_counter() - t0)
