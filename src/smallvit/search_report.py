"""The report of a design-space search (search.py): search.md, trials.csv and pareto-{params,flops,seconds}.png in
the study folder, from the Optuna study and the run folders only. docs/search.md."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .config import ConfigError
from .report import mean_std
from .runs import read_json
from .search import FINAL, load_study, read_settings


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) no other point beats in both (lower cost, higher accuracy)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def report(folder: str | Path) -> dict:
    """search.md, trials.csv and pareto-{params,flops,seconds}.png in the study folder: every trial, the Pareto
    fronts, each knob's fANOVA importance and the retrained top-k against the baseline."""
    folder = Path(folder)
    s = read_settings(folder)
    study = load_study(folder, s, s.seed)
    trials = study.get_trials(deepcopy=False)
    if not trials:
        raise ConfigError(f"no trials in {folder} yet")
    knobs = list(s.space)
    rows = []
    for t in trials:
        a = t.user_attrs
        rows.append({"trial": f"{t.number} (preset)" if a.get("preset") else t.number,
                     "state": t.state.name.lower(), "params": a.get("params"), "flops": a.get("flops"),
                     "seconds": round(a["seconds"], 1) if "seconds" in a else None,
                     "val_acc": a.get("val_acc"), **{k: t.params.get(k) for k in knobs},
                     "values": ",".join(f"{v:.4g}" for v in t.values) if t.values else "",
                     "reason": a.get("prune_reason") or a.get("error") or ""})
    with open(folder / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    states = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    objectives = ", ".join(f"{n} ({d[:3]})" for n, d in s.objectives)
    md = [f"# Search {s.name}", "",
          f"Preset `{s.preset}`, overrides `{json.dumps(s.overrides)}`, objectives {objectives}, pruner {s.pruner}, "
          f"constraints: params <= {s.max_params or '-'}, FLOPs <= {s.max_flops or '-'}. "
          f"{len(rows)} trials: " + ", ".join(f"{n} {k}" for k, n in states.items()) + ".", "",
          f"Trials are scored on the validation split only ({s.base().data.val_images} training images held out); "
          f"the test set is seen once, by the retrained runs below.", "", "## Trials", ""]
    cols = list(rows[0])
    md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in cols) + " |" for r in rows]
    # Pareto fronts: validation accuracy against each cost, over the trials that finished training
    done = [r for r in rows if r["state"] == "complete" and r["val_acc"] is not None]
    plots = {}
    md += ["", "## Pareto fronts (validation accuracy against cost)", ""]
    for cost in ("params", "flops", "seconds"):
        used = [r for r in done if r[cost] is not None]
        pts = [(r[cost], r["val_acc"]) for r in used]
        front = [used[i]["trial"] for i in pareto(pts)] if pts else []
        path = folder / f"pareto-{cost}.png"
        preset = next((i for i, r in enumerate(used) if str(r["trial"]).endswith("(preset)")), None)
        plot_front(pts, pareto(pts) if pts else [], cost, path, preset)
        plots[cost] = str(path)
        md.append(f"- {cost}: trials {', '.join(map(str, front)) or 'none yet'} ([plot]({path.name}))")
    md += ["", "## Importance (fANOVA, of the first objective)", ""]
    importances = {}
    try:
        from optuna.importance import FanovaImportanceEvaluator, get_param_importances

        importances = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                            target=lambda t: t.values[0])
        md += ["| knob | importance |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    except (ValueError, RuntimeError) as e:
        md.append(f"Not computed: {str(e).splitlines()[0]}")
    md += ["", "## Retrained on the full training set, scored once on the test set", ""]
    final_rows = final_table(folder)
    if final_rows:
        md += ["| run | seeds | test acc (%) | Δ vs baseline | params | passes | wall s | knobs |",
               "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['label']} | {r['n']} | {r['mean']:.2f} ± {r['std']:.2f} | {r['delta']} | {r['params']} | "
               f"{r['passes']:.2f} | {r['seconds']:.0f} | {r['knobs']} |" for r in final_rows]
    else:
        md.append(f"Not yet: `smallvit search {s.name} --finalize --retrain-top 3 --seeds 3`.")
    text = "\n".join(md) + "\n"
    (folder / "search.md").write_text(text)
    return {"markdown": str(folder / "search.md"), "csv": str(folder / "trials.csv"), "plots": plots,
            "importance": importances, "final": final_rows, "table": text}


def final_table(folder: Path) -> list[dict]:
    """The retrained runs of final/: test accuracy mean and std over seeds per label, and Δ against the baseline."""
    path = folder / FINAL / "final.json"
    if not path.is_file():
        return []
    info = read_json(path)
    rows = []
    for label, params in info["entries"].items():
        recs = [read_json(p) for p in sorted((folder / FINAL / label).glob("seed*/result.json"))]
        if not recs:
            continue
        accs = [r["final_test_acc"] for r in recs]
        m, sd = mean_std(accs)
        rows.append({"label": label, "n": len(accs), "mean": m, "std": 0.0 if math.isnan(sd) else sd,
                     "params": recs[0].get("params"), "knobs": json.dumps(params), "accs": accs,
                     "passes": sum(r.get("epochs_done", 0) for r in recs) / len(recs),
                     "seconds": sum(r.get("wall_seconds", 0) for r in recs) / len(recs)})
    base = next((r["mean"] for r in rows if r["label"] == "baseline"), None)
    for r in rows:
        r["delta"] = "" if base is None or r["label"] == "baseline" else f"{r['mean'] - base:+.2f}"
    return rows


def plot_front(points: list[tuple[float, float]], front: list[int], cost: str, path: Path,
               preset: int | None = None) -> None:
    """The trials (grey), their Pareto front (red) and the preset's own trial (`preset`: its index in `points`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, c="0.6", label="trials")
        f = sorted((points[i] for i in front), key=lambda p: p[0])
        ax.step([p[0] for p in f], [p[1] for p in f], where="post", c="C3", marker="o", label="Pareto front")
        if preset is not None:
            ax.scatter([points[preset][0]], [points[preset][1]], s=60, c="C0", marker="*", zorder=3,
                       label="the preset (--enqueue-preset)")
        ax.legend()
    ax.set_xlabel({"params": "parameters", "flops": "FLOPs per image", "seconds": "wall seconds"}[cost])
    ax.set_ylabel("validation accuracy (%)")
    if cost != "seconds" and points and min(p[0] for p in points) > 0:
        ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
