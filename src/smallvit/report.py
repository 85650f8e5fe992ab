"""Reports generated from run records: Markdown + CSV table, accuracy bars and curves (PNG).

Input: a study folder (<root>/<study>/<ablation>/seed<k>/) or any folder of run folders. Nothing is typed by hand:
every number comes from result.json / metrics.jsonl / config.json of the runs.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .config import ConfigError
from .experiments import ABLATIONS, PAPER_RESULTS
from .robustness import read_suite
from .runs import RESUME_FREE_KEYS, read_metrics


def collect(folder: Path) -> dict[str, list[dict]]:
    """{ablation: [run records]} from every result.json below `folder` (group = the run folder's parent name)."""
    groups: dict[str, list[dict]] = {}
    for res in sorted(Path(folder).rglob("result.json")):
        run = res.parent
        rec = json.loads(res.read_text())
        rec["run_dir"] = str(run)
        cfg_file = run / "config.json"
        rec["config"] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None  # what the run trained
        rec["seed"] = rec["config"]["train"]["seed"] if rec["config"] else None
        rec["suite"] = read_suite(run)  # eval-suite.json: calibration, corruptions ({} when not evaluated)
        name = run.parent.name if run.name.startswith("seed") else run.name
        groups.setdefault(name, []).append(rec)
    return groups


def mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan"))


def significance(a: list[float], b: list[float]) -> str:
    """Welch's t-test of a against b; an honest hint, not a verdict (few seeds, no multiple-test correction)."""
    if len(a) < 2 or len(b) < 2:
        return "n<2: untested"
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if se == 0:
        return "no variance"
    t = (ma - mb) / se
    try:
        from scipy import stats

        p = stats.ttest_ind(a, b, equal_var=False).pvalue
        return f"p={p:.2g}" + (" *" if p < 0.05 else "")
    except ImportError:  # scipy is optional: report the t statistic alone
        return f"t={t:.1f}"


def table_rows(groups: dict[str, list[dict]], baseline: str = "baseline") -> list[dict]:
    base = [r["final_test_acc"] for r in groups.get(baseline, [])]
    order = [n for n in ABLATIONS if n in groups] + sorted(n for n in groups if n not in ABLATIONS)
    rows = []
    for name in order:
        recs = groups[name]
        accs = [r["final_test_acc"] for r in recs]
        m, s = mean_std(accs)
        delta = m - mean_std(base)[0] if base and name != baseline else None
        paper = PAPER_RESULTS.get(name)
        paper_delta = paper - PAPER_RESULTS["baseline"] if paper is not None and name != baseline else None
        ips = [r["train_img_per_s"] for r in recs if r.get("train_img_per_s")]
        vals = [r["final_val_acc"] for r in recs if r.get("final_val_acc") is not None]
        vm, vs = mean_std(vals) if vals else (None, None)
        # the evaluation suite's, over the seeds evaluated with it: ECE (in %) and mean corruption accuracy
        eces = [100 * r["suite"]["ece"] for r in recs if r.get("suite", {}).get("ece") is not None]
        mcas = [r["suite"]["corruption_acc"] for r in recs if r.get("suite", {}).get("corruption_acc") is not None]
        em, es = mean_std(eces) if eces else (None, None)
        cm, cs = mean_std(mcas) if mcas else (None, None)
        rows.append({
            "ablation": name,
            "diff": json.dumps(_label(recs, groups.get(baseline), name)),
            "n": len(accs),
            "acc_mean": m,
            "acc_std": s,
            "val_mean": vm,  # final validation accuracy (data.val_images > 0): where the recipe was chosen
            "val_std": vs,
            "ece_mean": em,
            "ece_std": es,
            "corruption_acc_mean": cm,
            "corruption_acc_std": cs,
            "delta": delta,
            "significance": significance(accs, base) if delta is not None else "",
            "paper_acc": paper,
            "paper_delta": paper_delta,
            "params": recs[0]["params"],
            "gflops": recs[0]["flops_per_image"] / 1e9,
            "img_per_s": sum(ips) / len(ips) if ips else None,
            "wall_min": sum(r["wall_seconds"] for r in recs) / len(recs) / 60,
            "device": recs[0]["device"],
            "seeds": sorted(r["seed"] for r in recs if r.get("seed") is not None),
        })
    return rows


def _experiment(config: dict | None) -> dict:
    """A run's config without the keys that cannot change its result (and its seed): what its group shares."""
    flat = {f"{s}.{k}": v for s, sub in (config or {}).items() for k, v in sub.items()}
    return {k: v for k, v in flat.items() if k not in RESUME_FREE_KEYS and k != "train.seed"}


def _label(recs: list[dict], base: list[dict] | None, name: str) -> dict:
    """The row label, read from the runs' own config.json: the keys where this group differs from the baseline
    group (or, without one, from the registry's ablation). A group whose runs trained different settings (apart
    from the seed) is refused: its mean would mix two experiments."""
    mine = [_experiment(r.get("config")) for r in recs if r.get("config")]
    odd = next((c for c in mine if c != mine[0]), None)
    if odd is not None:
        keys = sorted(k for k in set(mine[0]) | set(odd) if mine[0].get(k) != odd.get(k))
        raise ConfigError(f"the runs of {name!r} were trained with different settings ({', '.join(keys[:4])}); "
                          f"a report would mix two experiments: move the odd runs to another folder")
    ref = _experiment(base[0].get("config")) if base and base[0].get("config") else None
    if not mine or ref is None:
        return ABLATIONS.get(name, recs[0].get("overrides", {}))
    return {k: v for k, v in mine[0].items() if ref.get(k) != v}


def _fmt(v, spec):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(rows: list[dict]) -> str:
    with_val = any(r["val_mean"] is not None for r in rows)
    extra = [(k, title) for k, title in (("ece", "ECE % (mean ± std)"), ("corruption_acc", "corruption acc %"))
             if any(r.get(f"{k}_mean") is not None for r in rows)]  # columns of the evaluation suite, when run
    head = ("| ablation | diff from baseline | n | " + ("val acc % (mean ± std) | " if with_val else "")
            + "test acc % (mean ± std) | " + "".join(f"{t} | " for _, t in extra) + "Δ vs baseline | significance | "
            "paper % | paper Δ | params | GFLOP/img | img/s | wall min/run | device |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = f"{r['acc_mean']:.2f} ± {_fmt(r['acc_std'], '.2f') or '–'}"
        if with_val:
            val = f"{r['val_mean']:.2f} ± {_fmt(r['val_std'], '.2f') or '–'}" if r["val_mean"] is not None else ""
            acc = f"{val} | {acc}"
        for k, _ in extra:
            m = r.get(f"{k}_mean")
            acc += f" | {m:.2f} ± {_fmt(r[f'{k}_std'], '.2f') or '–'}" if m is not None else " | "
        lines.append(
            f"| {r['ablation']} | `{r['diff']}` | {r['n']} | {acc} | {_fmt(r['delta'], '+.2f')} | {r['significance']} "
            f"| {_fmt(r['paper_acc'], '.2f')} | {_fmt(r['paper_delta'], '+.2f')} | {r['params']:,} | "
            f"{r['gflops']:.3f} | {_fmt(r['img_per_s'], '.0f')} | {r['wall_min']:.1f} | {r['device']} |")
    return "\n".join(lines) + "\n"


def plot_bars(rows: list[dict], path: Path) -> None:
    """Left: test accuracy (mean ± std) with the paper's number as a marker. Right: change against the baseline,
    ours and the paper's side by side; the change is what stays comparable when the scale differs from the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["ablation"] for r in rows]
    x = list(range(len(rows)))
    std = [0 if math.isnan(r["acc_std"]) else r["acc_std"] for r in rows]
    base_std = std[names.index("baseline")] if "baseline" in names else 0.0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(rows)), 4.2), dpi=100)
    a1.bar(x, [r["acc_mean"] for r in rows], 0.6, yerr=std, capsize=3, label="ours (mean ± std)")
    paper = [(i, r["paper_acc"]) for i, r in zip(x, rows) if r["paper_acc"] is not None]
    if paper:
        a1.scatter([p[0] for p in paper], [p[1] for p in paper], marker="_", s=300, color="black", zorder=3,
                   label="paper (full recipe)")
    vals = [r["acc_mean"] for r in rows] + [p[1] for p in paper]
    a1.set_ylim(max(0, min(vals) - 5), min(100, max(vals) + 3))
    a1.set_ylabel("test accuracy (%)")
    a1.legend(loc="center right", fontsize=8)
    d = [(i, r["delta"], math.hypot(s_, base_std)) for i, r, s_ in zip(x, rows, std) if r["delta"] is not None]
    a2.bar([i - 0.2 for i, _, _ in d], [v for _, v, _ in d], 0.4, yerr=[e for _, _, e in d], capsize=3,
           label="ours")
    pd = [(i, r["paper_delta"]) for i, r in zip(x, rows) if r["paper_delta"] is not None]
    if pd:
        a2.bar([i + 0.2 for i, _ in pd], [v for _, v in pd], 0.4, color="tab:gray", label="paper")
    a2.axhline(0, color="black", lw=0.8)
    a2.set_ylabel("Δ test accuracy vs baseline (points)")
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.set_xticks(x, names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(groups: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    key = "val_acc" if any(r.get("eval_split") == "val" for recs in groups.values() for r in recs) else "test_acc"
    for name, recs in groups.items():
        curves = [[(m["epoch"], m[key]) for m in read_metrics(Path(r["run_dir"])) if key in m]
                  for r in recs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        ys = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
        ax.plot(xs, ys, marker=".", label=f"{name} (n={len(curves)})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{'validation' if key == 'val_acc' else 'test'} accuracy (%), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(folder: str | Path, out: str | Path | None = None, expected_seeds: int | None = None) -> dict:
    """Write report.md, report.csv, accuracy.png and curves.png for a study folder; return their paths."""
    folder = Path(folder)
    groups = collect(folder)
    if not groups:
        raise FileNotFoundError(f"no finished runs (result.json) under {folder}")
    out = Path(out) if out else folder
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(groups)
    study = json.loads((folder / "study.json").read_text()) if (folder / "study.json").is_file() else {}
    want = expected_seeds or study.get("seeds")
    md = markdown(rows)
    missing = [f"{r['ablation']} ({r['n']}/{want})" for r in rows if want and r["n"] < want]
    missing += [f"{a} (0/{want})" for a in study.get("ablations", []) if a not in groups]
    if missing:
        md += f"\nMissing seeds: {', '.join(missing)}.\n"
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "report.md").write_text(md)
    plot_bars(rows, out / "accuracy.png")
    plot_curves(groups, out / "curves.png")
    return {"markdown": str(out / "report.md"), "csv": str(out / "report.csv"), "bars": str(out / "accuracy.png"),
            "curves": str(out / "curves.png"), "rows": rows, "missing": missing, "table": md}
