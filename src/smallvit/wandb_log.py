"""Weights & Biases logging (reference §10.1), on when `train.wandb_project` is set; `pip install smallvit[wandb]`.

A sink of `runs.Records`: every record that reaches metrics.jsonl and TensorBoard reaches W&B too, at the same
step. Evaluation entries are named for what they are: `test_acc` -> `test/acc`, `val_loss` -> `val/loss`.
The run id is kept in the run folder (wandb.json), so `--resume` continues the same W&B run. Only rank 0 makes a
sink. `WANDB_MODE=offline` writes everything under RUN/wandb for a later `wandb sync`, with no network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .config import Config, ConfigError, to_dict
from .runs import TrainingError, atomic_write_json

ID_FILE = "wandb.json"
_EVAL = re.compile(r"^([a-z0-9]+)_(acc|loss)$")


def check_installed() -> None:
    """Raise ConfigError with the install command when wandb is missing (before any data or model work)."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb_project is set but wandb is not installed; run `pip install smallvit[wandb]` "
                          "(or `pip install wandb`), or leave train.wandb_project empty")


def metric_name(key: str) -> str:
    """W&B's section/name for a record key: `X_acc` -> `X/acc`, `X_loss` -> `X/loss`, the rest unchanged."""
    m = _EVAL.match(key)
    return f"{m[1]}/{m[2]}" if m else key


class WandbSink:
    """Sends Records' entries to one W&B run; the run id lives in RUN/wandb.json so a resume continues it."""

    def __init__(self, cfg: Config, out_dir: Path):
        check_installed()
        import wandb

        t = cfg.train
        out_dir = Path(out_dir)
        id_file = out_dir / ID_FILE
        run_id = json.loads(id_file.read_text())["id"] if id_file.is_file() else None  # None: W&B makes one
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=t.wandb_project, entity=t.wandb_entity or None, name=t.wandb_name or str(out_dir),
                tags=[s.strip() for s in t.wandb_tags.split(",") if s.strip()] or None, config=to_dict(cfg),
                dir=str(out_dir), id=run_id, resume="allow" if run_id else None, job_type="train",
            )
        except Exception as e:  # noqa: BLE001  (login, network, permissions: one line instead of a traceback)
            raise TrainingError(f"W&B could not start a run ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                f"check `wandb login` and the network, or set WANDB_MODE=offline") from None
        if run_id is None:
            atomic_write_json(id_file, {"id": self.run.id, "project": t.wandb_project,
                                        "entity": t.wandb_entity or None})

    def log(self, step: int, values: dict) -> None:
        numbers = {metric_name(k): v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers and step >= self.run.step:  # a resumed run repeats steps W&B already holds: those are kept
            self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()
