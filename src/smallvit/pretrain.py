"""DINO self-supervised pre-training on the training images only (`smallvit pretrain`); fine-tune with
`smallvit train --set train.init_from=RUN`, which takes the teacher's backbone.

The parent project of the reference (vits-for-small-scale-datasets, train_ssl.py, after facebookresearch/dino):
a student and a teacher, each a ViT (any `model.*` variant, built with num_classes=0) plus a projection head; the
teacher is the EMA of the student (momentum 0.996 -> 1 by a cosine) and sees only the global views; the student
sees every view and learns to predict the teacher's centred, sharpened distribution of the *other* views.
Written by hand (DINO and its heirs are scripts, not libraries); timm supplies the EMA (ModelEmaV3) and the
position-embedding resampling for the small local views (model.py).

Run folder, records, atomic checkpoints, SIGINT/SIGTERM, torchrun and exact resume are train.py's (shared
helpers there): the data order, the views and the drop-path masks are pure functions of the seed and the global
step and sample, never of the rank (each drawn for the global batch and cut to the rank's slice, as in train.py).
`checkpoint.pt` holds "teacher" and "student" (state dicts with keys backbone.* and head.*), "model" (the teacher
backbone alone, the same tensors), "center", "optimizer", "step" and the usual resume fields.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.utils import ModelEmaV3
from torch import nn

from . import data as D
from . import distributed as dist_
from .backbones import build_model
from .config import Config, ConfigError, SSLConfig, to_dict
from .knn import knn_accuracy
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
from .model import Attention, count_params, draw_for_global_batch
from .optim import build_optimizer, lr_at, resolve_lr, schedule_factor, set_lr
from .runs import CHECKPOINT, load_model_state


# Keys pre-training never reads; the CLI refuses them when set (config.refuse_unread). DINO makes its own views
# (ssl.*, multicrop.py), so train.py's supervised augmentation, labels and Mixup/CutMix are unused (aug.repeats and
# aug.repeat_mode still set the data order); whitening is applied by train.py only; the teacher is the weight EMA;
# and there is no progressive resizing, init_from or W&B sink here.
UNREAD_KEYS = (*(f"aug.{k}" for k in ("crop_pad", "flip", "autoaugment", "rotate_sign", "randaugment_ops",
                                      "randaugment_magnitude", "erase_p", "erase_area", "erase_min_aspect",
                                      "erase_log_aspect", "erase_fill", "mixup", "cutmix", "mix_p", "mixup_alpha",
                                      "cutmix_beta", "chunk_images")),
               "model.patch_init", "model.whiten_filters", "model.whiten_images", "train.label_smoothing",
               "train.eval_flip", "train.ema_decay", "train.res_schedule", "train.init_from", "train.init_strict",
               "train.time_budget_s",
               "train.wandb_project", "train.wandb_entity", "train.wandb_name", "train.wandb_tags")


class DINOHead(nn.Module):
    """MLP (Linear-GELU ... Linear to the bottleneck) -> L2 normalise -> weight-normalised Linear to out_dim.

    projection_head.MLPHead / DINO's DINOHead: trunc-normal(0.02) MLP, the last layer keeps PyTorch's init, its
    norm g starts at 1 and stays there when norm_last_layer (each output is then a cosine similarity).
    """

    def __init__(self, in_dim: int, s: SSLConfig):
        super().__init__()
        dims = [in_dim] + [s.head_hidden_dim] * (s.head_layers - 1) + [s.head_bottleneck_dim]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        self.mlp = nn.Sequential(*layers[:-1])
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(s.head_bottleneck_dim, s.out_dim,
                                                                          bias=False))
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1.0)
        g.requires_grad = not s.norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))  # (B, out_dim)


class DINO(nn.Module):
    """Backbone (any model.arch without classifier, backbones.Backbone) + DINOHead; views of one resolution go
    through together."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.backbone = build_model(replace(cfg.model, num_classes=0), any_size=True)  # local views are smaller
        self.head = DINOHead(self.backbone.feature_dim, cfg.ssl)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([self.backbone(v) for v in views]))  # (sum of view batches, out_dim)


def teacher_temperature(epoch: int, s: SSLConfig) -> float:
    """train_ssl.py: np.linspace(warmup_teacher_temp, teacher_temp, warmup epochs) indexed by epoch, then flat."""
    w = s.warmup_teacher_temp_epochs
    if epoch >= w:
        return s.teacher_temp
    return s.warmup_teacher_temp + (s.teacher_temp - s.warmup_teacher_temp) * epoch / max(w - 1, 1)


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float, n_global: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy between each teacher view's distribution and every *other* student view's; also the
    teacher's probabilities (n_global * B, K). Views are crop-major, as MultiCrop returns them."""
    n_views = len(student_out) // (len(teacher_out) // n_global)
    logp = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_views)
    q = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach()
    total, terms = student_out.new_zeros((), dtype=torch.float32), 0
    for iq, qv in enumerate(q.chunk(n_global)):
        for v, lp in enumerate(logp):
            if v != iq:
                total = total + torch.sum(-qv * lp, dim=-1).mean()
                terms += 1
    return total / terms, q


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float, world: int) -> None:
    """center <- momentum * center + (1 - momentum) * the mean teacher output over every rank's batch."""
    batch = teacher_out.float().sum(0, keepdim=True)
    if world > 1:
        dist.all_reduce(batch)
    center.mul_(momentum).add_(batch / (len(teacher_out) * world), alpha=1 - momentum)


def clip_tensors(model: nn.Module, fused_qkv: bool) -> list[list[nn.Parameter]]:
    """The "tensors" DINO's clip_gradients clips one by one: each parameter alone, or with fused_qkv the q, k and v
    weights of a self-attention block together (and their biases together), as the parent's one qkv Linear holds
    them (its models/vit.py line 76). Low-rank or shared-latent projections are not one Linear: they stay apart."""
    groups = []
    if fused_qkv:
        for m in model.modules():
            if isinstance(m, Attention) and not m.kv_shared and all(type(x) is nn.Linear for x in (m.q, m.k, m.v)):
                groups.append([m.q.weight, m.k.weight, m.v.weight])
                if m.q.bias is not None:
                    groups.append([m.q.bias, m.k.bias, m.v.bias])
    taken = {id(p) for g in groups for p in g}
    return groups + [[p] for p in model.parameters() if p.requires_grad and id(p) not in taken]


@torch.no_grad()
def clip_per_tensor_(groups: list[list[torch.Tensor]], clip: float) -> None:
    """DINO utils.clip_gradients: each group's gradient (one tensor, or q/k/v as one, see clip_tensors) scaled to
    norm <= clip on its own (not one global norm)."""
    groups = [[p.grad for p in g if p.grad is not None] for g in groups]
    groups = [g for g in groups if g]
    if not groups:
        return
    grads = [x for g in groups for x in g]
    which = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
    sq = torch.stack(torch._foreach_norm(grads)).float().pow(2)
    norms = torch.zeros(len(groups), device=sq.device).index_add_(0, which.to(sq.device), sq).sqrt()
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)[which.to(sq.device)]
    torch._foreach_mul_(grads, list(scale.unbind()))


def make_teacher(student: nn.Module, s: SSLConfig) -> ModelEmaV3:
    """The teacher: an EMA copy of the student (timm's ModelEmaV3, .module), without gradients. ssl.teacher_mode:
    eval (DINO: no drop path, deterministic) or train (the parent: the student's drop path stays on)."""
    ema = ModelEmaV3(student, decay=s.momentum_teacher, exclude_buffers=True)
    ema.module.requires_grad_(False)
    ema.module.train(s.teacher_mode == "train")  # ModelEmaV3 leaves its copy in eval mode; knn() scores in eval
    return ema


def teacher_stats(q: torch.Tensor) -> torch.Tensor:
    """(mean per-view entropy, entropy of the mean distribution) of teacher probabilities, in nats. Collapse to
    one dimension sends both to 0; collapse to uniform sends both to log(K); either way their gap (the mutual
    information between view and output) goes to 0."""
    h = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
    p = q.mean(0)
    return torch.stack([h, -(p * p.clamp_min(1e-12).log()).sum()])


def pretrain(cfg: Config, out_dir=None, resume: bool = False) -> dict:
    """DINO pre-training of `cfg`; records in `out_dir` (default: a deterministic folder under runs/pretrain/);
    returns the result (final and best k-NN accuracy of the teacher, steps, throughput). SIGINT/SIGTERM finish
    the current step, write a checkpoint and return with status "interrupted"."""
    return run_guarded(cfg.train.device, functools.partial(_pretrain, cfg, out_dir, resume))


def _pretrain(cfg: Config, out_dir, resume: bool, rank: int, world: int, device: torch.device, stop: dict) -> dict:
    from .multicrop import MultiCrop

    clock = Clock(device)  # wall time includes reading the data and building the model, as train's
    t, s = cfg.train, cfg.ssl
    o = resolve_lr(cfg.optim, t.batch_size)  # optim.lr_scale=per256: the parent's lr x batch / 256
    main = rank == 0
    if o.grad_clip > 0:
        raise ConfigError("pretrain clips each gradient tensor with ssl.clip_grad (as DINO); leave optim.grad_clip=0")
    out, finished = open_run(cfg, out_dir, resume, world, stop["held"], root="runs/pretrain")
    if finished is not None:
        return finished

    # ---- data: the training images teach; the labels only score the k-NN monitor
    info = dataset_info(cfg, world)  # rank 0 downloads what is missing
    (x_train, y_train), (x_test, y_test), _ = load_data(cfg, device, world)  # held-out images stay out
    spe, total_steps, warmup_steps, last_step, eval_steps = step_plan(cfg, len(x_train))
    bank = slice(0, s.knn_train_images or len(x_train))

    # ---- student, teacher (EMA; eval mode, no drop path, as DINO's, or train mode as the parent's), optimiser
    torch.manual_seed(t.seed)
    student = DINO(cfg).to(device)
    ema = make_teacher(student, s)
    teacher = ema.module
    clip_groups = clip_tensors(student, fused_qkv=s.clip_qkv == "fused")
    opt = build_optimizer(student, o, device)
    center = torch.zeros(1, s.out_dim, device=device)
    precision = precision_of(cfg, device)
    autocast = autocast_of(precision, device)

    def knn() -> float:  # rank 0 scores; the others wait for its number
        return dist_.on_rank0(lambda: knn_accuracy(teacher.backbone, x_train[bank], y_train[bank], x_test, y_test,
                                                   info.mean, info.std, info.num_classes, s.knn_k, s.knn_temp,
                                                   autocast), world)

    # ---- resume
    step, best, history, prior = 0, 0.0, [], {}
    state = resume_state(out, cfg, device, resume, world)
    if state is not None:
        load_model_state(student, state["student"], str(out / CHECKPOINT))
        load_model_state(teacher, state["teacher"], str(out / CHECKPOINT))
        opt.load_state_dict(state["optimizer"])
        center.copy_(state["center"])
        step, best, history, prior = state["step"], state["best_acc"], state["history"], state
        clock.resume(state)
    center_ref = prior["center_ref"].to(device) if "center_ref" in prior else center.clone()
    stats = torch.tensor(prior.get("pending", [0.0] * 4), device=device)  # loss, entropy, marginal entropy, count
    ckpts = Checkpoints(out, step if state is not None else None)
    del state, prior
    net = student
    if world > 1:
        draw_for_global_batch(student.backbone, D.Shard(t.batch_size, rank, world))  # drop path as in one process
        net = nn.parallel.DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
    if t.compile:  # as train's: under torchrun without CUDA graphs
        net = torch.compile(net, mode=compile_mode(cfg, world, main))
    views_of = MultiCrop(s, cfg.model.img_size, info.mean, info.std, device, seed=t.seed,
                         shard=D.Shard(t.batch_size, rank, world))
    batch_indices = BatchOrder(cfg, len(x_train), spe, rank, world, device)
    records = start_records(out, cfg, device, main, resume, step)
    if step == 0:  # the same network at random init: the baseline the k-NN curve must beat
        acc = knn()
        history.append({"step": 0, "epoch": 0.0, "knn_acc": acc, "train_seconds": 0.0, "wall_seconds": clock.wall()})
        records.log(0, knn_acc=acc, epoch=0.0, train_seconds=0.0, wall_seconds=history[-1]["wall_seconds"])

    def checkpoint_state() -> dict:
        return {"kind": "dino", "model": teacher.backbone.state_dict(), "teacher": teacher.state_dict(),
                "student": student.state_dict(), "center": center, "center_ref": center_ref,
                "optimizer": opt.state_dict(), "step": step, "best_acc": best, "history": history,
                "config": to_dict(cfg), **clock.state(), "pending": stats.tolist(),
                "dataset": {"num_classes": info.num_classes, "mean": list(info.mean), "std": list(info.std),
                            "class_names": list(info.class_names)}}

    bar = progress_bar(main, cfg, last_step, step)
    check, due, stopping = check_each_step(device, t.on_nonfinite), CheckpointClock(t.checkpoint_every_seconds), False
    frozen_last = list(student.head.last_layer.parameters())
    try:
        while step < last_step:
            epoch = step // spe
            views = views_of.views(x_train.index_select(0, batch_indices(step)), step)
            torch.manual_seed(dist_.step_seed(t.seed, step))  # drop path: a pure function of (seed, step)
            lr = set_lr(opt, schedule_factor(step, total_steps, warmup_steps, o))
            wd = lr_at(step, total_steps, 0, o.weight_decay, s.weight_decay_end)  # cosine 0.04 -> 0.4
            for g in opt.param_groups:
                if g["decay_scheduled"]:  # optim.param_groups' flag: the no-decay and Muon groups keep their own
                    g["weight_decay"] = wd
            temp = teacher_temperature(epoch, s)
            with autocast():
                teacher_out = teacher(views[:1])  # the global views only
                student_out = net(views)
            loss, q = dino_loss(student_out, teacher_out, center, s.student_temp, temp, s.global_crops)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.clip_grad > 0:
                clip_per_tensor_(clip_groups, s.clip_grad)
            if epoch < s.freeze_last_layer_epochs:  # DINO: the output layer stays fixed for the first epoch(s)
                for p in frozen_last:
                    p.grad = None
            if skip_nonfinite(loss, check, cfg, world, ckpts, records, step):
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
                update_center(center, teacher_out, s.center_momentum, world)
                ema.decay = lr_at(step, total_steps, 0, s.momentum_teacher, 1.0)  # cosine 0.996 -> 1
                ema.update(student)
                stats += torch.cat([loss.detach().view(1), teacher_stats(q), stats.new_ones(1)])
            step += 1
            clock.stepped(t.batch_size)
            if bar is not None:
                bar.update(1)
            log_now = step % t.log_every_steps == 0 or step == last_step
            save_now = step in eval_steps or (t.checkpoint_every_steps > 0 and step % t.checkpoint_every_steps == 0)
            stopping = world == 1 and stop["signal"] is not None
            if not (log_now or save_now or stopping):
                continue
            sums, stopping, is_due = agree(stats, stop, due, world)
            save_now = save_now or is_due
            if not math.isfinite(sums[0]):
                raise ckpts.nonfinite(step, before=True)
            if log_now:
                c, ips = max(sums[3], 1.0), clock.img_per_s()
                h, hm = sums[1] / c, sums[2] / c
                records.log(step, loss=sums[0] / c, lr=lr, weight_decay=wd, momentum=ema.decay, teacher_temp=temp,
                            teacher_entropy=h, teacher_marginal_entropy=hm, teacher_mi=hm - h,
                            student_kl=sums[0] / c - h,  # loss = teacher entropy + KL(teacher || student)
                            center_norm=center.norm().item(), center_drift=(center - center_ref).norm().item(),
                            img_per_s=ips, epoch=step / spe)
                if bar is not None:
                    bar.set_postfix(loss=f"{sums[0] / c:.3f}", H=f"{h:.2f}", MI=f"{hm - h:.2f}", img_s=f"{ips:.0f}")
                stats.zero_()
                center_ref = center.clone()
            if not (save_now or stopping):
                continue
            clock.pause()  # k-NN and checkpoint time is not training time
            if step in eval_steps:
                acc = knn()
                best = max(best, acc)
                times = {"train_seconds": clock.timed, "wall_seconds": clock.wall()}
                history.append({"step": step, "epoch": step / spe, "knn_acc": acc, **times})
                records.log(step, knn_acc=acc, epoch=step / spe, **times)
                if bar is not None:
                    bar.write(f"step {step} epoch {step / spe:.2f}: k-NN acc {acc:.2f}%")
            ckpts.save(step, student.parameters, checkpoint_state, world, device)
            due.saved()
            clock.go()
            if stopping:
                say_stopped(bar, stop, step)
                break
    finally:
        if bar is not None:
            bar.close()
        records.close()

    result = {"kind": "dino", "init_knn_acc": history[0]["knn_acc"] if history and history[0]["step"] == 0 else None,
              "final_knn_acc": history[-1]["knn_acc"] if history else float("nan"), "best_knn_acc": best}
    return finish_run(cfg, out, result, stopping and step < last_step, step, total_steps, spe, clock, world,
                      precision, stop["signal"], params=count_params(teacher.backbone))
