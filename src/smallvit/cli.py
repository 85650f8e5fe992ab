"""The `smallvit` command: train, eval, info, ablations, ablate, search, report, predict, export, profile, inspect,
knn."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, diff, parse_overrides, refuse_unread, to_dict
from .experiments import ABLATIONS, PAPER_RESULTS, PRESETS, make_config


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="baseline", choices=sorted(PRESETS), help="scale of the run")
    p.add_argument("--ablation", default="baseline", help="named ablation (see `smallvit ablations`)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. model.depth=9 (repeatable); an unknown key lists every key and the "
                        "choices of each choice key")
    p.add_argument("--data-dir", default=None, help="dataset root (default: $SMALLVIT_DATA or ./data)")


def _build(args, unread: tuple[str, ...] = ()):
    """The validated config of --preset, --ablation and --set; keys in `unread` (the command's UNREAD_KEYS) are
    refused where --ablation or --set moved them from the preset's values. Nothing is read or written before."""
    overrides = parse_overrides(args.set)
    if args.data_dir:
        overrides.setdefault("data.data_dir", args.data_dir)
    cfg = make_config(args.preset, overrides, ablation=args.ablation)
    # against the preset, not the baseline: a preset may set keys for another command (quick's aug.*), not the user
    refuse_unread(cfg, make_config(args.preset), unread, args.command)
    return cfg


def _check_init_from(cfg, resume: bool) -> None:
    """train.init_from names a file or folder that exists (a resumed run reads its own checkpoint instead)."""
    path = cfg.train.init_from
    if path and not resume and not Path(path).exists():
        raise ConfigError(f"train.init_from={path}: no such file or folder; pass a run folder or a weights file")


def cmd_train(args) -> int:
    from .launchers import LAUNCHERS
    from .runs import default_run_dir
    from .train import UNREAD_KEYS

    cfg = _build(args, UNREAD_KEYS)
    _check_init_from(cfg, args.resume)
    out = Path(args.out) if args.out else default_run_dir(cfg)
    return LAUNCHERS[args.launcher].train(cfg, out, args)  # local: here; slurm: one job (slurm.py, docs/cluster.md)


def cmd_eval(args) -> int:
    from .corruptions import NAMES
    from .distributed import resolve_device
    from .evaluate import evaluate_run, load_saved
    from .robustness import Suite, check, evaluate_suite, parse_names, parse_severities

    # calibration always; temperature and corruptions on request (robustness.py, docs/robustness.md)
    suite = Suite(tta_flip=args.tta_flip, temperature=args.temperature, severities=parse_severities(args.severities),
                  corruptions=parse_names(args.corruptions, NAMES, "corruption"), seed=args.corruption_seed,
                  corruption_images=args.corruption_images, cache=args.cache)
    saved = load_saved(args.run, resolve_device(args.device))
    check(saved.cfg, suite, args.run)  # before anything is written
    report = evaluate_run(args.run, data_dir=args.data_dir, tta_flip=args.tta_flip, out_dir=args.out,
                          device=args.device)
    report.update(evaluate_suite(args.run, suite, args.data_dir, args.out, args.device, saved=saved))
    print(json.dumps(report, indent=2))
    return 0


def cmd_info(args) -> int:
    from .backbones import build_model
    from .model import count_params, flops_per_image
    from .optim import resolve_lr

    cfg = _build(args)
    model = build_model(cfg.model)
    o = cfg.optim
    info = {
        "preset": args.preset,
        "ablation": args.ablation,
        "diff_from_baseline": diff(cfg),
        # the learning-rate rule spelled out: optim.lr as given, per 256 images or absolute, and the peak it gives
        "lr": {"optim.lr": o.lr, "optim.lr_scale": o.lr_scale, "global_batch": cfg.train.batch_size,
               "peak_lr": resolve_lr(o, cfg.train.batch_size).lr},
        "params": count_params(model),
        "gflops_per_image_forward": round(flops_per_image(model) / 1e9, 4),
        "gflops_per_image_train": round(3 * flops_per_image(model) / 1e9, 4),
    }
    if args.config:
        info["config"] = to_dict(cfg)
    print(json.dumps(info, indent=2))
    return 0


def cmd_ablations(args) -> int:
    from .backbones import build_model
    from .model import count_params

    rows = []
    for name, d in ABLATIONS.items():
        params = count_params(build_model(make_config("baseline", ablation=name).model)) if args.params else None
        rows.append((name, d, params))
    for name, d, params in rows:
        paper = f"  paper {PAPER_RESULTS[name]:.2f}%" if name in PAPER_RESULTS else ""
        extra = f"  params {params:,}" if params is not None else ""
        print(f"{name:16s} {json.dumps(d)}{extra}{paper}")
    return 0


def cmd_ablate(args) -> int:
    from .ablate import ablate, status
    from .launchers import LAUNCHERS
    from .train import UNREAD_KEYS

    if args.status:
        print(status(args.study, args.root))
        return 0
    overrides = parse_overrides(args.set)
    if args.data_dir:
        overrides.setdefault("data.data_dir", args.data_dir)
    base = make_config(args.preset)  # every run of the study trains: --set values train does not read are refused
    refuse_unread(make_config(args.preset, overrides), base, UNREAD_KEYS, args.command)
    suite = _study_suite(args, make_config(args.preset, overrides))
    devices = args.devices.split(",") if args.devices else None
    options = LAUNCHERS[args.launcher].options(args, f"smallvit-{args.study}")
    rows = ablate(args.study, args.seeds, args.preset, args.budget, args.root, overrides, devices, args.set,
                  args.data_dir, launcher=args.launcher, options=options, wait=args.wait, new_folders=args.new_folders)
    base = Path(rows[0]["folder"]).parent.parent  # the study folder (STUDY@HASH with --new-folders)
    if args.launcher == "slurm":  # submitted: the queue's view
        print(status(base.name, base.parent))
        if not args.wait:  # submitted: follow with --status
            return 0
    done = sum(r["state"] == "done" for r in rows)
    print(f"{done}/{len(rows)} runs done in {base}")
    if suite is not None:
        _run_study_suite(rows, suite, args.data_dir)
    if done and not args.no_report:
        from .report import report

        print(report(base)["table"])
    return 0 if done == len(rows) else 1


def _study_suite(args, cfg):
    """The --eval-suite of `ablate`, checked against the study's config before anything trains (None: none)."""
    from .robustness import SUITE_PARTS, check, parse_names, suite_from_parts

    parts = parse_names(args.eval_suite, SUITE_PARTS, "--eval-suite part")
    if not parts:
        return None
    suite = suite_from_parts(parts, corruption_images=args.corruption_images)
    check(cfg, suite, "the study's runs")
    return suite


def _run_study_suite(rows, suite, data_dir) -> None:
    """The evaluation suite on each finished run of a study that lacks it (a restarted study skips those done)."""
    from .robustness import evaluate_suite, suite_done

    for r in rows:
        folder = Path(r["folder"])
        if r["state"] == "done" and not suite_done(folder, suite):
            print(f"[{r['ablation']} seed {r['seed']}] eval suite ({', '.join(suite.parts)})", flush=True)
            evaluate_suite(folder, suite, data_dir)


def cmd_report(args) -> int:
    from .report import report

    folder = Path(args.study)
    if not folder.exists():
        folder = Path(args.root) / args.study
    if (folder / "search.json").is_file():  # a design-space search's folder (search.py)
        from .search_report import report as search_report

        r = search_report(folder)
        print(r["table"])
        print(f"wrote {r['markdown']}, {r['csv']}, " + ", ".join(r["plots"].values()))
        return 0
    r = report(folder, args.out)
    print(r["table"])
    print(f"wrote {r['markdown']}, {r['csv']}, {r['bars']}, {r['curves']}")
    return 0


def cmd_search(args) -> int:
    from . import search as S
    from .launchers import LAUNCHERS
    from .search_report import report as search_report
    from .train import UNREAD_KEYS

    folder = Path(args.root) / args.name
    for opt in ("trials", "workers", "seeds"):
        if getattr(args, opt) < 1:
            raise ConfigError(f"--{opt} must be at least 1, got {getattr(args, opt)}")
    if args.report:
        r = search_report(folder)
        print(r["table"])
        print(f"wrote {r['markdown']}, {r['csv']}, " + ", ".join(r["plots"].values()))
        return 0
    devices = args.devices.split(",") if args.devices else None
    options = LAUNCHERS[args.launcher].options(args, f"smallvit-search-{args.name}")
    final_sets = parse_overrides(args.final_set)
    if not args.finalize:
        overrides = parse_overrides(args.set)
        if args.data_dir:
            overrides.setdefault("data.data_dir", args.data_dir)
        objectives = [S.parse_objective(o) for o in args.objective or ["val_acc"]]
        pruner = args.pruner or ("hyperband" if len(objectives) == 1 else "none")
        s = S.Settings(args.name, args.preset, overrides, S.load_space(args.space), objectives, args.max_params,
                       args.max_flops, pruner, args.storage, args.seed)
        if args.retrain_top:
            make_config(args.preset, {**overrides, **final_sets})  # the retrains' settings, checked before any run
        S.search(s, args.root, args.trials, args.launcher, args.workers, devices, options, args.wait, UNREAD_KEYS,
                 args.enqueue_preset)
        if args.launcher == "slurm" and not args.wait:
            print(f"follow with squeue; then: smallvit search {args.name} --root {args.root} --report")
            return 0
    if args.finalize or args.retrain_top:
        S.finalize(folder, args.retrain_top or 3, args.seeds, final_sets, args.launcher, devices, options, args.wait)
    r = search_report(folder)
    print(r["table"])
    print(f"wrote {r['markdown']}, {r['csv']}, " + ", ".join(r["plots"].values()))
    return 0


def cmd_predict(args) -> int:
    from .predict import format_table, predict_files

    results = predict_files(args.run, args.images, topk=args.topk, device=args.device)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def cmd_export(args) -> int:
    from .export import ExportError, export

    try:
        report = export(args.run, args.format, args.out, opset=args.opset, exporter=args.onnx_exporter)
    except ExportError as e:
        print(f"smallvit export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


def cmd_profile(args) -> int:
    from .profile import profile
    from .runs import default_run_dir
    from .train import UNREAD_KEYS

    cfg = _build(args, UNREAD_KEYS)
    out = Path(args.out) if args.out else default_run_dir(cfg, "runs/profile").parent
    r = profile(cfg, out, wait=args.wait, warmup=args.warmup, active=args.active, with_stack=args.with_stack)
    print(r["markdown"])
    print(f"wrote {out / 'profile.md'}, {out / 'profile.json'} and {r['trace']}")
    return 0


def cmd_inspect(args) -> int:
    from .inspect_attn import inspect_run

    report = inspect_run(args.run, images=args.images, indices=args.indices, data_dir=args.data_dir, out_dir=args.out)
    print(json.dumps(report, indent=2))
    return 0


def cmd_pretrain(args) -> int:
    from .pretrain import UNREAD_KEYS, pretrain
    from .runs import default_run_dir

    cfg = _build(args, UNREAD_KEYS)
    out = Path(args.out) if args.out else default_run_dir(cfg, "runs/pretrain")
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"run folder: {out}")
    result = pretrain(cfg, out, resume=args.resume)
    if result["status"] == "interrupted":
        sys.stdout.write(f"interrupted at step {result['step']}; resume with the same command plus --resume\n")
        sys.stdout.flush()
        return 130
    if main_rank:
        print(f"k-NN accuracy {result['final_knn_acc']:.2f}% (at init {result['init_knn_acc']}, best "
              f"{result['best_knn_acc']:.2f}%) after {result['epochs_done']:.2f} epochs; fine-tune with "
              f"smallvit train --preset finetune --set train.init_from={out}")
        print(json.dumps({k: result[k] for k in ("init_knn_acc", "final_knn_acc", "best_knn_acc", "step",
                                                 "wall_seconds", "train_img_per_s")}))
    return 0


def cmd_knn(args) -> int:
    from .knn import knn_run

    report = knn_run(args.run, k=args.k, temperature=args.temperature, train_images=args.train_images,
                     test_images=args.test_images, data_dir=args.data_dir, device=args.device)
    print(json.dumps(report, indent=2))
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,7,42; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="smallvit", description="Small Vision Transformers on small datasets.")
    parser.add_argument("--version", action="version", version=f"smallvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model")
    _config_args(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/<diff-from-baseline>/seed<N>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    from .launchers import add_arguments as add_launcher_arguments

    add_launcher_arguments(p, per_run=False)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of a saved run or checkpoint")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tta-flip", action="store_true", help="also report accuracy with horizontal-flip TTA")
    p.add_argument("--out", default=None, help="folder for the confusion matrix and reliability PNGs and "
                   "eval-suite.json (default: the run folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--temperature", action="store_true",
                   help="also calibration after temperature scaling fitted on the run's validation split")
    p.add_argument("--corruptions", nargs="?", const="all", default=None, metavar="NAMES",
                   help="accuracy under CIFAR-10-C's corruptions: all, or comma-separated names")
    p.add_argument("--severities", default="1,2,3,4,5", help="corruption severities (1-5)")
    p.add_argument("--corruption-images", type=int, default=0, help="corrupt the first N test images (0: all)")
    p.add_argument("--corruption-seed", type=int, default=0, help="seed of the generated corruptions")
    p.add_argument("--cache", default=None,
                   help="folder of generated corrupted sets (default: DATA/<dataset>-c-generated)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("info", help="resolved config, parameter count and FLOPs")
    _config_args(p)
    p.add_argument("--config", action="store_true", help="also print the full resolved config")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("ablations", help="list the named ablations and their diffs from the baseline")
    p.add_argument("--params", action="store_true", help="also count each ablation's parameters")
    p.set_defaults(fn=cmd_ablations)

    p = sub.add_parser("ablate", help="run a named study: ablations x seeds, restartable")
    p.add_argument("study", help="study name (see smallvit.experiments.STUDIES)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--preset", default="baseline", choices=sorted(PRESETS), help="scale of every run")
    p.add_argument("--budget", type=float, default=1.0, help="multiply the epochs (and warm-up) by this")
    p.add_argument("--root", default="runs/studies")
    p.add_argument("--devices", default=None, help="comma-separated devices (cuda:0,cuda:1) for side-by-side runs")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--status", action="store_true", help="list every run: state, SLURM job, last log line; errors")
    p.add_argument("--new-folders", action="store_true",
                   help="settings other than those of the study's existing runs: train them in STUDY@HASH/ beside it "
                        "(without it, such a study is refused)")
    p.add_argument("--eval-suite", default=None, metavar="PARTS",
                   help="after the runs: calibration, temperature, corruptions (comma-separated) on each run")
    p.add_argument("--corruption-images", type=int, default=0, help="--eval-suite corruptions: the first N test images")
    add_launcher_arguments(p, per_run=True)
    p.set_defaults(fn=cmd_ablate)

    p = sub.add_parser("report", help="Markdown/CSV table and plots from a study's run records")
    p.add_argument("study", help="study name or folder of runs")
    p.add_argument("--root", default="runs/studies")
    p.add_argument("--out", default=None, help="output folder (default: the study folder)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("search", help="design-space search with Optuna: trials on the validation split, pruning, "
                       "the top-k retrained on the test set (docs/search.md)")
    p.add_argument("name", help="the study's name: its folder is ROOT/NAME")
    p.add_argument("--preset", default="baseline", choices=sorted(PRESETS), help="scale of every trial")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--root", default="runs/search")
    p.add_argument("--space", default="tiny", help="a space of smallvit.experiments.SPACES or a .json/.toml file")
    p.add_argument("--objective", action="append", metavar="NAME[:max|min]",
                   help="repeatable; default val_acc (see smallvit.search.OBJECTIVES)")
    p.add_argument("--max-params", type=int, default=0, help="prune larger models before training")
    p.add_argument("--max-flops", type=int, default=0, help="prune models of more forward FLOPs per image")
    p.add_argument("--trials", type=int, default=20, help="trials of the study in all (a rerun runs the rest)")
    p.add_argument("--pruner", choices=["none", "median", "hyperband"], default=None,
                   help="default: hyperband for one objective, none for several")
    p.add_argument("--storage", default="", help="an RDB URL (postgresql+psycopg://...); default: a journal file "
                                                 "in the study folder")
    p.add_argument("--workers", type=int, default=1, help="worker processes (slurm: jobs of the array)")
    p.add_argument("--devices", default=None, help="comma-separated devices, one worker process each")
    p.add_argument("--seed", type=int, default=0, help="the samplers' seed")
    p.add_argument("--enqueue-preset", action="store_true",
                   help="try the preset's own values of the space's keys first (once per study)")
    p.add_argument("--retrain-top", type=int, default=0, help="then retrain the K best and the baseline")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each retrain")
    p.add_argument("--final-set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides of the retrains only, e.g. the full train.time_budget_s")
    p.add_argument("--finalize", action="store_true", help="only retrain the top-k (--retrain-top, default 3)")
    p.add_argument("--report", action="store_true", help="only write the report")
    add_launcher_arguments(p, per_run=True)
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("predict", help="top-k classes of image files (PNG, JPEG, any size)")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_predict)

    from .export import FORMATS, OPSET

    p = sub.add_parser("export", help="write the model as ONNX, TorchScript, a torch.export program, a timm model "
                       "folder or safetensors weights")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--format", default="onnx", choices=list(FORMATS))
    p.add_argument("--out", default=None, help="output file, or folder for timm (default in the run folder: "
                   + ", ".join(FORMATS.values()) + ")")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset")
    p.add_argument("--onnx-exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
                   help="auto: dynamo when onnxscript is installed")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("profile", help="torch.profiler over a few training steps: trace + where a step's time goes")
    _config_args(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/profile/<diff-from-baseline>)")
    p.add_argument("--wait", type=int, default=1, help="steps before the profiler warms up (after 1 skipped step)")
    p.add_argument("--warmup", type=int, default=1, help="profiled but discarded steps")
    p.add_argument("--active", type=int, default=0, help="recorded steps (0: whole augmentation chunks, >= 3)")
    p.add_argument("--with-stack", action="store_true", help="record Python stacks in the trace (slower)")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("inspect", help="attention maps and rollout of the CLS token(s) on test images, as PNGs")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--images", type=int, default=4, help="the first N test images")
    p.add_argument("--indices", type=_int_list, default=None, help="test image indices instead, e.g. 0,7,42")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="output folder (default: RUN/attention)")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("pretrain", help="DINO self-supervised pre-training on the training images (ssl.* keys)")
    _config_args(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/pretrain/<diff-from-baseline>/seed<N>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("knn", help="weighted k-NN accuracy of a run's features (a pretrain run's teacher)")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--k", type=int, default=None, help="neighbours (default: the run's ssl.knn_k)")
    p.add_argument("--temperature", type=float, default=None, help="vote temperature (default: ssl.knn_temp)")
    p.add_argument("--train-images", type=int, default=0, help="bank of the first N training images (0: all)")
    p.add_argument("--test-images", type=int, default=0, help="the first N test images (0: all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_knn)

    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1):  # ablation names such as "-aa" start with a dash: keep them as values
        if argv[i] == "--ablation" and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"--ablation={argv[i + 1]}", ""]
    args = parser.parse_args([a for a in argv if a != ""])
    from .data import DataError
    from .profile import ProfileError
    from .runs import CheckpointError, TrainingError

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, TrainingError, ProfileError, FileNotFoundError) as e:
        print(f"smallvit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once; atomic writes leave the last checkpoint whole
        print(f"smallvit {args.command}: interrupted; the last checkpoint is intact, continue with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
