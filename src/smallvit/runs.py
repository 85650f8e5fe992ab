"""Run folders: atomic checkpoints, metric records (JSON lines + TensorBoard), environment record."""

from __future__ import annotations

import errno
import json
import os
import pickle
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

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


def remove_stale_temps(folder: Path) -> None:
    """Delete temporary files left by a write that was killed (SIGKILL, power loss) before its rename."""
    for p in Path(folder).glob(".*.tmp"):
        p.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def save_checkpoint(path: Path, state: dict) -> None:
    state = dict(state, format=CHECKPOINT_FORMAT)
    atomic_write_bytes(path, lambda f: torch.save(state, f))


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
