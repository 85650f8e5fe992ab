"""Parameter groups, optimisers (AdamW, Lion, Muon) and the LR schedule as a pure function of the step."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .config import OptimConfig


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """SPEC 8: linear warm-up from `floor` over `warmup_steps`, then one cosine to `floor` at `total_steps`."""
    if step < warmup_steps:
        return floor + (peak - floor) * step / warmup_steps
    if step >= total_steps:
        return floor
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2


def _no_decay(name: str, p: nn.Parameter, skip: frozenset[str] = frozenset()) -> bool:
    return p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) or name in skip


def _muon(name: str, p: nn.Parameter, skip: frozenset[str] = frozenset()) -> bool:
    # Hidden 2-D matrices go to Muon. The patch embedding (a conv, the input layer), the tokens, the
    # position embedding, the head and every 1-D tensor go to AdamW (fixes SPEC bug 9, where the
    # substring "fc" sent every MLP weight to AdamW and the 3-D cls_token to Muon). So do the tensors the model
    # names in no_weight_decay() (Swin's relative-position bias tables are 2-D but are not weight matrices).
    return p.ndim == 2 and not name.startswith(("head", "patch_embed", "pos_embed", "cls_token")) and name not in skip


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups with a `peak_lr` each; the schedule scales every group's lr by the same factor."""
    skip = frozenset(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else frozenset()
    _is_no_decay = functools.partial(_no_decay, skip=skip)
    _is_muon = functools.partial(_muon, skip=skip)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.name == "muon":
        muon = [p for n, p in params if _is_muon(n, p)]
        rest = [(n, p) for n, p in params if not _is_muon(n, p)]
        groups = [dict(params=muon, peak_lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, use_fallback=False,
                       kind="muon")]
        if cfg.decay_all:
            groups.append(dict(params=[p for _, p in rest], peak_lr=cfg.lr, weight_decay=cfg.weight_decay,
                               use_fallback=True, kind="adamw"))
        else:
            groups.append(dict(params=[p for n, p in rest if not _is_no_decay(n, p)], peak_lr=cfg.lr,
                               weight_decay=cfg.weight_decay, use_fallback=True, kind="adamw"))
            groups.append(dict(params=[p for n, p in rest if _is_no_decay(n, p)], peak_lr=cfg.lr,
                               weight_decay=0.0, use_fallback=True, kind="adamw-no-decay"))
    elif cfg.decay_all:  # the reference: one group, decay on everything (SPEC 7.1)
        groups = [dict(params=[p for _, p in params], peak_lr=cfg.lr, weight_decay=cfg.weight_decay, kind="all")]
    else:
        groups = [
            dict(params=[p for n, p in params if not _is_no_decay(n, p)], peak_lr=cfg.lr,
                 weight_decay=cfg.weight_decay, kind="decay"),
            dict(params=[p for n, p in params if _is_no_decay(n, p)], peak_lr=cfg.lr, weight_decay=0.0,
                 kind="no-decay"),
        ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = g["peak_lr"]
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch, fused on CUDA), Lion or Muon (timm's implementations)."""
    groups = param_groups(model, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda")
    if cfg.name == "lion":
        from timm.optim import Lion

        # Lion's own betas (0.9, 0.99) as lion-pytorch's defaults (SPEC 7.2); lr is the config's.
        return Lion(groups, lr=cfg.lr, betas=(0.9, 0.99))
    if cfg.name == "muon":
        from timm.optim import Muon

        # "original" keeps Keller Jordan's update scale, for which 0.02 is the tuned Muon learning rate.
        return Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn="original",
                    betas=(0.9, 0.95))
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def set_lr(opt: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to the schedule's value scaled to that group's peak; return group 0's lr."""
    for g in opt.param_groups:
        g["lr"] = g["peak_lr"] * factor
    return opt.param_groups[0]["lr"]


def schedule_factor(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig) -> float:
    """The schedule relative to the peak: lr_at(...) / cfg.lr, so every group follows the same shape."""
    return lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr) / cfg.lr
