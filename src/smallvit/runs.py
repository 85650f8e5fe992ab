"""Run folders: atomic checkpoints, metric records (JSON lines + TensorBoard), environment record."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import pickle
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .config import Config, ConfigError, diff, from_dict, to_dict

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


class TrainingError(RuntimeError):
    """Training stopped for a reason the message explains (e.g. a non-finite loss)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


def atomic_write_bytes(path: Path, write) -> None:
    """Write via a temporary file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), _mode_for(path))  # mkstemp makes 0600 files; keep a normal, shareable mode
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write {path}: {e.strerror or e}. The previous file (if any) is "
                                  f"unchanged; {_advice(e)}") from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def _mode_for(path: Path) -> int:
    """The mode of the file being replaced, or what open() would give a new file under the current umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0o22)
        os.umask(umask)
        return 0o666 & ~umask


def _advice(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some disk space (or choose another --out folder), then run the same command with --resume."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable or choose another --out folder."
    return "fix the cause, then run the same command with --resume."


LOCK = ".lock"


class RunBusyError(CheckpointError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """One writer per run folder: an exclusive `flock` on RUN/.lock, taken before anything in the folder is read or
    written, held for the whole run and released by the kernel when the holder dies (kill -9 included), so a stale
    lock file never blocks anyone. The file names the holder (pid, host, SLURM job) for the refusal message; it is
    never deleted (deleting a lock file lets two processes lock two different files)."""

    def __init__(self, folder: Path, wait_s: float = 0.0):
        self.folder = Path(folder)
        self.made = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(path)
                    os.close(self.fd)
                    raise RunBusyError(f"{self.folder} is in use by {holder}; wait for it to end (or stop it), or "
                                       f"choose another --out") from None
                time.sleep(0.5)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder_info()).encode(), 0)

    def release(self) -> None:
        """Drop the lock. A folder this lock made, in which nothing else was written (a run refused during its
        set-up: a bad init_from file, missing data), is removed again, so a refused command leaves nothing behind."""
        if self.fd is None:
            return
        if self.made and [p.name for p in self.folder.iterdir()] == [LOCK]:
            (self.folder / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # someone started writing there meanwhile: leave it
                self.folder.rmdir()
        os.close(self.fd)  # closing the only descriptor drops the flock
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holder_info() -> dict:
    """Who this process is, for the message another process gets: pid, host and the SLURM job if any."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return {"pid": os.getpid(), "host": platform.node(), **({"slurm_job": job} if job else {})}


def _read_holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        h = {}
    if not h:
        return "another process (it has not written its name yet)"
    job = f", SLURM job {h['slurm_job']}" if h.get("slurm_job") else ""
    return f"pid {h.get('pid')} on {h.get('host')}{job}"


def requeue_wait_s(folder: Path) -> float:
    """How long to wait for the lock: a requeued SLURM job may start while its previous incarnation still shuts
    down (it saves its checkpoint after SLURM's warning), so the same job id waits for it; anyone else: no wait."""
    me = holder_info().get("slurm_job")
    try:
        other = json.loads((Path(folder) / LOCK).read_text() or "{}").get("slurm_job")
    except (OSError, json.JSONDecodeError):
        return 0.0
    return 300.0 if me and me == other else 0.0


def remove_stale_temps(folder: Path) -> None:
    """Delete temporary files left by a write that was killed (SIGKILL, power loss) before its rename. Only the
    holder of the folder's RunLock calls this, so no other writer's temporary file can be in flight."""
    for p in Path(folder).glob(".*.tmp"):
        p.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def save_checkpoint(path: Path, state: dict) -> None:
    """Serialise in memory first, then write the bytes: torch.save's zip writer turns a failed write (a full disk,
    a file-size limit) into a RuntimeError from its destructor; a plain write raises the OSError itself, which
    atomic_write_bytes reports in one line."""
    state = dict(state, format=CHECKPOINT_FORMAT)

    def write(f):
        buf = io.BytesIO()
        torch.save(state, buf)
        f.write(buf.getbuffer())

    atomic_write_bytes(path, write)


def is_unsafe_refusal(e: pickle.UnpicklingError) -> bool:
    """Whether torch's weights-only unpickler refused an object (rather than the file not being a pickle at all)."""
    return "Unsupported global" in str(e) or "not an allowed global" in str(e)


def unsafe_file_error(path: Path, advice: str) -> CheckpointError:
    """The error for a file that the weights-only unpickler refuses. torch's own message advises retrying with
    weights_only=False, which runs whatever code the file holds: never relay that for a file from elsewhere."""
    return CheckpointError(f"{path} is not a smallvit checkpoint: it holds Python objects beyond tensors and plain "
                           f"values, which smallvit refuses to load (such a file may be unsafe). {advice}")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only=True: no arbitrary code) with clear errors."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass a run folder or a {CHECKPOINT} file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if is_unsafe_refusal(e):
            raise unsafe_file_error(path, "Use a checkpoint written by smallvit.") from None
        raise CheckpointError(f"{path} is not a readable smallvit checkpoint (not a valid torch file); it may be "
                              f"truncated or from another program: use another checkpoint or start a new run") from None
    except Exception as e:  # noqa: BLE001  (whatever torch raises for a bad file, the user gets one clear line)
        raise CheckpointError(
            f"{path} is not a readable smallvit checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"It may be truncated or from another program; use another checkpoint or start a new run."
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a smallvit checkpoint (no model/config entries)")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format')}, expected {CHECKPOINT_FORMAT}")
    return state


def read_safetensors(path: Path) -> tuple[dict, dict, dict | None]:
    """(state dict, config dict, dataset facts) of a file written by `export_safetensors`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iterator)
    except Exception as e:  # noqa: BLE001  (a damaged file: one clear line)
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != "smallvit" or "config" not in meta:
        raise CheckpointError(f"{path} holds no smallvit config (not written by `smallvit export --format "
                              f"safetensors`); use it through train.init_from instead")
    return state, json.loads(meta["config"]), json.loads(meta.get("dataset") or "null")


def evaluated_weights(state: dict) -> dict:
    """The weights a run evaluated: the EMA of the weights when it kept one (train.ema_decay), else the model's."""
    return state.get("model_ema") or state["model"]


def load_model_state(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """load_state_dict with a message that names the mismatching keys instead of torch's traceback."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if extra:
            parts.append(f"unexpected {extra[:5]}")
        if shapes:
            parts.append("shape mismatch " + ", ".join(
                f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:5]))
        raise CheckpointError(
            f"{source} was saved from a different model ({'; '.join(parts)}). "
            f"Use the config the checkpoint was trained with."
        )
    model.load_state_dict(state_dict)


def git_info() -> dict:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               timeout=5, check=False)
        if sha.returncode == 0:
            return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"sha": None, "dirty": None}


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def packages() -> dict[str, str]:
    """Every installed distribution and its version: the resolved environment, to compare with requirements.lock."""
    from importlib import metadata

    return dict(sorted((d.metadata["Name"], d.version) for d in metadata.distributions() if d.metadata["Name"]))


def environment(device: torch.device) -> dict:
    import numpy
    import timm
    import torchvision

    return {
        "git": git_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "device": device_name(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cuda": torch.version.cuda,
        "packages": packages(),
        "hostname": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class Records:
    """metrics.jsonl plus TensorBoard scalars, and `sinks` (objects with log(step, values) and close(), e.g.
    wandb_log.WandbSink) that receive every record too; a no-op on non-zero ranks."""

    def __init__(self, out_dir: Path | None, enabled: bool = True, sinks: tuple = ()):
        self.enabled = enabled and out_dir is not None
        self.tb = None
        self.sinks = list(sinks) if self.enabled else []
        if self.enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115  (open for the whole run)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
        for sink in self.sinks:
            sink.log(step, values)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            for sink in self.sinks:
                sink.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines written after `step` (the checkpoint a run resumes from), so the record has no duplicates.

    Rewritten atomically: a kill during the rewrite leaves the old file, never a shorter one.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        atomic_write_bytes(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


# ---- the run folder: its name, and what may be written into it

# Keys that may differ between a checkpoint and the resuming config (they do not change the result, or, for
# on_nonfinite, only decide what happens after a fault: the documented fix is to resume with skip).
RESUME_FREE_KEYS = {"train.max_steps", "train.progress", "train.log_every_steps", "train.device", "train.threads",
                    "train.compile", "train.compile_mode", "train.checkpoint_every_steps", "train.on_nonfinite",
                    "train.checkpoint_every_seconds",
                    "data.data_dir", "data.download", "train.wandb_project", "train.wandb_entity",
                    "train.wandb_name", "train.wandb_tags"}


def default_run_dir(cfg: Config, root: str = "runs") -> Path:
    """Deterministic folder name from the diff against the baseline: same config, same folder."""
    d = {k: v for k, v in diff(cfg).items() if k not in RESUME_FREE_KEYS and k != "train.seed"}
    slug = "-".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(d.items())) or "baseline"
    slug = slug.replace("/", "_").replace(" ", "").replace("(", "").replace(")", "").replace(",", "_")
    if len(slug) > 120:
        import hashlib

        slug = slug[:100] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:10]
    return Path(root) / slug / f"seed{cfg.train.seed}"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); move the run folder aside and start a new run") from None


def config_changes(cfg: Config, saved: dict, source: Path) -> dict[str, tuple]:
    """{key: (saved value, cfg's value)} for every key outside RESUME_FREE_KEYS where a saved config (a run's
    config.json or checkpoint) differs from `cfg`: the keys that make it another experiment."""
    try:
        old = from_dict(saved)
    except ConfigError as e:
        raise CheckpointError(f"{source} holds a config this version cannot read ({str(e).splitlines()[0]}); "
                              f"start a new --out folder") from None
    was = to_dict(old)
    return {k: (was[k.split(".")[0]][k.split(".")[1]], v) for k, v in diff(cfg, old).items()
            if k not in RESUME_FREE_KEYS}


def describe_changes(changes: dict[str, tuple], limit: int = 4) -> str:
    """"optim.lr 0.001 -> 0.0123, ..." for a refusal message."""
    parts = [f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items())[:limit]]
    return ", ".join(parts) + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def check_same_config(cfg: Config, saved: dict, source: Path) -> None:
    changed = {k: new for k, (_, new) in config_changes(cfg, saved, source).items()}
    if changed:
        raise CheckpointError(f"{source} was written with a different config ({changed}); "
                              f"resume with the same settings or start a new --out folder")


def check_run_folder(out: Path, cfg: Config, resume: bool) -> dict | None:
    """Refuse to mix two runs in one folder; when resuming a run that has ended, return its result."""
    held = [f for f in (CHECKPOINT, "result.json", "metrics.jsonl") if (out / f).is_file() and (out / f).stat().st_size]
    if not resume:
        if held:
            raise CheckpointError(f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it "
                                  f"or choose another --out")
        return None
    if (out / "config.json").is_file():
        check_same_config(cfg, read_json(out / "config.json"), out / "config.json")
    if (out / "result.json").is_file():
        done = read_json(out / "result.json")
        if done.get("status") == "done" or (cfg.train.max_steps and done.get("step", 0) >= cfg.train.max_steps):
            return done
    return None
