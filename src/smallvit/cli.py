"""The `smallvit` command: train, eval, info, ablations."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ABLATIONS, PAPER_RESULTS, PRESETS, ConfigError, diff, make_config, parse_overrides, to_dict


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="baseline", choices=sorted(PRESETS), help="scale of the run")
    p.add_argument("--ablation", default="baseline", help="named ablation (see `smallvit ablations`)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. model.depth=9")
    p.add_argument("--data-dir", default=None, help="dataset root (default: $SMALLVIT_DATA or ./data)")


def _build(args):
    overrides = parse_overrides(args.set)
    if args.data_dir:
        overrides.setdefault("data.data_dir", args.data_dir)
    return make_config(args.preset, overrides, ablation=args.ablation)


def cmd_train(args) -> int:
    from .train import default_run_dir, train

    cfg = _build(args)
    out = Path(args.out) if args.out else default_run_dir(cfg)
    print(f"run folder: {out}")
    result = train(cfg, out, resume=args.resume)
    if result["status"] == "interrupted":
        print(f"interrupted at step {result['step']}; resume with the same command plus --resume")
        return 130
    ips = result["train_img_per_s"]
    print(f"test accuracy {result['final_test_acc']:.2f}% (best {result['best_test_acc']:.2f}%) after "
          f"{result['epochs_done']:.2f} epochs, {result['wall_seconds']:.0f} s wall, "
          f"{ips:.0f} img/s" if ips else "")
    print(json.dumps({k: result[k] for k in ("final_test_acc", "best_test_acc", "step", "wall_seconds")}))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_run

    report = evaluate_run(args.run, data_dir=args.data_dir, tta_flip=args.tta_flip, out_dir=args.out)
    print(json.dumps(report, indent=2))
    return 0


def cmd_info(args) -> int:
    from .model import build_model, count_params, flops_per_image

    cfg = _build(args)
    model = build_model(cfg.model)
    info = {
        "preset": args.preset,
        "ablation": args.ablation,
        "diff_from_baseline": diff(cfg),
        "params": count_params(model),
        "gflops_per_image_forward": round(flops_per_image(model) / 1e9, 4),
        "gflops_per_image_train": round(3 * flops_per_image(model) / 1e9, 4),
    }
    if args.config:
        info["config"] = to_dict(cfg)
    print(json.dumps(info, indent=2))
    return 0


def cmd_ablations(args) -> int:
    from .model import build_model, count_params

    rows = []
    for name, d in ABLATIONS.items():
        params = count_params(build_model(make_config("baseline", ablation=name).model)) if args.params else None
        rows.append((name, d, params))
    for name, d, params in rows:
        paper = f"  paper {PAPER_RESULTS[name]:.2f}%" if name in PAPER_RESULTS else ""
        extra = f"  params {params:,}" if params is not None else ""
        print(f"{name:16s} {json.dumps(d)}{extra}{paper}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smallvit", description="Small Vision Transformers on small datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model")
    _config_args(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/<diff-from-baseline>/seed<N>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of a saved run or checkpoint")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tta-flip", action="store_true", help="also report accuracy with horizontal-flip TTA")
    p.add_argument("--out", default=None, help="folder for the confusion matrix PNG (default: the run folder)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("info", help="resolved config, parameter count and FLOPs")
    _config_args(p)
    p.add_argument("--config", action="store_true", help="also print the full resolved config")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("ablations", help="list the named ablations and their diffs from the baseline")
    p.add_argument("--params", action="store_true", help="also count each ablation's parameters")
    p.set_defaults(fn=cmd_ablations)

    args = parser.parse_args(argv)
    from .data import DataError
    from .runs import CheckpointError
    from .train import TrainingError

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"smallvit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
