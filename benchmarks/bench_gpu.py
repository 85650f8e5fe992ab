"""Training throughput of smallvit's step against the standard PyTorch stack, on one device, in one run.

smallvit:  `smallvit.train()` itself, stopped by train.max_steps after the warm-up and measured steps and timed
           between the calls of its step_hook: uint8 data on the device, BatchAugment (the full recipe), bf16
           autocast on CUDA, fused AdamW on CUDA, optionally torch.compile (train.compile, train.compile_mode).
standard:  torchvision's per-image PIL pipeline (crop, flip, AutoAugment, ToTensor, Normalize, RandomErasing) in a
           DataLoader with worker processes, timm's VisionTransformer, timm Mixup/CutMix + SoftTargetCrossEntropy,
           torch AdamW, fp32 (as the reference ran) and optionally bf16.
loader:    the standard DataLoader alone (images to the device, no model): the ceiling of the standard stack.

Timing: the device is synchronised before every clock read; the first step (with train()'s set-up, compilation,
lazy initialisation) and the warm-up are reported apart from the steady state. TFLOP/s counts 3x the forward FLOPs
per image (forward + backward), the usual model-FLOPs convention. See docs/gpu.md.

    python benchmarks/bench_gpu.py --compile --standard-precision fp32 bf16 --out benchmarks/results/gpu.md
    python benchmarks/bench_gpu.py --quick                      # a CPU smoke run of the same code, < 2 minutes
    python benchmarks/bench_gpu.py --full-recipe --out benchmarks/results/gpu_full.md
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout's smallvit, installed or not
from bench_pretrain import random_cifar10
from timing import sync

from smallvit.config import COMPILE_MODES, parse_overrides
from smallvit.experiments import make_config
from smallvit.data import DataError, load, verify
from smallvit.datasets import DATASETS
from smallvit.model import count_params
from smallvit.runs import device_name, read_metrics
from smallvit.train import chunk_steps, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
# Dense BF16 tensor-core peaks from NVIDIA's datasheets (their headline figures assume 2:4 sparsity and are twice
# these). The first name fragment that matches the device name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0))
# Steps over which the standard stack's host syncs are counted (smallvit's: one whole augmentation chunk).
SYNC_STEPS = 8
# --quick: the quick preset's model, applied to both stacks, so the CPU run finishes in about a minute.
QUICK_MODEL = {"model.embed_dim": 96, "model.depth": 4, "model.num_heads": 4}
# Test images of the evaluation that ends every train() call (after the timed steps; not measured).
EVAL_IMAGES = 500


def _autocast(dev: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(step, warmup: int, steps: int, dev: torch.device) -> dict:
    """Run step(i) for warm-up then measured steps; seconds of the first step, of the warm-up, of the steady state
    (the standard stack and the loader; smallvit's rows are timed inside train(), bench_smallvit)."""
    sync(dev)
    t0 = time.perf_counter()
    step(0)  # lazy CUDA/cuDNN initialisation, worker start-up
    sync(dev)
    t1 = time.perf_counter()
    for i in range(1, warmup):
        step(i)
    sync(dev)
    t2 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    sync(dev)
    t3 = time.perf_counter()
    return {"first_s": t1 - t0, "warmup_s": t2 - t1, "steady_s": t3 - t2, "steps": steps}


def _is_sync_warning(w) -> bool:
    return "synchroniz" in str(w.message)


def count_syncs(step, first: int, n: int, dev: torch.device) -> float | None:
    """Host-device synchronisations per step of the standard stack over steps first .. first + n - 1 (CUDA's
    sync-debug mode); None off CUDA."""
    if dev.type != "cuda":
        return None
    sync(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(first, first + n):
                step(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(dev)
    return sum(map(_is_sync_warning, caught)) / n


@contextlib.contextmanager
def cudagraph_skips():
    """Count Inductor's decisions not to use CUDA graphs (its cudagraph_skips counter) and keep their reasons.

    Yields a dict filled on exit: {"skips": int, "reasons": [str]}. Every skip goes through
    torch._inductor.cudagraph_utils.log_cudagraph_skip_and_bump_counter, which logs the reason on that module's
    `cudagraphs` logger (silent unless TORCH_LOGS=cudagraphs) and bumps the counter; the reasons are read from the
    logger call, best effort (the count is the counter itself).
    """
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_utils

    out = {"skips": 0, "reasons": []}
    before = counters["inductor"]["cudagraph_skips"]
    log = cudagraph_utils.cudagraphs_log
    had = "warning" in vars(log)
    original = log.warning

    def warning(msg, *args, **kwargs):
        out["reasons"].append(str(msg).splitlines()[0][:120])
        return original(msg, *args, **kwargs)

    log.warning = warning
    try:
        yield out
    finally:
        if had:
            log.warning = original
        else:
            del log.warning
        out["skips"] = counters["inductor"]["cudagraph_skips"] - before


def _fwd_flops(model: torch.nn.Module, img_size: int, dev: torch.device) -> int:
    """Forward FLOPs of one image for any model, counted as smallvit.model.flops_per_image counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, img_size, img_size, device=dev))
    model.train(was)
    return int(fc.get_total_flops())


def _peak_mem(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def _reset_mem(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


@contextlib.contextmanager
def cifar10_dir(data_dir: str, n_random: int):
    """Yield (folder, source): data_dir when it holds CIFAR-10 (md5-checked), else a temporary folder of random
    uint8 images in CIFAR-10's files (the same work per image), whose md5s smallvit's dataset registry accepts until
    the block ends."""
    try:
        verify("cifar10", Path(data_dir), download=False)
    except DataError as e:
        print(f"real data unavailable ({str(e).splitlines()[0]}); using random images", file=sys.stderr)
    else:
        yield data_dir, f"CIFAR-10 from {data_dir}"
        return
    record = DATASETS["cifar10"]
    with tempfile.TemporaryDirectory() as scratch:
        try:
            random_cifar10(Path(scratch), n_random)
            yield scratch, f"random uint8 images ({5 * -(-n_random // 5):,}) in CIFAR-10's files"
        finally:
            DATASETS["cifar10"] = record


# ---- smallvit: smallvit.train() itself, timed at its step_hook


def bench_smallvit(overrides: dict, data_dir: str, dev: torch.device, B: int, precision: str, compile_mode: str,
                   warmup: int, steps: int) -> dict:
    """One row: train() in a run folder of its own, stopped by train.max_steps, timed at its step_hook (the device
    synchronised before each clock read): the first step (with train()'s set-up), steps 2 .. warmup, then `steps`
    measured ones. On CUDA it goes on to the end of the next whole augmentation chunk, whose host syncs the hook
    counts (the augmentation call once per chunk, as in training). The closing evaluation is not timed."""
    measured = warmup + steps
    K = chunk_steps(make_config("baseline", overrides).aug.chunk_images, B, dev)
    first = -(-measured // K) * K  # the next chunk boundary
    count = dev.type == "cuda"
    last = first + K if count else measured
    cfg = make_config("baseline", {
        "data.test_subset": EVAL_IMAGES, **overrides, "data.data_dir": data_dir, "data.download": False,
        "train.batch_size": B, "train.device": str(dev), "train.precision": precision, "train.max_steps": last,
        "train.compile": compile_mode != "no", "train.compile_mode": {"no": "default"}.get(compile_mode, compile_mode),
        "train.log_every_steps": last, "train.eval_every_epochs": 0, "train.checkpoint_every_steps": 0,
        "train.checkpoint_every_seconds": 0, "train.progress": False})
    clock, caught, window = {}, [], contextlib.ExitStack()

    def hook(step: int) -> None:  # after every optimiser step; `step` steps done
        if step in (1, warmup, measured):
            sync(dev)
            clock[step] = time.perf_counter()
        if count and step == first:
            caught.append(window.enter_context(warnings.catch_warnings(record=True)))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif count and step == last:
            torch.cuda.set_sync_debug_mode("default")
            window.close()

    torch._dynamo.reset()  # each row compiles afresh, in its own first step
    _reset_mem(dev)
    with tempfile.TemporaryDirectory() as tmp, cudagraph_skips() as skipped:
        sync(dev)
        t0 = time.perf_counter()
        try:
            result = train(cfg, Path(tmp) / "run", step_hook=hook)
        finally:
            if count:
                torch.cuda.set_sync_debug_mode("default")
            window.close()
        losses = [r["loss"] for r in read_metrics(Path(tmp) / "run") if "loss" in r]
    if result["step"] != last:
        raise RuntimeError(f"train() stopped at step {result['step']} ({result['status']}) of the {last} to measure")
    r = {"first_s": clock[1] - t0, "warmup_s": clock[warmup] - clock[1], "steady_s": clock[measured] - clock[warmup],
         "steps": steps, "syncs": sum(map(_is_sync_warning, caught[0])) / K if count else None, "sync_steps": K,
         "loss_ok": bool(losses) and all(map(math.isfinite, losses)), "mem": _peak_mem(dev),
         "fwd_flops": result["flops_per_image"], "params": result["params"]}
    if compile_mode in ("reduce-overhead", "max-autotune"):
        # Inductor bumps the counter without a logged reason for graphs with no GPU device.
        r["cudagraph_skips"] = skipped["skips"]
        r["cudagraph_reasons"] = skipped["reasons"] or (["no CUDA device"] if dev.type != "cuda" else [])
    return r


# ---- the standard stack: torchvision + DataLoader workers + timm


class CIFARImages(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's in-memory layout: a uint8 HWC array; each item becomes a PIL image."""

    def __init__(self, x_nchw: torch.Tensor, y: torch.Tensor, transform):
        self.data = np.ascontiguousarray(x_nchw.numpy().transpose(0, 2, 3, 1))  # (N, H, W, C)
        self.targets = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def standard_loader(x_cpu, y_cpu, B: int, workers: int, img_size: int, pin: bool):
    """The reference's input pipeline written with the standard tools: per-image PIL transforms in workers."""
    from torchvision import transforms as T

    info = DATASETS["cifar10"]
    tf = T.Compose([
        T.RandomCrop(img_size, padding=4),
        T.RandomHorizontalFlip(),
        T.AutoAugment(T.AutoAugmentPolicy.CIFAR10),
        T.ToTensor(),
        T.Normalize(info.mean, info.std),
        T.RandomErasing(p=0.25),
    ])
    return torch.utils.data.DataLoader(CIFARImages(x_cpu, y_cpu, tf), batch_size=B, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)


def _forever(loader):
    while True:
        yield from loader


def timm_vit(cfg):
    """timm's VisionTransformer with the baseline's shape (the overrides in --set apply to it too)."""
    from timm.models.vision_transformer import VisionTransformer

    m = cfg.model
    return VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                             num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, qkv_bias=m.qkv_bias,
                             drop_path_rate=m.drop_path, num_classes=m.num_classes)


def bench_loader(loader, dev, warmup, steps) -> dict:
    """The standard DataLoader alone: batches to the device, no model."""
    it = _forever(loader)
    return timed(lambda i: [t.to(dev, non_blocking=True) for t in next(it)], warmup, steps, dev)


def bench_standard(cfg, loader, dev, precision, warmup, steps) -> dict:
    """timm ViT + timm Mixup/CutMix + SoftTargetCrossEntropy + torch AdamW on batches from the standard loader."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    _reset_mem(dev)
    torch.manual_seed(0)
    model = timm_vit(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            weight_decay=cfg.optim.weight_decay)
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5, switch_prob=0.5, label_smoothing=0.1,
                  num_classes=cfg.model.num_classes)
    crit = SoftTargetCrossEntropy()
    it = _forever(loader)
    loss_sum = torch.zeros((), device=dev)

    def step(i):
        x, y = next(it)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        x, t = mixup(x, y)
        with _autocast(dev, precision):
            loss = crit(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum.add_(loss.detach())

    r = timed(step, warmup, steps, dev)
    r["syncs"] = count_syncs(step, warmup + steps, SYNC_STEPS, dev)
    r["sync_steps"] = SYNC_STEPS
    r["loss_ok"] = bool(torch.isfinite(loss_sum))
    r["mem"] = _peak_mem(dev)
    r["fwd_flops"] = _fwd_flops(model, cfg.model.img_size, dev)
    r["params"] = count_params(model)
    return r


# ---- the table


def peak_tflops(dev: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for frag, tf in PEAK_BF16_TFLOPS:
            if frag in name:
                return tf, f"dense BF16 datasheet value for {frag}"
        return None, f"unknown for {name}: pass --peak-tflops"
    return None, "no reference peak for CPUs: pass --peak-tflops"


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _notes(r: dict) -> str:
    notes = []
    if r.get("error"):
        notes.append(f"FAILED: {r['error']}")
    if r.get("cudagraph_skips") is not None:
        why = "; ".join(dict.fromkeys(r.get("cudagraph_reasons") or []))
        notes.append("CUDA graphs used" if r["cudagraph_skips"] == 0 else
                     f"CUDA graphs skipped {r['cudagraph_skips']}x" + (f" ({why})" if why else "")
                     + ": not a CUDA-graphs measurement")
    if r.get("loss_ok") is False:
        notes.append("non-finite loss")
    return "; ".join(notes).replace("|", "/")


def table(rows: list[dict], peak: float | None) -> str:
    ok = [r for r in rows if not r.get("error")]
    base = next((r["img_s"] for r in ok if r["stack"] == "standard" and r["precision"] == "fp32"), None)
    out = ["| stack | precision | compile | workers | first step s | warm-up s | steady img/s | ms/step | TFLOP/s "
           "| % of peak | × standard fp32 | host syncs/step | peak mem GiB | notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['stack']} | {r['precision']} | {r['compile']} | {r['workers']} | "
        if r.get("error"):
            out.append(head + "- | " * 9 + f"{_notes(r)} |")
            continue
        tf = r["fwd_flops"] * 3 * r["img_s"] / 1e12 if r.get("fwd_flops") else None
        pct = 100 * tf / peak if tf is not None and peak else None
        speed = r["img_s"] / base if base and r["stack"] != "loader" else None
        out.append(head + f"{r['first_s']:.2f} | {r['warmup_s']:.2f} | {r['img_s']:,.0f} | "
                   f"{1000 * r['steady_s'] / r['steps']:.1f} | {_fmt(tf, '.3g')} | {_fmt(pct, '.1f')} | "
                   f"{_fmt(speed, '.2f')} | {_fmt(r.get('syncs'), '.3g')} | {_fmt(r.get('mem'), '.2f')} | "
                   f"{_notes(r)} |")
    return "\n".join(out)


def _error_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _recover(dev: torch.device) -> None:
    """After a failed row: drop compiled graphs and cached memory, so the next row starts clean."""
    torch._dynamo.reset()
    if dev.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()


def measure_rows(jobs, render, out: str | None) -> list[dict]:
    """Run each (row fields, function) in turn; a row that raises is kept with its error and the next one runs.

    After every row the whole report (render(rows)) is printed to --out (written atomically), so a crash, a
    timeout or an out-of-memory later in the run loses no finished row.
    """
    rows = []
    for meta, fn in jobs:
        label = " ".join(str(meta[k]) for k in ("stack", "precision", "compile"))
        try:
            r = fn()
            print(f"{label}: {r['steps'] * r['batch'] / r['steady_s']:,.0f} img/s", flush=True)
        except Exception as e:  # noqa: BLE001  (a CUDA-graphs error, a Triton build, OOM: record it, keep going)
            r = {"error": _error_line(e)}
            print(f"{label}: FAILED ({r['error']})", file=sys.stderr, flush=True)
            _recover(meta.get("device", torch.device("cpu")))
        row = {**{k: v for k, v in meta.items() if k != "device"}, **r}
        if not row.get("error"):
            row["img_s"] = row["batch"] * row["steps"] / row["steady_s"]
        rows.append(row)
        if out:
            write_atomic(out, render(rows))
    return rows


def write_atomic(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, p)


def run_throughput(a, overrides: dict, dev: torch.device) -> str:
    cfg = make_config("baseline", overrides)
    B = a.batch or cfg.train.batch_size
    if B % 2:
        raise SystemExit("--batch must be even (timm's Mixup pairs the batch with its reverse)")
    K = chunk_steps(cfg.aug.chunk_images, B, dev)  # steps per augmentation call, as train.py
    with cifar10_dir(a.data_dir, max(4 * B, 2048, K * B + B)) as (data_dir, source):
        return _throughput(a, overrides, cfg, dev, B, K, data_dir, source)


def _throughput(a, overrides: dict, cfg, dev: torch.device, B: int, K: int, data_dir: str, source: str) -> str:
    precision = a.precision if a.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    drain = a.warmup + 2 * a.workers  # the workers' prefetched batches are consumed in the warm-up
    jobs = []
    if "smallvit" in a.stacks:
        for mode in ["no"] + (a.compile_modes if a.compile else []):
            jobs.append(({"stack": "smallvit", "precision": precision, "compile": mode, "workers": "-", "device": dev},
                         lambda mode=mode: {"batch": B, **bench_smallvit(overrides, data_dir, dev, B, precision, mode,
                                                                         a.warmup, a.steps)}))
    loader = {}

    def with_loader(fn):  # one DataLoader for the loader and standard rows, built by the first that needs it
        if "it" not in loader:
            x, y = load("cifar10", data_dir, download=False, train=True)
            loader["it"] = standard_loader(x, y, B, a.workers, cfg.model.img_size, pin=dev.type == "cuda")
        return {"batch": B, **fn(loader["it"])}

    if "loader" in a.stacks:
        jobs.append(({"stack": "loader", "precision": "-", "compile": "-", "workers": a.workers, "device": dev},
                     lambda: with_loader(lambda it: bench_loader(it, dev, drain, a.steps))))
    if "standard" in a.stacks:
        for prec in a.standard_precision:
            jobs.append(({"stack": "standard", "precision": prec, "compile": "no", "workers": a.workers,
                          "device": dev},
                         lambda prec=prec: with_loader(lambda it: bench_standard(cfg, it, dev, prec, drain, a.steps))))
    peak, peak_src = peak_tflops(dev, a.peak_tflops)
    rows = measure_rows(jobs, lambda rows: report(a, cfg, B, K, source, dev, peak, peak_src, rows), a.out)
    loader.clear()
    for r in rows:
        if r.get("loss_ok") is False:
            print(f"warning: non-finite loss in {r['stack']} {r['precision']}", file=sys.stderr)
    return report(a, cfg, B, K, source, dev, peak, peak_src, rows)


def report(a, cfg, B: int, K: int, source: str, dev, peak, peak_src: str, rows: list[dict]) -> str:
    m = cfg.model
    sv = next((r for r in rows if r["stack"] == "smallvit" and not r.get("error")), None)
    st = next((r for r in rows if r["stack"] == "standard" and not r.get("error")), None)
    failed = sum(bool(r.get("error")) for r in rows)
    lines = [
        f"Training-step throughput on {device_name(dev)}; torch {torch.__version__}, "
        f"timm {_version('timm')}, torchvision {_version('torchvision')}.",
        "",
        f"- command: `{' '.join(shlex.quote(s) for s in sys.argv)}`",
        f"- model: embed_dim {m.embed_dim}, depth {m.depth}, heads {m.num_heads}, mlp_ratio {m.mlp_ratio}, "
        f"patch {m.patch_size}, drop_path {m.drop_path}; params smallvit {_fmt(sv and sv['params'], ',')}, "
        f"timm {_fmt(st and st['params'], ',')}; forward GFLOP/img smallvit "
        f"{_fmt(sv and sv['fwd_flops'] / 1e9, '.3f')}, timm {_fmt(st and st['fwd_flops'] / 1e9, '.3f')}",
        f"- batch {B}; {a.warmup} warm-up steps (standard/loader: {a.warmup + 2 * a.workers}, to drain the "
        f"prefetch buffer), {a.steps} measured steps; data: {source}",
        f"- peak: {_fmt(peak, '.0f')} TFLOP/s ({peak_src}); TFLOP/s = 3 x forward FLOPs x img/s",
        "- smallvit: `smallvit.train()` itself (train.max_steps), timed at its step_hook; first step: includes "
        "train()'s set-up (data to the device, the model), torch.compile, lazy initialisation and (standard) worker "
        "start-up; "
        f"host syncs/step: CUDA sync-debug warnings per step over one whole augmentation chunk ({K} steps of "
        f"smallvit) or {SYNC_STEPS} steps (standard), n/a off CUDA; notes: Inductor's cudagraph-skip counter for "
        f"the compile modes that use CUDA graphs",
        f"- rows: {len(rows)} written as each finished" + (f", {failed} failed (error in notes)" if failed else ""),
        "",
        table(rows, peak),
    ]
    return "\n".join(lines)


def _version(mod: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(mod)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---- the full recipe: smallvit.train with compile, time to target accuracy


def time_to_targets(records: list[dict], batch_size: int, targets: list[float]) -> list[dict]:
    """For each target accuracy, the first evaluation that reached it and the training seconds up to it.

    Uses the evaluation entry's `train_seconds` when train.py logs it; otherwise estimates it from the nearest
    loss entry's cumulative `img_per_s` (train.py does not time the first step, so seen = (step - 1) x batch).
    """
    evals = [r for r in records if "test_acc" in r]
    logs = [r for r in records if r.get("img_per_s")]
    out = []
    for target in targets:
        hit = next((r for r in evals if r["test_acc"] >= target), None)
        row = {"target": target, "step": None, "epoch": None, "seconds": None, "source": "not reached"}
        if hit is not None:
            row.update(step=hit["step"], epoch=hit.get("epoch"), test_acc=hit["test_acc"])
            if "train_seconds" in hit:
                row.update(seconds=hit["train_seconds"], source="train_seconds")
            elif logs:
                near = min(logs, key=lambda r: (abs(r["step"] - hit["step"]), -r["step"]))
                row.update(seconds=(hit["step"] - 1) * batch_size / near["img_per_s"],
                           source=f"estimate: img_per_s at step {near['step']}")
            else:
                row["source"] = "no timing in metrics.jsonl"
        out.append(row)
    return out


def run_full_recipe(a, overrides: dict) -> str:
    from smallvit import train

    ov = {"data.data_dir": a.data_dir, "data.download": False, "train.compile": True, "train.eval_every_epochs": 1,
          **overrides}
    cfg = make_config("baseline", ov)
    out = Path(a.run_dir or REPO / "runs" / "gpu-full-recipe" / time.strftime("%Y%m%d-%H%M%S"))
    print(f"run folder: {out}", flush=True)
    result = train(cfg, out, resume=a.resume)
    rows = time_to_targets(read_metrics(out), cfg.train.batch_size, a.targets)
    ov_text = " ".join(f"{k}={v}" for k, v in overrides.items()) or "(none)"
    lines = [
        f"Full recipe (baseline, train.compile=true) on {result['device']}; torch {torch.__version__}.",
        "",
        f"- command: `{' '.join(shlex.quote(s) for s in sys.argv)}`; overrides: {ov_text}; run folder: `{out}`",
        f"- status {result['status']}, {result['step']} of {result['total_steps']} steps, final test acc "
        f"{result['final_test_acc']:.2f}%, best {result['best_test_acc']:.2f}%, precision {result['precision']}",
        f"- first step {_fmt(result.get('first_step_seconds'), '.1f')} s (torch.compile, warm-up, the first "
        f"augmentation chunk; of the last (re)start)",
        f"- training seconds {result['train_seconds']:.1f} (excludes the first step, evaluations and checkpoints), "
        f"wall seconds {result['wall_seconds']:.1f} (after data loading), "
        f"{_fmt(result['train_img_per_s'], ',.0f')} img/s",
        "",
        "| target test acc % | first reached at step | epoch | training seconds | timing source |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['target']} | {_fmt(r['step'], 'd', '-')} | {_fmt(r['epoch'], '.1f', '-')} | "
                     f"{_fmt(r['seconds'], '.1f', '-')} | {r['source']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides on the baseline, applied to both stacks (model shape, batch, ...)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 100; --quick 4)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps incl. the first (default 10; --quick 2)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: train.batch_size; --quick 64)")
    p.add_argument("--compile", action="store_true", help="also measure smallvit with torch.compile")
    p.add_argument("--compile-modes", nargs="+", default=["default"], choices=list(COMPILE_MODES),
                   help="torch.compile modes for --compile (reduce-overhead = CUDA graphs)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="smallvit precision (auto: bf16 on CUDA, fp32 on CPU, as train.precision=auto)")
    p.add_argument("--standard-precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--stacks", nargs="+", default=["smallvit", "loader", "standard"],
                   choices=["smallvit", "loader", "standard"])
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="standard DataLoader workers")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder holding cifar-10-batches-py")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for '%% of peak' (default: by name)")
    p.add_argument("--quick", action="store_true", help="a tiny run (small model, few steps) to check the code")
    p.add_argument("--full-recipe", action="store_true", help="run smallvit.train on the baseline with compile")
    p.add_argument("--targets", nargs="+", type=float, default=[90.0, 93.0, 93.5], help="--full-recipe accuracies")
    p.add_argument("--run-dir", default=None, help="--full-recipe run folder (default runs/gpu-full-recipe/<time>)")
    p.add_argument("--resume", action="store_true", help="--full-recipe: continue the run in --run-dir (a timed-out "
                   "run checkpoints on SIGTERM; training seconds carry over)")
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = parse_overrides(a.set)
    if a.full_recipe:
        text = run_full_recipe(a, overrides)
    else:
        if a.quick:
            overrides = {**QUICK_MODEL, **overrides}
        a.steps = a.steps or (4 if a.quick else 100)
        a.warmup = max(1, a.warmup or (2 if a.quick else 10))
        a.batch = a.batch or (64 if a.quick else None)
        text = run_throughput(a, overrides, torch.device(a.device))
    print(text)
    if a.out:
        write_atomic(a.out, text)


if __name__ == "__main__":
    main()
