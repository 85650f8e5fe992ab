"""The CPU speed run: the `speedrun` preset's test accuracy over seeds, and what each of its ingredients adds.

Two parts, each run a `smallvit train` process in its own folder (restartable: a finished run is read, not rerun):

1. ablations (`--ablation-seeds`, default 1): the recipe and the recipe minus each ingredient (the `speedrun` study,
   `smallvit ablations` lists the "-<ingredient>" entries) on the validation split the recipe was chosen on
   (data.val_images=5000 held out of the training images, an evaluation after every epoch). Each row gives the
   final val accuracy, its difference to the recipe in points, the wall seconds and their difference, and the wall
   time at which the val accuracy first reached 60 / 70 / 75 % (from metrics.jsonl; an evaluation costs about 3 s,
   included).
2. final (`--seeds`, default 3): the recipe exactly as ./run.sh runs it (all 50,000 training images, the test set
   scored once, at the end), mean +- std of the test accuracy, the run's own wall time (result.json: data loading,
   training and the evaluation) and the process's (with Python's start-up and imports).

With the preset's time budget (train.time_budget_s) every run gets the same wall time and its own number of passes
(a cheaper step makes more): the tables give the passes each made. --plot writes the accuracy against wall time of
every run from its records (metrics.jsonl): each ablation's validation accuracy at each evaluation, and the recipe's
test accuracy, scored once per seed at the end, as points.

    python benchmarks/cpu_speedrun.py --data-dir ../shared/data --out benchmarks/results/speedrun_cpu.md \
        --plot benchmarks/results/speedrun_cpu.png
    python benchmarks/cpu_speedrun.py --part final --seeds 3 --root runs/speedrun

Timings are only meaningful on a quiet machine: run nothing else meanwhile (2 cores are 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs from a checkout without pip-installing smallvit

from smallvit.experiments import STUDIES  # noqa: E402
from smallvit.runs import environment, read_metrics  # noqa: E402

THRESHOLDS = (60, 70, 75)


def run(folder: Path, ablation: str, seed: int, sets: list[str], data_dir: str | None) -> dict:
    """One `smallvit train --preset speedrun` process (skipped when the folder holds a finished run)."""
    done = folder / "result.json"
    process_seconds = None
    if not done.is_file():
        cmd = [sys.executable, "-m", "smallvit.cli", "train", "--preset", "speedrun", f"--ablation={ablation}",
               "--out", str(folder), "--resume", "--set", f"train.seed={seed}", "train.progress=false", *sets]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        with open(folder / "stdout.log", "a") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        process_seconds = time.perf_counter() - t
        (folder / "process_seconds.txt").write_text(f"{process_seconds:.2f}\n")
    elif (folder / "process_seconds.txt").is_file():
        process_seconds = float((folder / "process_seconds.txt").read_text())
    res = json.loads(done.read_text())
    evals = [m for m in read_metrics(folder) if "val_acc" in m]
    reached = {x: next((m["wall_seconds"] for m in evals if m["val_acc"] >= x), None) for x in THRESHOLDS}
    return {"ablation": ablation, "seed": seed, "test": res["final_test_acc"], "val": res.get("final_val_acc"),
            "wall": res["wall_seconds"], "train": res["train_seconds"], "ips": res["train_img_per_s"],
            "passes": res["epochs_done"], "process": process_seconds, "reached": reached,
            "curve": [(m["wall_seconds"], m["val_acc"]) for m in evals]}


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def _pm(xs: list[float], fmt: str = ".2f") -> str:
    m, s = mean_std(xs)
    return f"{m:{fmt}}" + (f" ± {s:{fmt}}" if len(xs) > 1 else "")


def ablation_table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["ablation"], []).append(r)
    ref_val = mean_std([r["val"] for r in by["baseline"]])[0]
    ref_wall = mean_std([r["wall"] for r in by["baseline"]])[0]
    head = ("| run | seeds | val acc % | Δ points | passes | wall s | Δ s | img/s | "
            + " | ".join(f"to {x}% (s)" for x in THRESHOLDS) + " |")
    lines = [head, "|" + "---|" * (8 + len(THRESHOLDS))]
    for name, rs in by.items():
        val, wall = mean_std([r["val"] for r in rs])[0], mean_std([r["wall"] for r in rs])[0]
        label = "speedrun (the recipe)" if name == "baseline" else f"{name} (without it)"
        dv = "—" if name == "baseline" else f"{val - ref_val:+.2f}"
        dw = "—" if name == "baseline" else f"{wall - ref_wall:+.0f}"
        reach = []
        for x in THRESHOLDS:
            ts = [r["reached"][x] for r in rs]
            reach.append("not reached" if any(t is None for t in ts) else f"{sum(ts) / len(ts):.0f}")
        passes = mean_std([r["passes"] for r in rs])[0]
        lines.append(f"| {label} | {len(rs)} | {_pm([r['val'] for r in rs])} | {dv} | {passes:.2f} | {wall:.0f} "
                     f"| {dw} | {mean_std([r['ips'] for r in rs])[0]:.0f} | " + " | ".join(reach) + " |")
    return "\n".join(lines)


def final_table(rows: list[dict]) -> str:
    lines = ["| seed | test acc % | passes | wall s (result.json) | process s | train img/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        proc = f"{r['process']:.0f}" if r["process"] is not None else "—"
        lines.append(f"| {r['seed']} | {r['test']:.2f} | {r['passes']:.2f} | {r['wall']:.0f} | {proc} "
                     f"| {r['ips']:.0f} |")
    procs = [r["process"] for r in rows if r["process"] is not None]
    lines.append(f"| **mean ± std** | **{_pm([r['test'] for r in rows])}** | {_pm([r['passes'] for r in rows])} "
                 f"| {_pm([r['wall'] for r in rows], '.0f')} | {_pm(procs, '.0f') if procs else '—'} "
                 f"| {mean_std([r['ips'] for r in rows])[0]:.0f} |")
    return "\n".join(lines)


def plot(ablation_rows: list[dict], final_rows: list[dict], path: str) -> None:
    """Accuracy against wall time from the runs' records: a line per ablation run (validation accuracy at each
    evaluation), a point per final seed (test accuracy, scored once, at the end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ablation_rows:
        label = "recipe" if r["ablation"] == "baseline" else r["ablation"]
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker=".", label=f"{label} (val, seed {r['seed']}, {r['passes']:.1f} passes)")
    if final_rows:
        ax.scatter([r["wall"] for r in final_rows], [r["test"] for r in final_rows], color="black", marker="*", s=80,
                   zorder=3, label="recipe, test set (one look per seed)")
    ax.axvline(600, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("wall seconds since the command started")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(30, 85)
    ax.set_title("CPU speed run: accuracy against wall time (2 cores)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "ablations", "final"], default="all")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the final recipe (test set)")
    p.add_argument("--only-seeds", default=None, help="run only these final seeds now, e.g. 1,2")
    p.add_argument("--ablation-seeds", type=int, default=1, help="seeds of each ablation row (val split)")
    p.add_argument("--ablations", default=None,
                   help="only these, comma-separated, e.g. --ablations=baseline,-gap (default: the speedrun study)")
    p.add_argument("--val-images", type=int, default=5000)
    p.add_argument("--root", default="runs/speedrun", help="run folders go here")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--set", nargs="*", action="extend", default=[], help="overrides for every run")
    p.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    p.add_argument("--plot", default=None, help="also write accuracy against wall time to this PNG")
    args = p.parse_args(argv)
    root = Path(args.root)
    parts, ablation_rows, final_rows = [], [], []
    import torch

    env = environment(torch.device("cpu"))
    header = (f"Measured {datetime.date.today()} on {env.get('cpu', 'a CPU')} ({os.cpu_count()} cores), "
              f"torch {env.get('torch')}, `python benchmarks/cpu_speedrun.py {' '.join(argv or sys.argv[1:])}`.")
    if args.part in ("all", "ablations"):
        names = args.ablations.split(",") if args.ablations else STUDIES["speedrun"]
        sets = [f"data.val_images={args.val_images}", "train.eval_every_epochs=1", *args.set]
        for name in names:
            for seed in range(args.ablation_seeds):
                ablation_rows.append(run(root / "val" / name / f"seed{seed}", name, seed, sets, args.data_dir))
                print(json.dumps({k: v for k, v in ablation_rows[-1].items() if k != "curve"}), flush=True)
        parts.append(f"### What each ingredient adds (validation split of {args.val_images} images)\n\n"
                     + ablation_table(ablation_rows))
    if args.part in ("all", "final"):
        seeds = [int(k) for k in args.only_seeds.split(",")] if args.only_seeds else range(args.seeds)
        final_rows = [run(root / "test" / f"seed{seed}", "baseline", seed, args.set, args.data_dir) for seed in seeds]
        parts.append("### The recipe on the test set (as ./run.sh runs it)\n\n" + final_table(final_rows))
    if args.plot:
        plot(ablation_rows, final_rows, args.plot)
    text = header + "\n\n" + "\n\n".join(parts) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
