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

import functools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.profiler import record_function

from . import data as D
from . import distributed as dist_
from . import budget, pretrained, wandb_log
from .augment import BatchAugment, resize, resolution_at
from .backbones import build_model
from .config import Config, ConfigError, res_stages, to_dict
from .evaluate import accuracy_and_loss
from .lifecycle import (
    BatchOrder,
    CheckpointClock,
    Checkpoints,
    Clock,
    agree,
    autocast_of,
    check_each_step,
    compile_mode,
    dataset_info,
    finish_run,
    load_data,
    open_run,
    precision_of,
    progress_bar,
    resume_state,
    run_guarded,
    say_stopped,
    skip_nonfinite,
    start_records,
    step_plan,
)
from .model import count_params, draw_for_global_batch, flops_per_image
from .optim import build_optimizer, match_device, resolve_lr, schedule_factor, set_lr
from .runs import CHECKPOINT, TrainingError, atomic_write_json, load_model_state

__all__ = ["TrainingError", "chunk_steps", "train"]  # TrainingError: what a caller catches

# Keys `smallvit train` never reads; the CLI refuses them when set (config.refuse_unread): the DINO section is
# `smallvit pretrain`'s.
UNREAD_KEYS = ("ssl.",)


def train(cfg: Config, out_dir: str | Path | None = None, resume: bool = False, step_hook=None) -> dict:
    """Train `cfg`; write records to `out_dir` (default: a deterministic folder under runs/); return the result.

    `step_hook(step)`, if given, is called after every optimiser step (e.g. a torch.profiler's step, profile.py).

    The result dict holds the final and best test accuracy, steps, wall time, throughput, params and FLOPs.
    SIGINT/SIGTERM/SIGUSR2 finish the current step, write a checkpoint and return with status "interrupted".
    """
    return run_guarded(cfg.train.device, functools.partial(_train, cfg, out_dir, resume, step_hook=step_hook))


def _train(cfg: Config, out_dir, resume: bool, rank: int, world: int, device: torch.device, stop: dict,
           step_hook=None) -> dict:
    clock = Clock(device)  # wall time includes reading the data and building the model
    budget_start = budget.started_at()  # train.time_budget_s counts the command's start-up too
    t, m, a = cfg.train, cfg.model, cfg.aug
    o = resolve_lr(cfg.optim, t.batch_size)  # optim.lr as the absolute peak of this global batch
    main = rank == 0
    if t.wandb_project and main:  # before the run folder is made: a missing wandb writes nothing
        wandb_log.check_installed()
    out, finished = open_run(cfg, out_dir, resume, world, stop["held"])
    if finished is not None:  # resuming a run that already ended: nothing to do, and its records stay as they are
        return finished

    # ---- data: the whole dataset as uint8 on the device (each rank reads its own copy)
    info = dataset_info(cfg, world)  # num_classes, mean, std, class_names (rank 0 downloads what is missing)
    if m.num_classes != info.num_classes:
        raise ConfigError(f"model.num_classes={m.num_classes} but {cfg.data.dataset} has {info.num_classes} classes")
    (x_train, y_train), (x_test, y_test), val = load_data(cfg, device, world)
    # what the evaluations during training measure: with a validation split, the test set is seen once, at the end
    split, (x_eval, y_eval) = ("val", val) if val is not None else ("test", (x_test, y_test))
    mean, std = torch.tensor(info.mean, device=device), torch.tensor(info.std, device=device)
    spe, total_steps, warmup_steps, last_step, eval_steps = step_plan(cfg, len(x_train))

    # ---- model and optimiser
    model, init_report = initial_model(cfg, x_train, info, device, world,
                                       from_checkpoint=resume and (out / CHECKPOINT).is_file())
    n_params, flops = count_params(model), flops_per_image(model)
    opt = build_optimizer(model, o, device)
    ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=True) if t.ema_decay else None  # what evaluations score
    precision = precision_of(cfg, device)
    autocast = autocast_of(precision, device)

    # ---- resume
    step, best_acc, history, pending, decision = restore(resume_state(out, cfg, device, resume, world), out, model,
                                                         opt, ema, clock, device, main)
    if decision is not None:  # the time budget's step count, as decided when the run began
        spe, total_steps, warmup_steps, last_step, eval_steps = step_plan(cfg, len(x_train), decision.total_steps)
    decide_at = budget.measure_steps(warmup_steps) if t.time_budget_s and decision is None else None
    if decide_at is not None and main:
        print(f"time budget {t.time_budget_s:.0f} s: the step rate is measured over the first {decide_at} steps, "
              f"then the run fixes how many steps fit (at most {total_steps}, train.epochs={t.epochs})", flush=True)
    ckpts = Checkpoints(out, step if resume and step else None)
    step_loss = loss_function(cfg, model, autocast, rank, world, device)
    shard = D.Shard(t.batch_size, rank, world)  # this rank's slice of every global batch
    augment = BatchAugment(a, info.mean, info.std, m.num_classes, t.label_smoothing, device, seed=t.seed,
                           shard=shard, gather=functools.partial(dist_.gather_batch, world=world))
    batches = AugmentedChunks(augment, x_train, y_train, BatchOrder(cfg, len(x_train), spe, rank, world, device),
                              chunk_steps(a.chunk_images, t.batch_size, device, x_train[0].numel()),
                              t.batch_size // world)
    records = start_records(out, cfg, device, main, resume, step,
                            sinks=[wandb_log.WandbSink(cfg, out)] if main and t.wandb_project else [])
    if main and init_report is not None:
        atomic_write_json(out / "init_report.json", init_report)
        print(pretrained.summary(init_report))

    def checkpoint_state() -> dict:
        return {"model": model.state_dict(), **({"model_ema": ema.module.state_dict()} if ema is not None else {}),
                "optimizer": opt.state_dict(), "step": step, "best_acc": best_acc, "history": history,
                "config": to_dict(cfg), **clock.state(), "pending_loss": pending,
                **({"budget": decision.to_dict()} if decision is not None else {}),
                "dataset": {"num_classes": info.num_classes, "mean": list(info.mean), "std": list(info.std),
                            "class_names": list(info.class_names)}}

    # ---- the loop
    loss_sum, loss_count = torch.tensor(float(pending[0]), device=device), int(pending[1])
    check, due, stopping = check_each_step(device, t.on_nonfinite), CheckpointClock(t.checkpoint_every_seconds), False
    cut = 0  # the step where the time budget ended the run early (0: it did not)
    stages = res_stages(t.res_schedule)  # progressive resizing: (size, until fraction of the steps)
    scored = ema.module if ema is not None else model  # the weights evaluations score
    evaluate_ = functools.partial(accuracy_and_loss, scored, mean=mean, std=std, autocast=autocast, flip=t.eval_flip)
    bar = progress_bar(main, cfg, last_step, step)
    try:
        while step < last_step:
            images, labels = batches(step, total_steps)  # this rank's augmented images of the step's batch
            torch.manual_seed(dist_.step_seed(t.seed, step))  # drop path: a pure function of (seed, step)
            lr = set_lr(opt, schedule_factor(step, total_steps, warmup_steps, o))
            xb, tb = augment.targets(images, labels, step)  # Mixup/CutMix, keyed by the step
            if stages:
                xb = resize(xb, resolution_at(step, total_steps, stages, m.img_size))
            with record_function("forward"):  # named ranges for `smallvit profile` (~6 us each otherwise)
                loss = step_loss(xb, tb)
            opt.zero_grad(set_to_none=True)
            with record_function("backward"):
                loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            if skip_nonfinite(loss, check, cfg, world, ckpts, records, step):
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
                if ema is not None:
                    ema.update(model, step=step + 1)
                loss_sum += loss.detach()
                loss_count += 1
            step += 1
            if step_hook is not None:
                step_hook(step)
            clock.stepped(t.batch_size)
            if bar is not None:
                bar.update(1)
            if step == decide_at:  # the time budget: how many steps fit, decided once (rank 0 measures)
                decision = dist_.on_rank0(functools.partial(plan_budget, cfg, clock, budget_start, step, spe, evaluate_,
                                                            x_eval, y_eval, len(x_test) if split == "val" else 0),
                                          world)
                spe, total_steps, warmup_steps, last_step, eval_steps = step_plan(cfg, len(x_train),
                                                                                  decision.total_steps)
                if main:
                    announce_budget(decision, out, bar)
            log_now = step % t.log_every_steps == 0 or step == last_step
            if log_now and decision is not None and step < last_step and dist_.on_rank0(functools.partial(
                    budget.running_late, decision, clock.before + time.perf_counter() - budget_start,
                    t.log_every_steps), world):
                last_step = cut = step  # the machine slowed down after the decision: end here, evaluated
                eval_steps.add(step)
                say(main, bar, f"time budget: the steps run slower than measured; ending at step {step} of "
                               f"{total_steps} to keep the budget")
            save_now = step in eval_steps or (t.checkpoint_every_steps > 0 and step % t.checkpoint_every_steps == 0)
            stopping = world == 1 and stop["signal"] is not None
            if not (log_now or save_now or stopping):
                continue
            (total, count), stopping, is_due = agree(
                torch.cat([loss_sum.view(1), torch.tensor([float(loss_count)], device=device)]), stop, due, world)
            if not math.isfinite(total):
                raise ckpts.nonfinite(step, before=True)
            save_now, pending = save_now or is_due, (total, int(count))
            if log_now:
                avg, ips = total / max(count, 1), clock.img_per_s()
                records.log(step, loss=avg, lr=lr, img_per_s=ips, epoch=step / spe)
                if bar is not None:
                    bar.set_postfix(loss=f"{avg:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                loss_sum.zero_()
                loss_count, pending = 0, (0.0, 0)
            if not (save_now or stopping):
                continue
            clock.pause()  # evaluation and checkpoint time is not training time
            if step in eval_steps:  # rank 0 evaluates; the others wait for its numbers
                test = (x_test, y_test) if split == "val" and step == last_step else None  # the only look at it
                scores = scored_step(evaluate_, split, (x_eval, y_eval), test, world)
                best_acc = max(best_acc, scores[f"{split}_acc"])
                record_scores(step, spe, scores, clock, history, records, bar)
            ckpts.save(step, model.parameters, checkpoint_state, world, device)
            due.saved()
            clock.go()
            if stopping:
                say_stopped(bar, stop, step)
                break
    finally:
        if bar is not None:
            bar.close()
        records.close()

    final = history[-1] if history else {}
    result = {"final_test_acc": final.get("test_acc", float("nan")),
              # with a validation split, the test set is seen once: its best over evaluations does not exist
              "best_test_acc": best_acc if split == "test" else None, "eval_split": split}
    if split == "val":
        result.update(final_val_acc=final.get("val_acc", float("nan")), best_val_acc=best_acc,
                      val_images=cfg.data.val_images)
    if decision is not None:  # a run cut short to keep its budget is done: result.json says where it ended
        result.update(budget=decision.to_dict(), **({"budget_cut_at_step": cut} if cut else {}))
    return finish_run(cfg, out, result, stopping and step < last_step,  # a signal in the last step: a whole run
                      step, cut or total_steps, spe, clock, world, precision, stop["signal"], params=n_params,
                      flops_per_image=flops)


def restore(state: dict | None, out: Path, model, opt, ema, clock: Clock, device: torch.device, main: bool):
    """(step, best accuracy, history, the loss since the last log line, the time budget's decision): a fresh run's,
    or the checkpoint's, whose weights, optimiser state, EMA and clock are loaded here."""
    if state is None:
        return 0, 0.0, [], (0.0, 0), None
    load_model_state(model, state["model"], str(out / CHECKPOINT))
    opt.load_state_dict(state["optimizer"])
    match_device(opt, device)  # a CPU checkpoint resumed on CUDA runs fused again
    if ema is not None:
        load_model_state(ema.module, state["model_ema"], str(out / CHECKPOINT))
    clock.resume(state)
    # The loss since the last log line, summed over ranks: the logged curve of a resumed run is the uninterrupted
    # one's (rank 0 carries it).
    pending = state.get("pending_loss", (0.0, 0)) if main else (0.0, 0)
    decision = budget.from_dict(state["budget"]) if state.get("budget") else None
    return state["step"], state["best_acc"], state.get("history", []), pending, decision


def forward_loss(net, autocast, xb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
    with autocast():
        logits = net(xb)
    return torch.sum(-tb * F.log_softmax(logits.float(), dim=1), dim=1).mean()  # soft-target CE, in fp32


def loss_function(cfg: Config, model, autocast, rank: int, world: int, device: torch.device):
    """loss(images, soft targets) of the network under torchrun's DDP (drop path drawn as in one process) and
    torch.compile (train.compile; its time lands in the first step, which is not timed)."""
    net = model
    if world > 1:
        draw_for_global_batch(model, D.Shard(cfg.train.batch_size, rank, world))  # drop path as in one process
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if not cfg.train.compile:
        return functools.partial(forward_loss, net, autocast)
    mode = compile_mode(cfg, world, rank == 0)
    if world > 1:  # torch.compile's DDP support works on the wrapped module (graph breaks at gradient buckets)
        return functools.partial(forward_loss, torch.compile(net, mode=mode), autocast)
    return torch.compile(functools.partial(forward_loss, net, autocast), mode=mode)  # model and loss in one graph


def scored_step(evaluate_, split: str, data, test, world: int) -> dict:
    """An evaluation's scores: `split` (val or test), and the test set too when `test` is given; rank 0 computes."""
    acc, loss = dist_.on_rank0(lambda: evaluate_(*data), world)
    scores = {f"{split}_acc": acc, f"{split}_loss": loss}
    if test is not None:
        scores["test_acc"], scores["test_loss"] = dist_.on_rank0(lambda: evaluate_(*test), world)
    return scores


def record_scores(step: int, spe: int, scores: dict, clock: Clock, history: list, records, bar) -> None:
    """An evaluation into the history (the checkpoint's), metrics.jsonl and the progress bar, with its times."""
    times = {"train_seconds": clock.timed, "wall_seconds": clock.wall()}  # wall: with loading and evaluations
    history.append({"step": step, "epoch": step / spe, **scores, **times})
    records.log(step, **scores, epoch=step / spe, **times)
    if bar is not None:
        shown = (f"{k.replace('_', ' ')} {v:.2f}%" for k, v in scores.items() if k.endswith("acc"))
        loss = next(v for k, v in scores.items() if k.endswith("loss"))
        bar.write(f"step {step} epoch {step / spe:.2f}: {'  '.join(shown)}  {next(iter(scores))[:-4]} loss {loss:.4f}")


def say(main: bool, bar, text: str) -> None:
    """A line on rank 0's console, above the progress bar if there is one."""
    if main:
        (bar.write if bar is not None else functools.partial(print, flush=True))(text)


def announce_budget(decision: budget.Decision, out: Path, bar) -> None:
    """Rank 0: the decision into the run folder (budget.json) and onto the console; the bar's new length."""
    atomic_write_json(out / "budget.json", decision.to_dict())
    say(True, bar, decision.line())
    if bar is not None:
        bar.total = decision.total_steps
        bar.refresh()


def plan_budget(cfg: Config, clock: Clock, budget_start: float, step: int, spe: int, evaluate_, x_eval, y_eval,
                test_images: int) -> budget.Decision:
    """train.time_budget_s: the measured seconds per step (the timed steps so far), an evaluation's cost measured
    on up to 500 images, and the command's wall time so far decide the run's number of steps (budget.decide)."""
    t = cfg.train
    clock.pause()
    step_s = clock.timed / max(clock.seen / t.batch_size, 1.0)
    n = min(500, len(x_eval))
    start = time.perf_counter()
    evaluate_(x_eval[:n], y_eval[:n])
    per_image = (time.perf_counter() - start) / n
    evals_per_step = 1.0 / (t.eval_every_epochs * spe) if t.eval_every_epochs else 0.0
    decision = budget.decide(t.time_budget_s, clock.before + time.perf_counter() - budget_start, step, step_s,
                             per_image * len(x_eval), per_image * (len(x_eval) + test_images), evals_per_step,
                             t.epochs * spe, spe)
    clock.go()
    return decision


def initial_model(cfg: Config, x_train: torch.Tensor, info, device: torch.device, world: int,
                  from_checkpoint: bool) -> tuple[torch.nn.Module, dict | None]:
    """The network before its first step: built from the seed, its patch embedding whitened (model.patch_init), its
    weights from train.init_from unless a checkpoint will replace them; and the init_from report."""
    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed)
    model = build_model(m).to(device)
    if m.patch_init == "whiten":  # from un-augmented images, so every rank computes the same filters
        from .whiten import whiten_patch_embed

        whiten_patch_embed(model.patch_embed, x_train[: m.whiten_images], info.mean, info.std, m.whiten_filters,
                           seed=t.seed)
    report = None
    # A resumed run's weights come from its checkpoint (rank 0 looks: the others need not share its filesystem).
    if t.init_from and not dist_.on_rank0(lambda: from_checkpoint, world):
        weights, kind = dist_.on_rank0(lambda: pretrained.read_state_dict(t.init_from), world)
        report = pretrained.apply_state_dict(model, weights, t.init_strict, t.init_from, kind)
    return model, report


class AugmentedChunks:
    """The per-sample augmentation of `steps` global batches at once (aug.chunk_images: fewer, larger calls),
    keyed by the chunk index, so a resumed run recomputes the chunk it resumes in whole. Counted in global images,
    the chunks (and their keys) are the same on any number of processes; each rank augments its slices of them."""

    def __init__(self, augment: BatchAugment, x: torch.Tensor, y: torch.Tensor, order: BatchOrder, steps: int,
                 per_rank: int):
        self.augment, self.x, self.y, self.order, self.steps, self.per_rank = augment, x, y, order, steps, per_rank
        self.chunk = (-1, None, None)  # (chunk index, augmented images, labels)

    def __call__(self, step: int, total_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, j = divmod(step, self.steps)
        if self.chunk[0] != c:
            idx = torch.cat([self.order(s) for s in range(c * self.steps, min((c + 1) * self.steps, total_steps))])
            self.chunk = (c, self.augment.images(self.x.index_select(0, idx), c), self.y.index_select(0, idx))
        part = slice(j * self.per_rank, (j + 1) * self.per_rank)
        return self.chunk[1][part], self.chunk[2][part]


def chunk_steps(chunk_images: int, batch_size: int, device: torch.device, image_numel: int = 3 * 32 * 32) -> int:
    """Steps whose global batches are augmented in one call (aug.chunk_images, counted over all processes). Auto
    (0): 4096 images on CUDA, 512 on CPU, fewer for large images, so that the float32 chunk stays within 64 MiB
    (CUDA) / 8 MiB (CPU, about the L2 cache)."""
    if not chunk_images:
        cap, budget = (4096, 64 << 20) if device.type == "cuda" else (512, 8 << 20)
        chunk_images = min(cap, budget // (4 * image_numel))
    return max(1, chunk_images // batch_size)
