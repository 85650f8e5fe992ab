"""`smallvit profile`: torch.profiler over a few real training steps of a config (reference §9.5, made useful).

The steps are `train()`'s own (its `step_hook` advances the profiler), under a wait / warm-up / active schedule
after one skipped first step (compilation, first augmentation). Writes, in the output folder:
- trace/*.pt.trace.json: the active steps, for TensorBoard's profiler plugin, chrome://tracing or ui.perfetto.dev;
- profile.md: where one step's time goes (the `augment`, `forward`, `backward` ranges and torch's optimiser
  ranges), the top operators by self time, and the peak memory; profile.json: the same numbers.
Images are augmented in chunks of several steps (aug.chunk_images), so by default the active window spans whole
chunks and the augmentation share is its true average.
"""

from __future__ import annotations

import math
import resource
import tempfile
from pathlib import Path

import torch

from .config import Config, apply_overrides
from .distributed import resolve_device
from .runs import atomic_write_bytes, atomic_write_json

PHASES = {"augment": "augmentation", "forward": "forward (+ loss)", "backward": "backward",
          "Optimizer.": "optimiser (step, zero_grad)"}  # range name (or prefix) -> row label


class ProfileError(RuntimeError):
    """The profile could not be taken; the message says why."""


def _phase(name: str) -> str | None:
    for key, label in PHASES.items():
        if name == key or (key.endswith(".") and name.startswith(key)):
            return label
    return None


def profile(cfg: Config, out_dir: str | Path, wait: int = 1, warmup: int = 1, active: int = 0,
            with_stack: bool = False, top: int = 15) -> dict:
    """Profile `active` training steps of `cfg` (0: whole augmentation chunks, at least 3); write the trace and
    the tables to `out_dir`; return the numbers and the Markdown."""
    from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler

    from .train import chunk_steps, train

    device = resolve_device(cfg.train.device)
    per_step = chunk_steps(cfg.aug.chunk_images, cfg.train.batch_size, device,
                           cfg.model.in_chans * cfg.model.img_size**2)
    active = active or per_step * math.ceil(3 / per_step)
    steps = 1 + wait + warmup + active
    # Only the end is evaluated (on a few images) and checkpointed: the profiled window holds training steps only.
    run_cfg = apply_overrides(cfg, {"train.max_steps": steps, "train.eval_every_epochs": 0, "train.progress": False,
                                    "train.checkpoint_every_steps": 0, "data.test_subset": 64,
                                    "train.wandb_project": ""})
    out = Path(out_dir)
    trace_dir = out / "trace"
    trace_dir.mkdir(parents=True, exist_ok=True)
    before = set(trace_dir.glob("*.json"))
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    prof = torch.profiler.profile(
        activities=activities, schedule=schedule(skip_first=1, wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(trace_dir)), record_shapes=True, with_stack=with_stack)
    with tempfile.TemporaryDirectory(prefix="smallvit-profile-") as run_dir, prof:
        result = train(run_cfg, Path(run_dir) / "run", step_hook=lambda step: prof.step())
    traces = sorted(set(trace_dir.glob("*.json")) - before)
    if result["step"] < steps or not traces:  # a shorter run would profile its evaluation as a training step
        raise ProfileError(f"the run ended after {result['step']} steps, before the {steps} the schedule needs; "
                           f"lower --active/--wait/--warmup or raise train.epochs")
    numbers = _summarise(prof.key_averages(), active, cuda, top)
    numbers.update(steps_profiled=active, wait=wait, warmup=warmup, device=result["device"],
                   batch_size=cfg.train.batch_size, steps_per_augment_chunk=per_step, trace=str(traces[-1]),
                   peak_memory=_peak_memory(device))
    md = to_markdown(numbers)
    atomic_write_bytes(out / "profile.md", lambda f: f.write(md.encode()))
    atomic_write_json(out / "profile.json", numbers)
    return {**numbers, "markdown": md, "folder": str(out)}


def _summarise(events, active: int, cuda: bool, top: int = 15) -> dict:
    """Per-step milliseconds of the phases and of the top operators, from the profiler's averages."""
    dev_total = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    dev_self = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    per = lambda us: us / 1000.0 / active  # microseconds over the window -> ms per step
    step_ms = sum(per(e.cpu_time_total) for e in events if e.key.startswith("ProfilerStep"))
    phases = {}
    for e in events:
        label = _phase(e.key)
        if label:
            row = phases.setdefault(label, {"cpu_ms": 0.0, "device_ms": 0.0})
            row["cpu_ms"] += per(e.cpu_time_total)
            row["device_ms"] += per(getattr(e, dev_total, 0.0)) if cuda else 0.0
    ops = [e for e in events if not _phase(e.key) and not e.key.startswith("ProfilerStep")]
    ops.sort(key=lambda e: getattr(e, dev_self, 0.0) if cuda else e.self_cpu_time_total, reverse=True)
    rows = [{"op": e.key, "calls_per_step": e.count / active, "self_cpu_ms": per(e.self_cpu_time_total),
            "self_device_ms": per(getattr(e, dev_self, 0.0)) if cuda else None} for e in ops[:top]]
    return {"step_ms": step_ms, "phases": phases, "top_ops": rows, "cuda": cuda}


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"what": "torch.cuda.max_memory_allocated", "GiB": torch.cuda.max_memory_allocated(device) / 2**30}
    # ru_maxrss is KiB on Linux: the whole process, dataset included (the profiler has no CPU peak of its own).
    return {"what": "peak RSS of the process", "GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def to_markdown(n: dict) -> str:
    """The tables of profile.md."""
    step = n["step_ms"] or float("nan")
    dev = n["cuda"]
    lines = [f"# Profile: {n['steps_profiled']} training steps, batch {n['batch_size']}, {n['device']}", "",
             f"One step: {step:.2f} ms on the host (CPU wall time of the profiler's step ranges). Images are "
             f"augmented once per {n['steps_per_augment_chunk']} steps; the rows are per-step averages.", "",
             "| phase | CPU ms/step | share |" + (" device ms/step |" if dev else ""),
             "|---|---:|---:|" + ("---:|" if dev else "")]
    accounted = 0.0
    for label in PHASES.values():
        row = n["phases"].get(label, {"cpu_ms": 0.0, "device_ms": 0.0})
        accounted += row["cpu_ms"]
        lines.append(f"| {label} | {row['cpu_ms']:.2f} | {100 * row['cpu_ms'] / step:.1f}% |"
                     + (f" {row['device_ms']:.2f} |" if dev else ""))
    other = step - accounted
    lines.append(f"| other (schedule, logging, Python) | {other:.2f} | {100 * other / step:.1f}% |"
                 + (" |" if dev else ""))
    key = "self device" if dev else "self CPU"
    lines += ["", f"Top operators by {key} time:", "",
              "| op | calls/step | self CPU ms/step |" + (" self device ms/step |" if dev else ""),
              "|---|---:|---:|" + ("---:|" if dev else "")]
    for o in n["top_ops"]:
        lines.append(f"| `{o['op']}` | {o['calls_per_step']:.1f} | {o['self_cpu_ms']:.3f} |"
                     + (f" {o['self_device_ms']:.3f} |" if dev else ""))
    pm = n["peak_memory"]
    lines += ["", f"Peak memory: {pm['GiB']:.3f} GiB ({pm['what']}).", "",
              f"Trace: `{n['trace']}` (TensorBoard with torch-tb-profiler, chrome://tracing or ui.perfetto.dev).", ""]
    return "\n".join(lines)

