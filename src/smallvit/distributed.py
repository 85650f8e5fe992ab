"""torchrun support: process-group setup, the step seed, and collectives that never leave a rank waiting.

Launch: `torchrun --nproc_per_node=N -m smallvit.cli train ...` (NCCL on GPUs, gloo on CPU). Every rank holds
the whole dataset and takes a contiguous slice of each global batch (see train.py); rank 0 evaluates and writes.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError
from .data import DataError
from .runs import CheckpointError, RunBusyError, TrainingError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():  # config.py checked the form
        raise ConfigError(f"train.device={name} but this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


def setup(device_cfg: str):
    """torchrun: NCCL on GPUs, gloo on CPU. Returns (rank, world_size, device, whether we created the group)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, resolve_device(device_cfg), False
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_cfg.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device_cfg} but CUDA is not available; use train.device=cpu or auto")
    use_cuda = torch.cuda.is_available() and device_cfg != "cpu"
    if use_cuda and local >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local} but only {torch.cuda.device_count()} GPUs on this node; "
                          f"use torchrun --nproc_per_node={torch.cuda.device_count()} or fewer")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device, created


def step_seed(seed: int, step: int) -> int:
    """Seed of the global torch RNG (drop path) for one step, the same on every rank (the model draws for the global
    batch and keeps its rows: model.draw_for_global_batch), so a resumed run draws the same masks."""
    # The 0 was the rank when each rank drew its own masks: kept so that one-process runs draw as before.
    return int(np.random.SeedSequence([seed, 0, step]).generate_state(1, np.uint64)[0] >> 1)


def gather_batch(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's `x` (its slice of one global batch) concatenated in rank order: the global batch's tensor."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def any_rank(flag: torch.Tensor, world: int) -> bool:
    """True if `flag` (a boolean tensor) is true on any rank."""
    flag = flag.float()
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# Errors that a rank raises with the message rank 0 gave, so every process prints the same clear line.
_ERRORS = {c.__name__: c for c in (ConfigError, DataError, CheckpointError, RunBusyError, TrainingError)}


def on_rank0(fn, world: int):
    """Run fn on rank 0 only (files, evaluation) and give its result, or its error, to every rank.

    Without this the other ranks would wait in their next collective until a timeout when rank 0 fails.
    """
    if world == 1:
        return fn()
    payload = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except Exception as e:  # noqa: BLE001  (any failure on rank 0 must reach the other ranks)
            error = e
            payload = [("error", type(e).__name__, str(e))]
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if payload[0][0] == "error":
        raise _ERRORS.get(payload[0][1], TrainingError)(payload[0][2])
    return payload[0][1]


def on_every_rank(fn, world: int):
    """Run fn on every rank; if it fails on any rank, fail on all of them instead of leaving the others waiting."""
    error, value = None, None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001  (any failure on one rank must reach the other ranks)
        error = e
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, msg) for r, msg in enumerate(errors) if msg]
        if failed and error is None:
            raise TrainingError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    if error is not None:
        raise error
    return value


# CUDA graphs of a compiled DDP module crash or hang (pytorch/pytorch#140395, open: max-autotune under DDP since
# 2.5; #128218): under torchrun, the modes that capture CUDA graphs run as their graph-free counterparts.
_NO_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_mode(mode: str, world: int) -> tuple[str, str | None]:
    """The torch.compile mode to use for train.compile_mode=`mode` with `world` processes, and a note if it changed."""
    if world == 1 or mode not in _NO_CUDAGRAPHS:
        return mode, None
    new = _NO_CUDAGRAPHS[mode]
    return new, (f"train.compile_mode={mode} captures CUDA graphs, which crash on a compiled DDP module "
                 f"(pytorch/pytorch#140395); under torchrun it runs as {new}")

