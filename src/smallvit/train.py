"""One training function, read top to bottom: setup, a step-based loop, evaluation, records.

Reliability (docs/reliability.md): checkpoints are written atomically at evaluations, every
`train.checkpoint_every_steps` steps and on SIGINT/SIGTERM, and a resumed run repeats the uninterrupted one
exactly on CPU, because the data order, the augmentation and the drop-path randomness are pure functions of the
seed and the global step and sample, never of the rank (the per-sample augmentation of (seed, chunk of
aug.chunk_images images of global batches), recomputed whole when a run resumes inside a chunk).
Under torchrun every rank takes a contiguous slice of each global batch of `train.batch_size` images (data.Shard):
each random draw is made for the global batch and cut to the rank's slice, and Mixup/CutMix partners come from the
whole global batch (an all-gather on mixed steps), so N processes train the one-process experiment, equal up to
the order of float sums; the learning rate is for that global batch (no scaling with the number of processes).
A checkpoint records the number of processes and the device type; resuming on another number of processes is
exact, on another device type (other random generators) it is refused.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.profiler import record_function

from . import data as D
from . import distributed as dist_
from . import pretrained, wandb_log
from .augment import BatchAugment, resize, resolution_at
from .config import Config, ConfigError, diff, res_stages, to_dict
from .model import build_model, count_params, draw_for_global_batch, flops_per_image
from .optim import build_optimizer, match_device, resolve_lr, schedule_factor, set_lr
from .runs import (
    CHECKPOINT,
    CheckpointError,
    Records,
    RunLock,
    TrainingError,
    atomic_write_json,
    check_run_folder,
    check_same_config,
    default_run_dir,
    environment,
    load_checkpoint,
    load_model_state,
    remove_stale_temps,
    requeue_wait_s,
    save_checkpoint,
    truncate_metrics,
)

# Keys `smallvit train` never reads; the CLI refuses them when set (config.refuse_unread): the DINO section is
# `smallvit pretrain`'s.
UNREAD_KEYS = ("ssl.",)


@torch.no_grad()
def evaluate(model, x_test, y_test, mean, std, batch_size: int = 500, autocast=contextlib.nullcontext,
             flip: bool = False):
    """Top-1 accuracy (%) and mean cross-entropy on a uint8 test set held on the device; with `flip`, of the mean
    of each image's and its mirror's logits (flip test-time augmentation, train.eval_flip)."""
    model.eval()
    correct = torch.zeros((), device=x_test.device)
    loss = torch.zeros((), device=x_test.device)
    for i in range(0, len(x_test), batch_size):
        xb = D.normalize(x_test[i : i + batch_size], mean, std)
        yb = y_test[i : i + batch_size]
        with autocast():
            logits = model(xb)
            if flip:
                logits = (logits.float() + model(xb.flip(3)).float()) / 2
        loss += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train()
    n = len(x_test)
    return 100.0 * correct.item() / n, loss.item() / n


def train(cfg: Config, out_dir: str | Path | None = None, resume: bool = False, step_hook=None) -> dict:
    """Train `cfg`; write records to `out_dir` (default: a deterministic folder under runs/); return the result.

    `step_hook(step)`, if given, is called after every optimiser step (e.g. a torch.profiler's step, profile.py).

    The result dict holds the final and best test accuracy, steps, wall time, throughput, params and FLOPs.
    SIGINT/SIGTERM/SIGUSR2 finish the current step, write a checkpoint and return with status "interrupted".
    """
    return run_guarded(cfg.train.device, functools.partial(_train, cfg, out_dir, resume, step_hook=step_hook))


def run_guarded(device_cfg: str, body) -> dict:
    """Run body(rank, world, device, stop) under torchrun set-up, with SIGINT/SIGTERM/SIGUSR2 in stop["signal"]
    (the body checkpoints and returns) and OSErrors turned into one TrainingError line. Shared with pretrain.py.
    stop["held"] is an ExitStack for what the run holds until it returns, whatever happens (the run folder's lock)."""
    stop = {"signal": None, "held": contextlib.ExitStack()}

    def on_signal(signum, frame):
        if stop["signal"] and signum == signal.SIGINT:  # a second Ctrl-C: stop now (the checkpoint stays intact)
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name

    in_main_thread = threading.current_thread() is threading.main_thread()
    # SIGUSR2: SLURM's warning before a time limit (--signal=USR2@delay, as submitit asks; see slurm.py)
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    old_handlers = {s: signal.signal(s, on_signal) for s in stop_signals} if in_main_thread else {}
    created_group = False
    try:
        rank, world, device, created_group = dist_.setup(device_cfg)
        return body(rank, world, device, stop)
    except OSError as e:  # a full disk or a permission problem outside the checkpoint writer: one line, no traceback
        raise TrainingError(f"{e.filename or 'I/O error'}: {e.strerror or e}. Checkpoints already written are "
                            f"intact; fix the cause and run the same command with --resume.") from None
    finally:
        stop["held"].close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, out_dir, resume: bool, rank: int, world: int, device: torch.device, stop: dict,
           step_hook=None) -> dict:
    wall_start = time.perf_counter()  # wall time includes reading the data and building the model
    t, m, a = cfg.train, cfg.model, cfg.aug
    o = resolve_lr(cfg.optim, t.batch_size)  # optim.lr as the absolute peak of this global batch
    main = rank == 0
    every = t.checkpoint_every_steps  # 0: checkpoints only at evaluations and signals
    if t.wandb_project and main:  # before the run folder is made: a missing wandb writes nothing
        wandb_log.check_installed()
    out, finished = open_run(cfg, out_dir, resume, world, stop["held"])
    ckpt_path = out / CHECKPOINT
    if finished is not None:  # resuming a run that already ended: nothing to do, and its records stay as they are
        return finished

    # ---- data: the whole dataset as uint8 on the device (each rank reads its own copy)
    if world > 1 and cfg.data.download and cfg.data.dataset != D.FOLDER:
        # Rank 0 checks the files and downloads what is missing while the others wait (no two ranks writing one
        # folder at once); then every rank loads, checking the md5s again.
        dist_.on_rank0(lambda: bool(D.load(cfg.data.dataset, cfg.data.data_dir, True, train=False)), world)
    info = D.dataset_meta(cfg.data.dataset, cfg.data.data_dir, m.img_size,  # num_classes, mean, std, class_names
                          download=cfg.data.download)
    if m.num_classes != info.num_classes:
        raise ConfigError(f"model.num_classes={m.num_classes} but {cfg.data.dataset} has {info.num_classes} classes")
    (x_train, y_train), (x_test, y_test), val = load_data(cfg, device, world)
    # what the evaluations during training measure: with a validation split, the test set is seen once, at the end
    split, (x_eval, y_eval) = ("val", val) if val is not None else ("test", (x_test, y_test))
    mean = torch.tensor(info.mean, device=device)
    std = torch.tensor(info.std, device=device)
    n = len(x_train)
    spe, total_steps, warmup_steps, last_step, eval_steps = step_plan(cfg, n)

    # ---- model and optimiser
    torch.manual_seed(t.seed)
    model = build_model(m).to(device)
    if m.patch_init == "whiten":  # from un-augmented images, so every rank computes the same filters
        from .whiten import whiten_patch_embed

        whiten_patch_embed(model.patch_embed, x_train[: m.whiten_images], info.mean, info.std, m.whiten_filters,
                           seed=t.seed)
    init_report = None
    # A resumed run's weights come from its checkpoint (rank 0 looks: the others need not share its filesystem).
    if t.init_from and not dist_.on_rank0(lambda: resume and ckpt_path.is_file(), world):
        weights, kind = dist_.on_rank0(lambda: pretrained.read_state_dict(t.init_from), world)
        init_report = pretrained.apply_state_dict(model, weights, t.init_strict, t.init_from, kind)
        del weights
    n_params, flops = count_params(model), flops_per_image(model)
    opt = build_optimizer(model, o, device)
    ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=True) if t.ema_decay else None  # what evaluations score
    precision = ("bf16" if device.type == "cuda" else "fp32") if t.precision == "auto" else t.precision

    def autocast():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- resume: rank 0 reads the checkpoint and sends it to the others (no shared filesystem needed)
    step, best_acc, history, prior = 0, 0.0, [], {}
    state = dist_.on_rank0(lambda: _read_resume_state(ckpt_path, cfg, device) if resume and ckpt_path.is_file()
                           else None, world)
    if state is not None:
        load_model_state(model, state["model"], str(ckpt_path))
        opt.load_state_dict(state["optimizer"])
        match_device(opt, device)  # a CPU checkpoint resumed on CUDA runs fused again
        if ema is not None:
            load_model_state(ema.module, state["model_ema"], str(ckpt_path))
        step, best_acc, history = state["step"], state["best_acc"], state.get("history", [])
        prior = {k: state.get(k, 0.0) for k in ("train_seconds", "train_images", "wall_seconds")}
        prior["pending_loss"] = state.get("pending_loss", (0.0, 0))
        del state
    last_saved = step if resume and step else None
    if main:
        remove_stale_temps(out)  # left by a write that a SIGKILL cut short; the renamed files are all complete
        if resume:
            truncate_metrics(out, step)
    ddp_model = model
    if world > 1:
        draw_for_global_batch(model, D.Shard(t.batch_size, rank, world))  # drop path as in one process
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                              else None)

    def forward_loss(net, xb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = net(xb)
        return torch.sum(-tb * F.log_softmax(logits.float(), dim=1), dim=1).mean()  # soft-target CE, in fp32

    step_loss = functools.partial(forward_loss, ddp_model)
    if t.compile:  # compile time lands in the first step, which is not timed (see timer_start)
        mode, note = dist_.compile_mode(t.compile_mode, world)
        if note and main:
            print(f"note: {note}", flush=True)
        mode = None if mode == "default" else mode
        if world > 1:  # torch.compile's DDP support works on the wrapped module (graph breaks at gradient buckets)
            step_loss = functools.partial(forward_loss, torch.compile(ddp_model, mode=mode))
        else:  # model and loss in one graph (and its backward in one more)
            step_loss = torch.compile(step_loss, mode=mode)
    shard = D.Shard(t.batch_size, rank, world)  # this rank's slice of every global batch
    augment = BatchAugment(a, info.mean, info.std, m.num_classes, t.label_smoothing, device, seed=t.seed,
                           shard=shard, gather=functools.partial(dist_.gather_batch, world=world))

    # ---- records
    records = Records(out, enabled=main, sinks=[wandb_log.WandbSink(cfg, out)] if main and t.wandb_project else [])
    if main:
        atomic_write_json(out / "config.json", to_dict(cfg))
        atomic_write_json(out / "overrides.json", diff(cfg))
        atomic_write_json(out / "env.json", environment(device))
        if init_report is not None:
            atomic_write_json(out / "init_report.json", init_report)
            print(pretrained.summary(init_report))

    def checkpoint():
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        if not finite:  # never replace the last good checkpoint with broken weights
            raise TrainingError(_nonfinite_msg(step, ckpt_path, last_saved, what="weights"))
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), **({"model_ema": ema.module.state_dict()} if ema is not None else {}),
            "optimizer": opt.state_dict(), "step": step, "best_acc": best_acc,
            "history": history, "config": to_dict(cfg), "train_seconds": timed, "train_images": seen,
            "wall_seconds": wall_before + time.perf_counter() - wall_start, "pending_loss": pending,
            **run_place(world, device),
            "dataset": {"num_classes": info.num_classes, "mean": list(info.mean), "std": list(info.std),
                        "class_names": list(info.class_names)},
        })

    bar = None
    if main and t.progress:
        from tqdm import tqdm

        bar = tqdm(total=last_step, initial=step, dynamic_ncols=True, unit="step")

    # ---- the loop
    per_rank = t.batch_size // world
    # The loss since the last log line; a checkpoint carries it (summed over ranks), so the logged curve of a
    # resumed run is the uninterrupted one's.
    pending = prior.get("pending_loss", (0.0, 0)) if main else (0.0, 0)
    loss_sum = torch.tensor(float(pending[0]), device=device)
    loss_count, timer_start, stopping = int(pending[1]), None, False
    timed, seen, wall_before = (prior.get(k, 0.0) for k in ("train_seconds", "train_images", "wall_seconds"))
    first_step_seconds = None
    batch_indices = BatchOrder(cfg, n, spe, rank, world, device)
    # Global batches per augmentation call, counted in global images so the chunks (and their keys) are the same
    # on any number of processes; each rank augments its slices of them.
    aug_steps = chunk_steps(a.chunk_images, t.batch_size, device, x_train[0].numel())
    chunk = (-1, None, None)  # (chunk index, augmented images, labels) of the current aug_steps steps

    check_each_step = _check_each_step(device, t.on_nonfinite)
    clock = CheckpointClock(t.checkpoint_every_seconds)
    stages = res_stages(t.res_schedule)  # progressive resizing: (size, until fraction of the steps)
    scored = ema.module if ema is not None else model  # the weights evaluations score
    evaluate_ = functools.partial(evaluate, scored, mean=mean, std=std, autocast=autocast, flip=t.eval_flip)
    try:
        while step < last_step:
            c, j = divmod(step, aug_steps)
            if chunk[0] != c:  # per-sample augmentation of aug_steps batches at once, keyed by the chunk index
                idx = torch.cat([batch_indices(s) for s in range(c * aug_steps, min((c + 1) * aug_steps,
                                                                                   total_steps))])
                chunk = (c, augment.images(x_train.index_select(0, idx), c), y_train.index_select(0, idx))
            torch.manual_seed(dist_.step_seed(t.seed, step))  # drop path: a pure function of (seed, step)
            lr = set_lr(opt, schedule_factor(step, total_steps, warmup_steps, o))
            xb, tb = augment.targets(chunk[1][j * per_rank : (j + 1) * per_rank],
                                     chunk[2][j * per_rank : (j + 1) * per_rank], step)
            if stages:
                xb = resize(xb, resolution_at(step, total_steps, stages, m.img_size))
            with record_function("forward"):  # named ranges for `smallvit profile` (~6 us each otherwise)
                loss = step_loss(xb, tb)
            opt.zero_grad(set_to_none=True)
            with record_function("backward"):
                loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            if check_each_step and dist_.any_rank(~torch.isfinite(loss.detach()), world):
                if t.on_nonfinite == "stop":
                    raise TrainingError(_nonfinite_msg(step + 1, ckpt_path, last_saved))
                opt.zero_grad(set_to_none=True)
                records.log(step + 1, event="skipped_nonfinite")
            else:
                opt.step()
                if ema is not None:
                    ema.update(model, step=step + 1)
                loss_sum += loss.detach()
                loss_count += 1
            step += 1
            if step_hook is not None:
                step_hook(step)
            if timer_start is None:  # the first step of a (re)start (compile, warm-up) is not timed
                _sync(device)
                timer_start = time.perf_counter()
                first_step_seconds = timer_start - wall_start  # reported on its own: torch.compile lands here
            else:
                seen += t.batch_size
            if bar is not None:
                bar.update(1)
            log_now = step % t.log_every_steps == 0 or step == last_step
            save_now = step in eval_steps or (every > 0 and step % every == 0)
            stopping = world == 1 and stop["signal"] is not None
            if log_now or save_now or stopping:  # one host sync; under torchrun the ranks agree here on stopping
                flags = torch.tensor([float(loss_count), float(stop["signal"] is not None), clock.due()],
                                     device=device)
                stats = torch.cat([loss_sum.view(1), flags])
                if world > 1:
                    dist.all_reduce(stats)
                total, count, signalled, due = stats.tolist()
                if not math.isfinite(total):
                    raise TrainingError(_nonfinite_msg(step, ckpt_path, last_saved, before=True))
                stopping = signalled > 0
                save_now = save_now or due > 0
                pending = (total, int(count))
                if log_now:
                    _sync(device)
                    avg = total / max(count, 1)
                    elapsed = timed + (time.perf_counter() - timer_start if timer_start else 0.0)
                    ips = seen / elapsed if elapsed > 0 else 0.0
                    records.log(step, loss=avg, lr=lr, img_per_s=ips, epoch=step / spe)
                    if bar is not None:
                        bar.set_postfix(loss=f"{avg:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                    loss_sum.zero_()
                    loss_count, pending = 0, (0.0, 0)
            if save_now or stopping:
                if timer_start is not None:  # evaluation and checkpoint time is not training time
                    _sync(device)
                    timed += time.perf_counter() - timer_start
                if step in eval_steps:  # rank 0 evaluates; the others wait for its numbers
                    acc, eval_loss = dist_.on_rank0(
                        lambda: evaluate_(x_eval, y_eval), world)
                    best_acc = max(best_acc, acc)
                    scores = {f"{split}_acc": acc, f"{split}_loss": eval_loss}
                    if split == "val" and step == last_step:  # the only look at the test set
                        scores["test_acc"], scores["test_loss"] = dist_.on_rank0(
                            lambda: evaluate_(x_test, y_test), world)
                    wall = wall_before + time.perf_counter() - wall_start  # with data loading and evaluations
                    history.append({"step": step, "epoch": step / spe, **scores, "train_seconds": timed,
                                    "wall_seconds": wall})
                    records.log(step, **scores, epoch=step / spe, train_seconds=timed, wall_seconds=wall)
                    if bar is not None:
                        shown = (f"{k.replace('_', ' ')} {v:.2f}%" for k, v in scores.items() if k.endswith("acc"))
                        bar.write(f"step {step} epoch {step / spe:.2f}: {'  '.join(shown)}  "
                                  f"{split} loss {eval_loss:.4f}")
                dist_.on_rank0(checkpoint, world)
                last_saved = step
                clock.saved()
                if timer_start is not None:
                    timer_start = time.perf_counter()
                if stopping:
                    _say_stopped(bar, stop, step)
                    break
    finally:
        if bar is not None:
            bar.close()
        records.close()

    interrupted = stopping and step < last_step  # a signal during the last step still ends a complete run
    final = history[-1] if history else {}
    result = {
        "final_test_acc": final.get("test_acc", float("nan")),
        # with a validation split, the test set is seen once: its best over evaluations does not exist
        "best_test_acc": best_acc if split == "test" else None,
        "eval_split": split,
    }
    if split == "val":
        result.update(final_val_acc=final.get("val_acc", float("nan")), best_val_acc=best_acc,
                      val_images=cfg.data.val_images)
    return finish_run(cfg, out, result, interrupted, step, total_steps, spe, seen, timed,
                      wall_before + time.perf_counter() - wall_start, device, world, precision, stop["signal"],
                      first_step_seconds=first_step_seconds,  # of this (re)start: compilation, warm-up, first aug.
                      params=n_params, flops_per_image=flops)


def finish_run(cfg: Config, out: Path, result: dict, interrupted: bool, step: int, total_steps: int, spe: int,
               seen: float, timed: float, wall_seconds: float, device: torch.device, world: int, precision: str,
               stop_signal: str | None = None, **extra) -> dict:
    """The result dict (status, the loop's own numbers in `result`, steps, throughput, environment), also written
    to result.json unless the run was interrupted."""
    result = {
        "status": "interrupted" if interrupted else ("done" if step >= total_steps else "stopped_at_max_steps"),
        **result,
        "step": step,
        "total_steps": total_steps,
        "epochs_done": step / spe,
        "train_img_per_s": seen / timed if timed > 0 else None,
        "train_seconds": timed,
        "wall_seconds": wall_seconds,
        **extra,
        "device": environment(device)["device"],
        "world_size": world,
        "precision": precision,
        "run_dir": str(out),
        "overrides": diff(cfg),
    }
    if interrupted:
        result["stop_signal"] = stop_signal  # None on a rank that stopped because another one was signalled
    else:
        dist_.on_rank0(lambda: atomic_write_json(out / "result.json", result), world)
    return result


def open_run(cfg: Config, out_dir, resume: bool, world: int, held: contextlib.ExitStack,
             root: str = "runs") -> tuple[Path, dict | None]:
    """Threads, the global-batch check and the run folder (default: under `root`): rank 0 takes its lock (held
    until `held` closes) before it reads anything there; returns the folder and, when resuming a run that has
    ended, its result."""
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} is the global batch and must be divisible by the "
                          f"{world} processes; choose a multiple of {world}")
    out = Path(out_dir) if out_dir is not None else default_run_dir(cfg, root)

    def lock_and_check():
        held.enter_context(RunLock(out, wait_s=requeue_wait_s(out)))
        return check_run_folder(out, cfg, resume)

    return out, dist_.on_rank0(lock_and_check, world)


class BatchOrder:
    """This rank's sample indices for each step: a contiguous slice of the global batch, so in_batch repeats of
    an image stay on one rank. The order is a pure function of (seed, epoch)."""

    def __init__(self, cfg: Config, n: int, spe: int, rank: int, world: int, device: torch.device):
        self.cfg, self.n, self.spe, self.device = cfg, n, spe, device
        self.per_rank = cfg.train.batch_size // world
        self.offset = rank * self.per_rank
        self.orders: dict[int, torch.Tensor] = {}

    def __call__(self, s: int) -> torch.Tensor:
        t, a = self.cfg.train, self.cfg.aug
        epoch, i = divmod(s, self.spe)
        if epoch not in self.orders:
            self.orders.clear()  # a chunk spans at most two epochs; keep only the one it ends in
            self.orders[epoch] = D.epoch_indices(self.n, epoch, t.seed, a.repeats, a.repeat_mode,
                                                 t.batch_size).to(self.device)
        start = i * t.batch_size + self.offset
        return self.orders[epoch][start : start + self.per_rank]


def load_data(cfg: Config, device: torch.device, world: int):
    """((x_train, y_train), (x_test, y_test), (x_val, y_val) or None): the whole dataset as uint8 on the device, cut
    to data.subset and data.test_subset, with data.val_images held out of the training images (D.val_split, the
    same for every train.seed); each rank reads its own copy."""
    d, size = cfg.data, cfg.model.img_size
    (x_train, y_train), (x_test, y_test) = dist_.on_every_rank(lambda: (
        D.load(d.dataset, d.data_dir, d.download, train=True, device=device, img_size=size),
        D.load(d.dataset, d.data_dir, d.download, train=False, device=device, img_size=size)), world)
    if d.subset:
        x_train, y_train = x_train[: d.subset], y_train[: d.subset]
    if d.test_subset:
        x_test, y_test = x_test[: d.test_subset], y_test[: d.test_subset]
    val = None
    if d.val_images:
        keep, held = (i.to(device) for i in D.val_split(y_train, d.val_images, d.val_seed))
        val = x_train[held], y_train[held]
        x_train, y_train = x_train[keep], y_train[keep]
    return (x_train, y_train), (x_test, y_test), val


def step_plan(cfg: Config, n: int) -> tuple[int, int, int, int, set[int]]:
    """(steps per epoch, total steps, warm-up steps, last step of this run, evaluation steps) for n images."""
    t, a = cfg.train, cfg.aug
    spe = D.steps_per_epoch(n, a.repeats, t.batch_size)
    if spe == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {n * a.repeats} samples per epoch")
    total_steps = t.epochs * spe
    last_step = min(total_steps, t.max_steps) if t.max_steps else total_steps
    eval_steps = {e * spe for e in range(1, t.epochs + 1) if t.eval_every_epochs and e % t.eval_every_epochs == 0}
    eval_steps = {s for s in eval_steps if s < last_step} | {last_step}  # always evaluate the end (SPEC bug 11)
    return spe, total_steps, cfg.optim.warmup_epochs * spe, last_step, eval_steps


class CheckpointClock:
    """When a wall-time checkpoint is due (train.checkpoint_every_seconds). Each rank reads its own clock at the
    loop's host sync, where the flags are summed, so every rank saves at the same step when any one is due."""

    def __init__(self, every_seconds: float):
        self.every, self.last = every_seconds, time.monotonic()

    def due(self) -> float:
        return float(self.every > 0 and time.monotonic() - self.last >= self.every)

    def saved(self) -> None:
        self.last = time.monotonic()


def _say_stopped(bar, stop: dict, step: int) -> None:
    """The progress bar's last line after a signal (here or on another rank) stopped the loop at a checkpoint."""
    if bar is not None:
        bar.write(f"{stop['signal'] or 'a signal to another rank'}: checkpoint saved at step {step}; "
                  f"continue with --resume")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_steps(chunk_images: int, batch_size: int, device: torch.device, image_numel: int = 3 * 32 * 32) -> int:
    """Steps whose global batches are augmented in one call (aug.chunk_images, counted over all processes). Auto
    (0): 4096 images on CUDA, 512 on CPU, fewer for large images, so that the float32 chunk stays within 64 MiB
    (CUDA) / 8 MiB (CPU, about the L2 cache)."""
    if not chunk_images:
        cap, budget = (4096, 64 << 20) if device.type == "cuda" else (512, 8 << 20)
        chunk_images = min(cap, budget // (4 * image_numel))
    return max(1, chunk_images // batch_size)


def _check_each_step(device: torch.device, on_nonfinite: str) -> bool:
    """Check the loss every step on CPU (free) or when skipping (needed); on GPUs only at log and checkpoint points,
    so no step waits for the device."""
    return device.type == "cpu" or on_nonfinite == "skip"


def run_place(world: int, device: torch.device) -> dict:
    """What a checkpoint records of where it was trained: the number of processes and the device type."""
    return {"world_size": world, "device_type": device.type}


def _read_resume_state(path: Path, cfg: Config, device: torch.device) -> dict:
    state = load_checkpoint(path)
    missing = [k for k in ("optimizer", "step", "best_acc") if k not in state]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)}: it holds weights only and cannot be resumed; "
                              f"start a new --out folder")
    check_same_config(cfg, state["config"], path)
    # Another number of processes continues exactly (every draw is the global batch's), another device type does
    # not: CUDA and CPU generators give other numbers for one seed, and aug.chunk_images=0 means another chunk.
    saved = state.get("device_type")  # absent in checkpoints written before it was recorded
    if saved is not None and saved != device.type:
        raise CheckpointError(f"{path} was trained on {saved} and cannot continue exactly on {device.type} (other "
                              f"random streams); resume with train.device={saved}, or start a new --out folder")
    return state


def _nonfinite_msg(step: int, ckpt: Path, last_saved: int | None, before: bool = False, what: str = "loss") -> str:
    where = f"in the steps up to step {step}" if before else f"at step {step}"
    kept = (f"{ckpt} (step {last_saved}) is unchanged" if last_saved is not None
            else "no checkpoint had been written yet")
    return (f"non-finite {what} {where}; training stopped and {kept}. "
            f"Lower optim.lr or set optim.grad_clip (new --out folder), or resume with train.on_nonfinite=skip "
            f"to skip such steps.")
