"""One training function, read top to bottom: setup, a step-based loop, evaluation, records."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import data as D
from .augment import BatchAugment
from .config import Config, ConfigError, diff, to_dict
from .model import build_model, count_params, flops_per_image
from .optim import build_optimizer, schedule_factor, set_lr
from .runs import (CHECKPOINT, CheckpointError, Records, atomic_write_json, environment, load_checkpoint,
                   load_model_state, read_metrics, save_checkpoint)

# Keys that may differ between a checkpoint and the resuming config (they do not change the result).
RESUME_FREE_KEYS = {"train.max_steps", "train.progress", "train.log_every_steps", "train.device", "train.threads",
                    "train.compile", "data.data_dir", "data.download"}


class TrainingError(RuntimeError):
    """Training stopped for a reason the message explains (e.g. a non-finite loss)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return torch.device(name)


def default_run_dir(cfg: Config, root: str = "runs") -> Path:
    """Deterministic folder name from the diff against the baseline: same config, same folder."""
    d = {k: v for k, v in diff(cfg).items() if k not in RESUME_FREE_KEYS and k != "train.seed"}
    slug = "-".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(d.items())) or "baseline"
    slug = slug.replace("/", "_").replace(" ", "").replace("(", "").replace(")", "").replace(",", "_")
    if len(slug) > 120:
        import hashlib

        slug = slug[:100] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:10]
    return Path(root) / slug / f"seed{cfg.train.seed}"


@torch.no_grad()
def evaluate(model, x_test, y_test, mean, std, batch_size: int = 500, autocast=contextlib.nullcontext):
    """Top-1 accuracy (%) and mean cross-entropy on a uint8 test set held on the device."""
    model.eval()
    correct = torch.zeros((), device=x_test.device)
    loss = torch.zeros((), device=x_test.device)
    for i in range(0, len(x_test), batch_size):
        xb = D.normalize(x_test[i : i + batch_size], mean, std)
        yb = y_test[i : i + batch_size]
        with autocast():
            logits = model(xb)
        loss += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train()
    n = len(x_test)
    return 100.0 * correct.item() / n, loss.item() / n


def _dist_setup(device_cfg: str):
    """torchrun: NCCL on GPUs, gloo on CPU. Returns (rank, world_size, device)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, resolve_device(device_cfg)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device_cfg != "cpu"
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def train(cfg: Config, out_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train `cfg`; write records to `out_dir` (default: a deterministic folder under runs/); return the result.

    The result dict holds the final and best test accuracy, steps, wall time, throughput, params and FLOPs.
    """
    t, m, o, a = cfg.train, cfg.model, cfg.optim, cfg.aug
    rank, world, device = _dist_setup(t.device)
    main = rank == 0
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    out = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    ckpt_path = out / CHECKPOINT
    if main and not resume and (ckpt_path.exists() or (out / "result.json").exists()):
        raise CheckpointError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    # ---- data: the whole dataset as uint8 on the device
    info = D.DATASETS[cfg.data.dataset]
    if m.num_classes != info.num_classes:
        raise ConfigError(f"model.num_classes={m.num_classes} but {cfg.data.dataset} has {info.num_classes} classes")
    x_train, y_train = D.load(cfg.data.dataset, cfg.data.data_dir, cfg.data.download, train=True, device=device)
    x_test, y_test = D.load(cfg.data.dataset, cfg.data.data_dir, cfg.data.download, train=False, device=device)
    if cfg.data.subset:
        x_train, y_train = x_train[: cfg.data.subset], y_train[: cfg.data.subset]
    if cfg.data.test_subset:
        x_test, y_test = x_test[: cfg.data.test_subset], y_test[: cfg.data.test_subset]
    mean = torch.tensor(info.mean, device=device)
    std = torch.tensor(info.std, device=device)
    n = len(x_train)
    spe = D.steps_per_epoch(n, a.repeats, t.batch_size)
    if spe == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {n * a.repeats} samples per epoch")
    total_steps = t.epochs * spe
    warmup_steps = o.warmup_epochs * spe
    last_step = min(total_steps, t.max_steps) if t.max_steps else total_steps
    eval_steps = {e * spe for e in range(1, t.epochs + 1) if t.eval_every_epochs and e % t.eval_every_epochs == 0}
    eval_steps = {s for s in eval_steps if s < last_step} | {last_step}  # always evaluate the end (SPEC bug 11)

    # ---- model and optimiser
    torch.manual_seed(t.seed)
    model = build_model(m).to(device)
    if m.patch_init == "whiten":  # from un-augmented images, so every rank computes the same filters
        from .whiten import whiten_patch_embed

        whiten_patch_embed(model.patch_embed, x_train[: m.whiten_images], info.mean, info.std, m.whiten_filters,
                           seed=t.seed)
    n_params, flops = count_params(model), flops_per_image(model)
    opt = build_optimizer(model, o, device)
    precision = ("bf16" if device.type == "cuda" else "fp32") if t.precision == "auto" else t.precision

    def autocast():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- resume
    step, best_acc, history = 0, 0.0, []
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        changed = {k: v for k, v in diff(cfg, _config_from(state)).items() if k not in RESUME_FREE_KEYS}
        if changed:
            raise CheckpointError(f"{ckpt_path} was written with a different config ({changed}); "
                                  f"resume with the same settings or start a new --out folder")
        load_model_state(model, state["model"], str(ckpt_path))
        opt.load_state_dict(state["optimizer"])
        step, best_acc, history = state["step"], state["best_acc"], state.get("history", [])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        if main:
            _truncate_metrics(out, step)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                              else None)
    fwd = torch.compile(ddp_model) if t.compile else ddp_model
    augment = BatchAugment(a, info.mean, info.std, m.num_classes, t.label_smoothing, device, seed=t.seed + rank)

    # ---- records
    records = Records(out, enabled=main)
    if main:
        atomic_write_json(out / "config.json", to_dict(cfg))
        atomic_write_json(out / "overrides.json", diff(cfg))
        atomic_write_json(out / "env.json", environment(device))

    def checkpoint():
        if main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "best_acc": best_acc,
                "history": history, "config": to_dict(cfg), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            })

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    bar = None
    if main and t.progress:
        from tqdm import tqdm

        bar = tqdm(total=last_step, initial=step, dynamic_ncols=True, unit="step")

    # ---- the loop
    per_rank = t.batch_size // world
    loss_sum = torch.zeros((), device=device)
    loss_count, seen, timed, timer_start = 0, 0, 0.0, None
    wall_start = time.perf_counter()
    epoch_cache = (-1, None)
    try:
        while step < last_step:
            epoch, i = divmod(step, spe)
            if epoch_cache[0] != epoch:  # the sample order is a pure function of (seed, epoch)
                epoch_cache = (epoch, D.epoch_indices(n, epoch, t.seed, a.repeats, a.repeat_mode, t.batch_size)
                               .to(device))
            idx = epoch_cache[1][i * t.batch_size : (i + 1) * t.batch_size][rank * per_rank : (rank + 1) * per_rank]
            lr = set_lr(opt, schedule_factor(step, total_steps, warmup_steps, o))
            xb, tb = augment(x_train[idx], y_train[idx], step)
            with autocast():
                logits = fwd(xb)
            loss = torch.sum(-tb * F.log_softmax(logits.float(), dim=1), dim=1).mean()  # soft-target CE
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            check_now = device.type == "cpu" or t.on_nonfinite == "skip"
            if check_now and not torch.isfinite(loss):
                if t.on_nonfinite == "stop":
                    raise TrainingError(_nonfinite_msg(step, ckpt_path))
                opt.zero_grad(set_to_none=True)
                records.log(step, event="skipped_nonfinite")
            else:
                opt.step()
                loss_sum += loss.detach()
                loss_count += 1
            step += 1
            if timer_start is None:  # the first step of a (re)start (compile, warm-up) is not timed
                _sync(device)
                timer_start = time.perf_counter()
            else:
                seen += t.batch_size
            if bar is not None:
                bar.update(1)
            if step % t.log_every_steps == 0 or step == last_step:
                avg = loss_sum.item() / max(loss_count, 1)  # one host sync per log interval, not per step
                if not math.isfinite(avg):
                    raise TrainingError(_nonfinite_msg(step, ckpt_path, before=True))
                _sync(device)
                elapsed = timed + (time.perf_counter() - timer_start if timer_start else 0.0)
                ips = seen / elapsed if elapsed > 0 else 0.0
                records.log(step, loss=avg, lr=lr, img_per_s=ips, epoch=step / spe)
                if bar is not None:
                    bar.set_postfix(loss=f"{avg:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                loss_sum.zero_()
                loss_count = 0
            if step in eval_steps or stop["signal"]:
                if timer_start is not None:  # evaluation time is not training time
                    _sync(device)
                    timed += time.perf_counter() - timer_start
                if step in eval_steps and main:
                    acc, test_loss = evaluate(model, x_test, y_test, mean, std, autocast=autocast)
                    best_acc = max(best_acc, acc)
                    history.append({"step": step, "epoch": step / spe, "test_acc": acc})
                    records.log(step, test_acc=acc, test_loss=test_loss, epoch=step / spe)
                    if bar is not None:
                        bar.write(f"step {step} epoch {step / spe:.2f}: test acc {acc:.2f}%  loss {test_loss:.4f}")
                checkpoint()
                if timer_start is not None:
                    timer_start = time.perf_counter()
                if stop["signal"]:
                    if bar is not None:
                        bar.write(f"{stop['signal']}: checkpoint saved at step {step}; continue with --resume")
                    break
    finally:
        if bar is not None:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        records.close()

    final_acc = history[-1]["test_acc"] if history else float("nan")
    result = {
        "status": "interrupted" if stop["signal"] else ("done" if step >= total_steps else "stopped_at_max_steps"),
        "final_test_acc": final_acc,
        "best_test_acc": best_acc,
        "step": step,
        "total_steps": total_steps,
        "epochs_done": step / spe,
        "train_img_per_s": seen / timed if timed > 0 else None,
        "train_seconds": timed,
        "wall_seconds": time.perf_counter() - wall_start,
        "params": n_params,
        "flops_per_image": flops,
        "device": environment(device)["device"],
        "world_size": world,
        "precision": precision,
        "run_dir": str(out),
        "overrides": diff(cfg),
    }
    if main and not stop["signal"]:
        atomic_write_json(out / "result.json", result)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nonfinite_msg(step: int, ckpt: Path, before: bool = False) -> str:
    where = f"in the steps before step {step}" if before else f"at step {step}"
    return (f"non-finite loss {where}; training stopped. The last good checkpoint is {ckpt} (if one was written). "
            f"Lower optim.lr, set optim.grad_clip, or set train.on_nonfinite=skip to skip such steps.")


def _config_from(state: dict) -> Config:
    from .config import from_dict

    return from_dict(state["config"])


def _truncate_metrics(out: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so the record has no duplicates."""
    rows = [r for r in read_metrics(out) if r.get("step", 0) <= step]
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
