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
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import Config, ConfigError, apply_overrides
from .experiments import STUDIES, make_config
from .runs import CHECKPOINT, atomic_write_json, config_changes, describe_changes, read_json


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


def run_state(folder: Path) -> str:
    if (folder / "result.json").is_file():
        return "done"
    if (folder / CHECKPOINT).is_file():
        return "partial"
    return "new"


def ablate(study: str, seeds: int = 1, preset: str = "baseline", budget: float = 1.0, root: str | Path = "runs/studies",
           overrides: dict | None = None, devices: list[str] | None = None, cli_overrides: list[str] | None = None,
           data_dir: str | None = None, slurm=None, wait: bool = False, new_folders: bool = False) -> list[dict]:
    """Run (or continue) every run of a study; return one status row per run.

    One device: runs in sequence in this process. Several devices: independent runs side by side, one per
    device, each in its own `smallvit train` process. `slurm` (slurm.Resources): one SLURM job per run, as one
    submitit job array in <study>/slurm/ (returns after submitting unless `wait`).
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
    if slurm is not None:
        from .slurm import SLURM_DIR, submit_study

        submit_study([(f"{name}/seed{seed}", cfg, folder) for name, seed, cfg, folder in todo], base / SLURM_DIR,
                     slurm, wait)
    elif not devices or len(devices) <= 1:
        from .train import train

        for name, seed, cfg, folder in todo:
            if devices:
                cfg = apply_overrides(cfg, {"train.device": devices[0]})
            print(f"[{name} seed {seed}] {'resuming' if run_state(folder) == 'partial' else 'starting'} {folder}",
                  flush=True)
            if train(cfg, folder, resume=True)["status"] == "interrupted":  # SIGINT/SIGTERM stops the study too
                print(f"interrupted during {folder}; run the same command again to continue", flush=True)
                break
    else:
        def launch(job, device):
            name, seed, _, folder = job
            cmd = [sys.executable, "-m", "smallvit.cli", "train", "--preset", preset, f"--ablation={name}",
                   "--out", str(folder), "--resume", "--set", f"train.seed={seed}", f"train.device={device}",
                   "train.progress=false", *(cli_overrides or []), *_budget_overrides(runs, name)]
            if data_dir:
                cmd += ["--data-dir", data_dir]
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "stdout.log", "a") as log:
                return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode

        queue = list(todo)
        with ThreadPoolExecutor(len(devices)) as pool:
            def worker(device):
                codes = []
                while queue:
                    codes.append(launch(queue.pop(0), device))
                    time.sleep(0.1)
                return codes

            failed = sum(c != 0 for codes in pool.map(worker, devices) for c in codes)
        if failed:
            print(f"{failed} runs failed; see stdout.log in their folders, then run the same command again")
    for r in rows:
        r["state"] = run_state(Path(r["folder"]))
    return rows


def _budget_overrides(runs, name) -> list[str]:
    cfg = next(c for n, _, c in runs if n == name)
    return [f"train.epochs={cfg.train.epochs}", f"optim.warmup_epochs={cfg.optim.warmup_epochs}",
            f"train.eval_every_epochs={cfg.train.eval_every_epochs}"]


def status(study: str, root: str | Path = "runs/studies") -> str:
    """The --status table of a study: every run's state (SLURM jobs included), job id and last log line."""
    from .slurm import SLURM_DIR, format_status, read_jobs, run_status, squeue_states

    base = Path(root) / study
    if not (base / "study.json").is_file():
        raise ConfigError(f"no study in {base} (no study.json); start it with `smallvit ablate {study}`")
    info = json.loads((base / "study.json").read_text())
    jobs = read_jobs(base / SLURM_DIR)
    queue = squeue_states([j["job_id"] for j in jobs.values()])
    rows = [run_status(f"{name}/seed{seed}", base / name / f"seed{seed}", run_state(base / name / f"seed{seed}"),
                       base / SLURM_DIR, jobs, queue) for name in info["ablations"] for seed in range(info["seeds"])]
    return format_status(rows, f"study {study} ({base})")
