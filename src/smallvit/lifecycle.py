"""One run's life, shared by both loops (train.py, pretrain.py) and read by the launchers (slurm.py, ablate.py).

Set-up: signals and torchrun (run_guarded), the run folder and its lock (open_run), the data on the device with the
rank-0 download (dataset_info, load_data), the step plan and the data order (step_plan, BatchOrder), resume state
(resume_state), the records (start_records), compile mode (compile_mode). In the loop: the clock (Clock), the one
host sync (agree), the non-finite checks (skip_nonfinite) and the checkpoints (Checkpoints). The end: finish_run and
result.json. Each is a plain function or a small class the loops call in their own order; no engine.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import data as D
from . import distributed as dist_
from .config import Config, ConfigError, diff, to_dict
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
    remove_stale_temps,
    requeue_wait_s,
    save_checkpoint,
    truncate_metrics,
)


def run_guarded(device_cfg: str, body) -> dict:
    """Run body(rank, world, device, stop) under torchrun set-up, with SIGINT/SIGTERM/SIGUSR2 in stop["signal"]
    (the body checkpoints and returns) and OSErrors turned into one TrainingError line.
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


def run_state(folder: Path) -> str:
    """done (result.json), partial (a checkpoint) or new: what a launcher does with a run folder."""
    if (folder / "result.json").is_file():
        return "done"
    if (folder / CHECKPOINT).is_file():
        return "partial"
    return "new"


# ---- data, step plan, order


def dataset_info(cfg: Config, world: int) -> D.DatasetMeta:
    """The dataset's facts (num_classes, mean, std, class names). Under torchrun rank 0 first checks the files and
    downloads what is missing while the others wait (no two ranks writing one folder at once)."""
    d = cfg.data
    if world > 1 and d.download and d.dataset != D.FOLDER:
        dist_.on_rank0(lambda: bool(D.load(d.dataset, d.data_dir, True, train=False)), world)
    return D.dataset_meta(d.dataset, d.data_dir, cfg.model.img_size, download=d.download)


def load_data(cfg: Config, device: torch.device, world: int):
    """((x_train, y_train), (x_test, y_test), (x_val, y_val) or None): the whole dataset as uint8 on the device, cut
    to data.subset and data.test_subset, with data.val_images held out of the training images (D.val_split, the
    same for every train.seed); each rank reads its own copy (after dataset_info's download)."""
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


def step_plan(cfg: Config, n: int, total_steps: int = 0) -> tuple[int, int, int, int, set[int]]:
    """(steps per epoch, total steps, warm-up steps, last step of this run, evaluation steps) for n images; the
    total is train.epochs' unless given (a time budget's decision, budget.py)."""
    t, a = cfg.train, cfg.aug
    spe = D.steps_per_epoch(n, a.repeats, t.batch_size)
    if spe == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {n * a.repeats} samples per epoch")
    total_steps = total_steps or t.epochs * spe
    last_step = min(total_steps, t.max_steps) if t.max_steps else total_steps
    eval_steps = {e * spe for e in range(1, t.epochs + 1) if t.eval_every_epochs and e % t.eval_every_epochs == 0}
    eval_steps = {s for s in eval_steps if s < last_step} | {last_step}  # always evaluate the end (reference §12.11)
    return spe, total_steps, cfg.optim.warmup_epochs * spe, last_step, eval_steps


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


# ---- set-up of the loop


def resume_state(out: Path, cfg: Config, device: torch.device, resume: bool, world: int) -> dict | None:
    """The checkpoint to continue from (with --resume, when there is one): rank 0 reads it and sends it to the
    others (no shared filesystem needed), after checking that it is this run's and can continue exactly here."""
    path = out / CHECKPOINT
    return dist_.on_rank0(lambda: read_resume_state(path, cfg, device) if resume and path.is_file() else None, world)


def read_resume_state(path: Path, cfg: Config, device: torch.device) -> dict:
    """A checkpoint that `cfg` can continue on `device`; CheckpointError with what to do otherwise."""
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


def start_records(out: Path, cfg: Config, device: torch.device, main: bool, resume: bool, step: int,
                  sinks: list | None = None) -> Records:
    """Rank 0 tidies the folder (temporary files of a killed write, metric lines after the resumed step) and writes
    config.json, overrides.json and env.json; the records (metrics.jsonl, TensorBoard, `sinks`) of every rank."""
    if main:
        remove_stale_temps(out)  # left by a write that a SIGKILL cut short; the renamed files are all complete
        if resume:
            truncate_metrics(out, step)
        atomic_write_json(out / "config.json", to_dict(cfg))
        atomic_write_json(out / "overrides.json", diff(cfg))
        atomic_write_json(out / "env.json", environment(device))
    return Records(out, enabled=main, sinks=sinks or [])


def precision_of(cfg: Config, device: torch.device) -> str:
    """train.precision resolved: auto is bf16 on CUDA, fp32 elsewhere."""
    t = cfg.train
    return ("bf16" if device.type == "cuda" else "fp32") if t.precision == "auto" else t.precision


def autocast_of(precision: str, device: torch.device):
    """A function returning the forward pass's autocast context (bf16) or a null context."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def compile_mode(cfg: Config, world: int, main: bool) -> str | None:
    """torch.compile's mode for train.compile_mode (None: torch's default); under torchrun without CUDA graphs
    (distributed.compile_mode), said once."""
    mode, note = dist_.compile_mode(cfg.train.compile_mode, world)
    if note and main:
        print(f"note: {note}", flush=True)
    return None if mode == "default" else mode


def progress_bar(main: bool, cfg: Config, last_step: int, step: int):
    """tqdm over the steps on rank 0 (train.progress), else None."""
    if not (main and cfg.train.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=last_step, initial=step, dynamic_ncols=True, unit="step")


# ---- in the loop


class Clock:
    """Wall seconds (from the start of set-up, plus earlier starts of the run) and training seconds (the timed
    steps: not the first step of a (re)start, where compilation and warm-up land, nor evaluations and checkpoints).
    Synchronises the device before reading the time."""

    def __init__(self, device: torch.device):
        self.device, self.start = device, time.perf_counter()
        self.timed, self.seen, self.before = 0.0, 0.0, 0.0  # training seconds and images, earlier wall seconds
        self.timer: float | None = None  # when the timed stretch began; None until the first step is done
        self.first_step_seconds: float | None = None  # set-up and the first step of this (re)start

    def resume(self, state: dict) -> None:
        self.timed, self.seen, self.before = (state.get(k, 0.0) for k in ("train_seconds", "train_images",
                                                                          "wall_seconds"))

    def stepped(self, images: int) -> None:
        """After each step: the first one starts the timer, the others count their images."""
        if self.timer is None:
            sync(self.device)
            self.timer = time.perf_counter()
            self.first_step_seconds = self.timer - self.start  # reported on its own: torch.compile lands here
        else:
            self.seen += images

    def img_per_s(self) -> float:
        sync(self.device)
        elapsed = self.timed + (time.perf_counter() - self.timer if self.timer else 0.0)
        return self.seen / elapsed if elapsed > 0 else 0.0

    def pause(self) -> None:
        """Before an evaluation or a checkpoint: their time is not training time."""
        if self.timer is not None:
            sync(self.device)
            self.timed += time.perf_counter() - self.timer

    def go(self) -> None:
        if self.timer is not None:
            self.timer = time.perf_counter()

    def wall(self) -> float:
        return self.before + time.perf_counter() - self.start

    def state(self) -> dict:
        """What a checkpoint keeps of the clock."""
        return {"train_seconds": self.timed, "train_images": self.seen, "wall_seconds": self.wall()}


class CheckpointClock:
    """When a wall-time checkpoint is due (train.checkpoint_every_seconds). Each rank reads its own clock at the
    loop's host sync, where the flags are summed, so every rank saves at the same step when any one is due."""

    def __init__(self, every_seconds: float):
        self.every, self.last = every_seconds, time.monotonic()

    def due(self) -> float:
        return float(self.every > 0 and time.monotonic() - self.last >= self.every)

    def saved(self) -> None:
        self.last = time.monotonic()


def agree(sums: torch.Tensor, stop: dict, due: CheckpointClock, world: int) -> tuple[list[float], bool, bool]:
    """The loop's one host sync (at log, checkpoint and signal points only): `sums` (the loop's running totals)
    summed over the ranks, and whether any rank was signalled or has a wall-time checkpoint due, so that under
    torchrun every rank stops and saves at the same step."""
    flags = torch.cat([sums, torch.tensor([float(stop["signal"] is not None), due.due()], device=sums.device)])
    if world > 1:
        dist.all_reduce(flags)
    *totals, signalled, is_due = flags.tolist()
    return totals, signalled > 0, is_due > 0


def check_each_step(device: torch.device, on_nonfinite: str) -> bool:
    """Check the loss every step on CPU (free) or when skipping (needed); on GPUs only at log and checkpoint points,
    so no step waits for the device."""
    return device.type == "cpu" or on_nonfinite == "skip"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Checkpoints:
    """The run's checkpoint file and the step of the last one written: rank 0 saves only finite weights (never
    replacing the last good checkpoint with broken ones), and a non-finite loss names what was kept."""

    def __init__(self, out: Path, last_saved: int | None):
        self.path, self.last = out / CHECKPOINT, last_saved

    def nonfinite(self, step: int, before: bool = False, what: str = "loss") -> TrainingError:
        where = f"in the steps up to step {step}" if before else f"at step {step}"
        kept = (f"{self.path} (step {self.last}) is unchanged" if self.last is not None
                else "no checkpoint had been written yet")
        return TrainingError(f"non-finite {what} {where}; training stopped and {kept}. Lower optim.lr or set "
                             f"optim.grad_clip (new --out folder), or resume with train.on_nonfinite=skip to skip "
                             f"such steps.")

    def save(self, step: int, params, state, world: int, device: torch.device) -> None:
        """Rank 0 writes state() (with where it was trained) if every tensor of `params` is finite."""
        def write():
            if not torch.stack([torch.isfinite(p).all() for p in params()]).all():
                raise self.nonfinite(step, what="weights")
            save_checkpoint(self.path, {**state(), "world_size": world, "device_type": device.type})

        dist_.on_rank0(write, world)
        self.last = step


def skip_nonfinite(loss: torch.Tensor, check: bool, cfg: Config, world: int, ckpts: Checkpoints, records: Records,
                   step: int) -> bool:
    """With `check` (check_each_step), a non-finite loss on any rank stops the run (train.on_nonfinite=stop) or
    skips the step's update, recorded (skip); True when the caller must skip it."""
    if not (check and dist_.any_rank(~torch.isfinite(loss.detach()), world)):
        return False
    if cfg.train.on_nonfinite == "stop":
        raise ckpts.nonfinite(step + 1)
    records.log(step + 1, event="skipped_nonfinite")
    return True


def say_stopped(bar, stop: dict, step: int) -> None:
    """The progress bar's last line after a signal (here or on another rank) stopped the loop at a checkpoint."""
    if bar is not None:
        bar.write(f"{stop['signal'] or 'a signal to another rank'}: checkpoint saved at step {step}; "
                  f"continue with --resume")


# ---- the end


def finish_run(cfg: Config, out: Path, result: dict, interrupted: bool, step: int, total_steps: int, spe: int,
               clock: Clock, world: int, precision: str, stop_signal: str | None = None, **extra) -> dict:
    """The result dict (status, the loop's own numbers in `result`, steps, throughput, environment), also written
    to result.json unless the run was interrupted."""
    result = {
        "status": "interrupted" if interrupted else ("done" if step >= total_steps else "stopped_at_max_steps"),
        **result,
        "step": step,
        "total_steps": total_steps,
        "epochs_done": step / spe,
        "train_img_per_s": clock.seen / clock.timed if clock.timed > 0 else None,
        "train_seconds": clock.timed,
        "wall_seconds": clock.wall(),
        "first_step_seconds": clock.first_step_seconds,  # of this (re)start: compilation, warm-up, first batch
        **extra,
        "device": environment(clock.device)["device"],
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
