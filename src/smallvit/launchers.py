"""Launchers: where a run, or a study's runs, execute. The one place `--launcher` is dispatched (LAUNCHERS).

| name    | `smallvit train`                                  | `smallvit ablate`                                    |
|---------|---------------------------------------------------|------------------------------------------------------|
| local   | in this process (under torchrun: one rank of it)  | one run after another in this process                |
| devices | -                                                 | side by side, one `smallvit train` per --devices item |
| slurm   | one SLURM job of nodes x GPUs processes (slurm.py) | one SLURM job array (slurm.py)                       |

A launcher is an object with `options(args, job_name)` (what it needs from the command line, or None), `train(cfg,
out, args) -> exit code` and `study(study) -> None` (a Study: the unfinished runs of a study). A new launcher is one
module with such an object and one entry in LAUNCHERS; `--launcher` offers every entry that is not chosen by other
options (devices: a --devices list of two or more). submitit stays an optional import: slurm.py imports it only when
a job is submitted or read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import slurm
from .config import Config, apply_overrides
from .lifecycle import run_state


@dataclass(frozen=True)
class Study:
    """A study's unfinished runs and what a launcher needs to start them."""

    todo: list[tuple[str, int, Config, Path]]  # (ablation, seed, config, run folder)
    base: Path  # the study folder
    preset: str = "baseline"
    devices: list[str] | None = None
    cli_overrides: list[str] = field(default_factory=list)  # --set as given (for processes that parse it again)
    data_dir: str | None = None
    options: object = None  # the launcher's own, from its options() (slurm: slurm.Resources)
    wait: bool = False


class Local:
    """This process: `train` runs here (every torchrun rank calls it), a study's runs one after another."""

    def options(self, args, job_name: str):
        return None

    def train(self, cfg: Config, out: Path, args) -> int:
        from .train import train

        main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, one process speaks
        if main_rank:
            print(f"run folder: {out}")
        result = train(cfg, out, resume=args.resume)
        if result["status"] == "interrupted":  # every rank says where it stopped (they agree on the step)
            # One write per line: the ranks share the launcher's stdout, and print's two writes interleave.
            sys.stdout.write(f"interrupted at step {result['step']}; resume with the same command plus --resume\n")
            sys.stdout.flush()
            return 130
        if main_rank:
            ips = result["train_img_per_s"]
            speed = f", {ips:.0f} img/s" if ips else ""
            if result.get("eval_split") == "val":  # the test set seen once, at the end; model selection on val
                seen = (f"(validation {result['final_val_acc']:.2f}%, best {result['best_val_acc']:.2f}% on "
                        f"{result['val_images']} held-out images)")
            else:
                seen = f"(best {result['best_test_acc']:.2f}%)"
            print(f"test accuracy {result['final_test_acc']:.2f}% {seen} after "
                  f"{result['epochs_done']:.2f} epochs, {result['wall_seconds']:.0f} s wall{speed}")
            keys = ("final_test_acc", "best_test_acc", "final_val_acc", "best_val_acc", "step", "wall_seconds")
            print(json.dumps({k: result[k] for k in keys if k in result}))
        return 0

    def study(self, study: Study) -> None:
        from .train import train

        for name, seed, cfg, folder in study.todo:
            if study.devices:
                cfg = apply_overrides(cfg, {"train.device": study.devices[0]})
            print(f"[{name} seed {seed}] {'resuming' if run_state(folder) == 'partial' else 'starting'} {folder}",
                  flush=True)
            if train(cfg, folder, resume=True)["status"] == "interrupted":  # SIGINT/SIGTERM stops the study too
                print(f"interrupted during {folder}; run the same command again to continue", flush=True)
                break


class Devices:
    """Side by side on this machine: one `smallvit train` process per device, each taking the next unfinished run."""

    def options(self, args, job_name: str):
        return None

    def study(self, study: Study) -> None:
        def launch(job, device):
            name, seed, cfg, folder = job
            cmd = [sys.executable, "-m", "smallvit.cli", "train", "--preset", study.preset, f"--ablation={name}",
                   "--out", str(folder), "--resume", "--set", f"train.seed={seed}", f"train.device={device}",
                   "train.progress=false", *study.cli_overrides, f"train.epochs={cfg.train.epochs}",
                   f"optim.warmup_epochs={cfg.optim.warmup_epochs}",  # the study's --budget
                   f"train.eval_every_epochs={cfg.train.eval_every_epochs}"]
            if study.data_dir:
                cmd += ["--data-dir", study.data_dir]
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "stdout.log", "a") as log:
                return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode

        queue = list(study.todo)
        with ThreadPoolExecutor(len(study.devices)) as pool:
            def worker(device):
                codes = []
                while queue:
                    codes.append(launch(queue.pop(0), device))
                    time.sleep(0.1)
                return codes

            failed = sum(c != 0 for codes in pool.map(worker, study.devices) for c in codes)
        if failed:
            print(f"{failed} runs failed; see stdout.log in their folders, then run the same command again")


class Slurm:
    """SLURM through submitit (slurm.py): a run as one job, a study as one job array."""

    def options(self, args, job_name: str):
        return slurm.resources(args, job_name)

    def train(self, cfg: Config, out: Path, args) -> int:
        return slurm.submit_train(cfg, out, args)

    def study(self, study: Study) -> None:
        slurm.submit_study([(f"{name}/seed{seed}", cfg, folder) for name, seed, cfg, folder in study.todo],
                           study.base / slurm.SLURM_DIR, study.options, study.wait)


LAUNCHERS = {"local": Local(), "devices": Devices(), "slurm": Slurm()}
CLI_CHOICES = ("local", "slurm")  # --launcher; devices is chosen by a --devices list of two or more


def for_study(name: str, devices: list[str] | None):
    """The launcher of a study: `name` (--launcher), or devices when local with two or more --devices."""
    if name == "local" and devices and len(devices) > 1:
        return LAUNCHERS["devices"]
    return LAUNCHERS[name]


def add_arguments(p: argparse.ArgumentParser, per_run: bool) -> None:
    """--launcher, then each launcher's own options (SLURM's: per run for a study, per node for `train`)."""
    slurm.add_arguments(p, per_run, launchers=CLI_CHOICES)
