"""Parameter groups, optimisers (AdamW, Lion, Muon) and the LR schedule as a pure function of the step."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch
from torch import nn

from .config import OptimConfig


def resolve_lr(cfg: OptimConfig, global_batch: int) -> OptimConfig:
    """cfg with optim.lr as the absolute peak: optim.lr_scale=per256 multiplies it by global_batch / 256 (the linear
    scaling rule, as DINO's and the parent's train_ssl.py line 320). train, pretrain and `info` all go through here."""
    if cfg.lr_scale == "absolute":
        return cfg
    return replace(cfg, lr=cfg.lr * global_batch / 256, lr_scale="absolute")


def _check_resolved(cfg: OptimConfig) -> None:
    # A per-256 rate read as absolute would silently train at the wrong peak: one path, resolve_lr, scales it.
    if cfg.lr_scale != "absolute":
        raise ValueError("optim.lr_scale=per256: pass optim.resolve_lr(cfg, global_batch) to the optimiser/schedule")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float, shape: str = "cosine",
          decay_fraction: float = 1.0, start: float | None = None) -> float:
    """reference §8: linear warm-up from `start` (default `floor`) over `warmup_steps`, then one cosine to `floor` at
    `total_steps`.

    Other shapes after the warm-up: "linear" (a straight line to `floor`), "wsd" (warm-up, stable, decay: the peak
    until the last `decay_fraction` of the steps after warm-up, then a straight line to `floor`; Hu et al. 2024)."""
    if step < warmup_steps:
        start = floor if start is None else start
        return start + (peak - start) * step / warmup_steps
    if step >= total_steps:
        return floor
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if shape == "linear":
        return floor + (peak - floor) * (1 - t)
    if shape == "wsd":
        return floor + (peak - floor) * min(1.0, (1 - t) / decay_fraction)
    return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2


def _no_decay(name: str, p: nn.Parameter, skip: frozenset[str] = frozenset(), rule: str = "1d-tokens") -> bool:
    if rule == "1d":  # DINO's get_params_groups: biases and 1-D tensors (norms) only; tokens and tables decay
        return p.ndim <= 1 or name.endswith(".bias")
    return p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) or name in skip


def _muon(name: str, p: nn.Parameter, skip: frozenset[str] = frozenset()) -> bool:
    # Hidden 2-D matrices go to Muon. The patch embedding (a conv, the input layer), the tokens, the
    # position embedding, the head and every 1-D tensor go to AdamW (fixes reference §12.9, where the
    # substring "fc" sent every MLP weight to AdamW and the 3-D cls_token to Muon). So do the tensors the model
    # names in no_weight_decay() (Swin's relative-position bias tables are 2-D but are not weight matrices).
    return p.ndim == 2 and not name.startswith(("head", "patch_embed", "pos_embed", "cls_token")) and name not in skip


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups with a `peak_lr` each; the schedule scales every group's lr by the same factor."""
    _check_resolved(cfg)
    skip = frozenset(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else frozenset()
    _is_no_decay = functools.partial(_no_decay, skip=skip, rule=cfg.no_decay)
    _is_muon = functools.partial(_muon, skip=skip)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.name == "muon":
        muon = [p for n, p in params if _is_muon(n, p)]
        rest = [(n, p) for n, p in params if not _is_muon(n, p)]
        # use_muon: the split above decides, not timm's shape heuristics. timm's Muon sends a fallback group to
        # NAdamW when the group has nesterov=True and to AdamW otherwise, so each group says which (muon_fallback).
        fb = dict(use_fallback=True, nesterov=cfg.muon_fallback == "nadamw")
        groups = [dict(params=muon, peak_lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, use_fallback=False,
                       use_muon=True, nesterov=True, kind="muon")]
        if cfg.decay_all:
            groups.append(dict(params=[p for _, p in rest], peak_lr=cfg.lr, weight_decay=cfg.weight_decay, **fb,
                               kind=cfg.muon_fallback, decay_scheduled=True))
        else:
            groups.append(dict(params=[p for n, p in rest if not _is_no_decay(n, p)], peak_lr=cfg.lr,
                               weight_decay=cfg.weight_decay, **fb, kind=cfg.muon_fallback, decay_scheduled=True))
            groups.append(dict(params=[p for n, p in rest if _is_no_decay(n, p)], peak_lr=cfg.lr,
                               weight_decay=0.0, **fb, kind=f"{cfg.muon_fallback}-no-decay"))
    elif cfg.decay_all:  # the reference: one group, decay on everything (reference §7.1)
        groups = [dict(params=[p for _, p in params], peak_lr=cfg.lr, weight_decay=cfg.weight_decay, kind="all",
                       decay_scheduled=True)]
    else:
        groups = [
            dict(params=[p for n, p in params if not _is_no_decay(n, p)], peak_lr=cfg.lr,
                 weight_decay=cfg.weight_decay, kind="decay", decay_scheduled=True),
            dict(params=[p for n, p in params if _is_no_decay(n, p)], peak_lr=cfg.lr, weight_decay=0.0,
                 kind="no-decay"),
        ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = g["peak_lr"]
        # decay_scheduled: the group decays by optim.weight_decay, so a weight-decay schedule (pretrain's DINO
        # cosine) moves it; False for the no-decay groups and Muon's (its own muon_weight_decay).
        g.setdefault("decay_scheduled", False)
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch, fused on CUDA), Lion or Muon (timm's implementations)."""
    groups = param_groups(model, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda")
    if cfg.name == "lion":
        from timm.optim import Lion

        # Lion's own betas (0.9, 0.99) as lion-pytorch's defaults (reference §7.2); lr is the config's.
        return Lion(groups, lr=cfg.lr, betas=(0.9, 0.99))
    if cfg.name == "muon":
        from timm.optim import Muon

        # "original" keeps Keller Jordan's update scale, for which 0.02 is the tuned Muon learning rate.
        # Nesterov momentum for the Muon matrices; the fallback groups carry their own flag (param_groups).
        return (_batched_muon_class() if cfg.muon_batched else Muon)(
            groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn="original",
            betas=(0.9, 0.95))
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def match_device(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """After load_state_dict: give AdamW this device's fused choice back (load_state_dict restores the saved
    groups' options, so a CPU checkpoint resumed on CUDA would run unfused), with its step counters where the
    fused kernel reads them (on the parameter's device, float32)."""
    fused = device.type == "cuda"
    for g in opt.param_groups:
        if "fused" not in g or g["fused"] == fused:
            continue
        g["fused"] = fused
        if fused:
            g["foreach"] = None
        for p in g["params"]:
            step = opt.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                opt.state[p]["step"] = step.to(p.device, torch.float32)


@functools.cache
def _batched_muon_class():
    """timm's Muon, with each Muon group's same-shape matrices stepped as one stack (imported only for muon)."""
    from timm.optim import Muon
    from timm.optim.muon import muon

    class BatchedMuon(Muon):
        """timm's step, matrix by matrix, costs a few dozen ops per matrix (2,414 at depth 12, counted on CPU by
        tests/sync_census.py; most are kernel launches on a GPU). Here the matrices of one shape are stacked (m, n, k)
        and go through timm's own functional update once, in its batched mode (k matrices of (m, n): the same momentum,
        Newton-Schulz iteration and lr scale per matrix; 138 ops at any depth), then are copied back. The state
        (momentum_buffer per parameter) is timm's, so checkpoints move between the two. Fallback groups take
        timm's step unchanged."""

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            groups = self.param_groups
            stacked = [g for g in groups if g.get("use_muon") and g.get("algo", "muon") == "muon"]
            for g in stacked:
                self._step_stacked(g)
            self.param_groups = [g for g in groups if not any(g is s for s in stacked)]
            try:
                if self.param_groups:
                    super().step()
            finally:
                self.param_groups = groups
            return loss

        def _step_stacked(self, group: dict) -> None:
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["use_muon"] = True
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                by_shape.setdefault((p.shape, p.dtype, p.device), []).append(p)
            for ps in by_shape.values():
                bufs = [self.state[p]["momentum_buffer"] for p in ps]
                P, B = torch.stack(ps, -1), torch.stack(bufs, -1)
                muon([P], [torch.stack([p.grad for p in ps], -1)], [B], lr=group["lr"],
                     weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
                     ns_steps=group["ns_steps"], ns_coefficients=group["ns_coefficients"], eps=group["eps"],
                     safety_factor=group["safety_factor"], adjust_lr_fn=group["adjust_lr_fn"], conv_mode="batched",
                     normalize_spatial=False, scale_eps=group["scale_eps"], capturable=group["capturable"])
                torch._foreach_copy_(ps, list(P.unbind(-1)))
                torch._foreach_copy_(bufs, list(B.unbind(-1)))

    return BatchedMuon


def set_lr(opt: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to the schedule's value scaled to that group's peak; return group 0's lr."""
    for g in opt.param_groups:
        g["lr"] = g["peak_lr"] * factor
    return opt.param_groups[0]["lr"]


def schedule_factor(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig) -> float:
    """The schedule relative to the peak: lr_at(...) / cfg.lr, so every group follows the same shape."""
    _check_resolved(cfg)
    start = 0.0 if cfg.warmup_from == "zero" else cfg.min_lr
    return lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr, cfg.schedule, cfg.decay_fraction, start) / cfg.lr
