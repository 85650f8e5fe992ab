"""Studies: a named list of ablations x seeds, one run folder each, restartable at any time.

Layout: <root>/<study>/<ablation>/seed<k>/ (a normal run folder) plus <root>/<study>/study.json.
A run folder is reused only if its config.json is the config the study would train now (outside the keys that
cannot change a result, runs.RESUME_FREE_KEYS): then a run with result.json is skipped and one with only a
checkpoint is resumed. A study whose folders hold other settings is refused, or, with `new_folders`, trained in
<root>/<study>@<hash of the settings>/ beside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import Config, ConfigError, apply_overrides
from .experiments import STUDIES, make_config
from .launchers import Study, for_study
from .lifecycle import run_state
from .runs import atomic_write_json, config_changes, describe_changes, read_json
from .slurm import SLURM_DIR, format_status, read_jobs, run_status, squeue_states


def scaled(cfg: Config, budget: float) -> Config:
    """The same recipe at `budget` x the epochs (warm-up scaled alike, kept shorter than the run)."""
    if budget == 1.0:
        return cfg
    if budget <= 0:
        raise ConfigError(f"--budget must be positive, got {budget}")
    epochs = max(1, round(cfg.train.epochs * budget))
    warmup = min(round(cfg.optim.warmup_epochs * budget), epochs - 1)
    evals = max(1, min(cfg.train.eval_every_epochs, epochs)) if cfg.train.eval_every_epochs else 0
    return apply_overrides(cfg, {"train.epochs": epochs, "optim.warmup_epochs": warmup,
                                  "train.eval_every_epochs": evals})


def plan(study: str, seeds: int, preset: str = "baseline", budget: float = 1.0,
         overrides: dict | None = None) -> list[tuple[str, int, Config]]:
    """(ablation, seed, config) for every run of the study."""
    if study not in STUDIES:
        raise ConfigError(f"unknown study {study!r}; choose from: {', '.join(STUDIES)}")
    runs = []
    for name in STUDIES[study]:
        cfg = scaled(make_config(preset, overrides, ablation=name), budget)
        for seed in range(seeds):
            runs.append((name, seed, apply_overrides(cfg, {"train.seed": seed})))
    return runs


def reused_with_other_settings(base: Path, runs) -> list[tuple[Path, dict]]:
    """(folder, {key: (its value, the study's value)}) for every run folder whose config.json is another
    experiment than the run the study would train there now."""
    stale = []
    for name, seed, cfg in runs:
        saved = base / name / f"seed{seed}" / "config.json"
        if saved.is_file():
            changes = config_changes(cfg, read_json(saved), saved)
            if changes:
                stale.append((saved.parent, changes))
    return stale


def settings_hash(runs) -> str:
    """A short name for a study's settings: the hash of every run's config (so equal settings, equal folder)."""
    from .config import to_dict

    text = json.dumps([to_dict(cfg) for _, _, cfg in runs], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def ablate(study: str, seeds: int = 1, preset: str = "baseline", budget: float = 1.0, root: str | Path = "runs/studies",
           overrides: dict | None = None, devices: list[str] | None = None, cli_overrides: list[str] | None = None,
           data_dir: str | None = None, launcher: str = "local", options=None, wait: bool = False,
           new_folders: bool = False) -> list[dict]:
    """Run (or continue) every run of a study through a launcher (launchers.py); return one status row per run.

    local: one device, runs in sequence in this process; several --devices: independent runs side by side, one
    per device, each in its own `smallvit train` process. slurm (`options`: slurm.Resources): one SLURM job per
    run, as one submitit job array in <study>/slurm/ (returns after submitting unless `wait`).
    """
    runs = plan(study, seeds, preset, budget, overrides)
    base = Path(root) / study
    if new_folders:
        base = Path(root) / f"{study}@{settings_hash(runs)}"
    stale = reused_with_other_settings(base, runs)
    if stale:
        folder, changes = stale[0]
        raise ConfigError(f"{base} holds {len(stale)} run(s) trained with other settings ({folder.relative_to(base)}: "
                          f"{describe_changes(changes)}); its results are not these settings'. Use another --root "
                          f"or study name, or pass --new-folders to train these settings in {base.name}@<hash>/")
    base.mkdir(parents=True, exist_ok=True)
    # Written only now: study.json never claims settings that its runs did not use.
    atomic_write_json(base / "study.json", {"study": study, "ablations": STUDIES[study], "seeds": seeds,
                                            "preset": preset, "budget": budget, "overrides": overrides or {}})
    if new_folders:
        print(f"these settings train in {base}", flush=True)
    todo = []
    rows = []
    for name, seed, cfg in runs:
        folder = base / name / f"seed{seed}"
        state = run_state(folder)
        rows.append({"ablation": name, "seed": seed, "folder": str(folder), "state": state})
        if state != "done":
            todo.append((name, seed, cfg, folder))
    print(f"study {study}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run", flush=True)
    for_study(launcher, devices).study(Study(todo, base, preset, devices, list(cli_overrides or []), data_dir,
                                             options, wait))
    for r in rows:
        r["state"] = run_state(Path(r["folder"]))
    return rows


def status(study: str, root: str | Path = "runs/studies") -> str:
    """The --status table of a study: every run's state (SLURM jobs included), job id and last log line."""
    base = Path(root) / study
    if not (base / "study.json").is_file():
        raise ConfigError(f"no study in {base} (no study.json); start it with `smallvit ablate {study}`")
    info = json.loads((base / "study.json").read_text())
    jobs = read_jobs(base / SLURM_DIR)
    queue = squeue_states([j["job_id"] for j in jobs.values()])
    rows = [run_status(f"{name}/seed{seed}", base / name / f"seed{seed}", run_state(base / name / f"seed{seed}"),
                       base / SLURM_DIR, jobs, queue) for name in info["ablations"] for seed in range(info["seeds"])]
    return format_status(rows, f"study {study} ({base})")
