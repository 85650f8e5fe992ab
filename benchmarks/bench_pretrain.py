"""Cost of the DINO recipe: measured img/s of `smallvit pretrain` and of the fine-tuning step, and GPU-hours.

Both rows run the real loops (`pretrain()` and `train()` with train.max_steps) on CIFAR-10 at --data-dir with the
`pretrain` and `finetune` presets' model; the first step of each is not timed (train.py and pretrain.py exclude it),
nor are the k-NN monitor and the evaluation. A pre-training image costs 2 global views (teacher forward, student
forward + backward) and ssl.local_crops small views (student only); its FLOPs are counted with torch's FlopCounterMode.

Without CIFAR-10 at --data-dir (a lent GPU machine before the data is moved, docs/gpu.md) both rows run on random
images written in CIFAR-10's layout to a temporary folder: the same work per image, and the table says so.
--only pretrain measures the DINO row alone (benchmarks/gpu_check.sh's step table).

The GPU-hours are an estimate unless this runs on the GPU itself: from the measured ratio pretrain / fine-tune img/s
applied to an assumed supervised GPU throughput (--gpu-train-img-s), and from FLOPs at an assumed utilisation.

    python benchmarks/bench_pretrain.py --batch 64 --steps 5 --set train.threads=1 \
        --out benchmarks/results/pretrain_cpu.md
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from smallvit.config import parse_overrides
from smallvit.data import steps_per_epoch
from smallvit.datasets import DATASETS
from smallvit.experiments import make_config
from smallvit.backbones import build_model
from smallvit.pretrain import pretrain
from smallvit.train import train


def forward_flops(model, size: int) -> int:
    """Forward FLOPs of one image of size x size."""
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return int(fc.get_total_flops())


def random_cifar10(root: Path, n_train: int, n_test: int = 100) -> None:
    """Random uint8 images in CIFAR-10's files under root, their md5s registered so that smallvit loads them."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = -(-n_train // 5)
    sums = {}
    for name, n in [(f"data_batch_{i + 1}", per) for i in range(5)] + [("test_batch", n_test)]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(d))
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    DATASETS["cifar10"] = replace(DATASETS["cifar10"], md5=sums)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--batch", type=int, default=0, help="batch of the measured steps (0: the presets')")
    ap.add_argument("--steps", type=int, default=5, help="steps per row (the first is not timed)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for both rows")
    ap.add_argument("--gpu-train-img-s", type=float, default=3200.0,
                    help="assumed supervised GPU img/s (default: the reference's baseline run, reference §4)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (default: H200 dense BF16)")
    ap.add_argument("--mfu", type=float, default=0.2, help="assumed fraction of the peak reached")
    ap.add_argument("--only", choices=["pretrain"], default=None, help="measure the DINO row alone")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()

    rows, dev = [], None
    scratch = tempfile.TemporaryDirectory()
    source = f"CIFAR-10 at {args.data_dir}"
    if not (Path(args.data_dir) / "cifar-10-batches-py" / "data_batch_1").is_file():
        args.data_dir = scratch.name
        random_cifar10(Path(scratch.name), max(args.batch, 512) * args.steps)
        source = "random images (CIFAR-10 not found)"
        print(f"real data unavailable; using {source}", file=sys.stderr)
    common = {"data.data_dir": args.data_dir, "data.download": False, "data.test_subset": 100,
              "train.max_steps": args.steps, "train.progress": False, "train.log_every_steps": args.steps,
              **parse_overrides(args.set)}
    for preset, run in (("pretrain", pretrain), ("finetune", train))[: 1 if args.only else 2]:
        full = make_config(preset, {k: v for k, v in common.items() if k != "train.max_steps"})
        batch = args.batch or full.train.batch_size
        cfg = make_config(preset, {**common, "train.batch_size": batch, "data.subset": batch * args.steps,
                                   "ssl.knn_train_images": 100})
        with tempfile.TemporaryDirectory() as tmp:
            r = run(cfg, Path(tmp) / "run")
        dev = r["device"]
        model = build_model(replace(cfg.model, num_classes=0))  # the head's FLOPs are negligible
        f32 = forward_flops(model, cfg.model.img_size)
        s = cfg.ssl
        f = (3 * (s.global_crops * f32 + s.local_crops * forward_flops(model, s.local_size or cfg.model.img_size // 2))
             + s.global_crops * f32) if preset == "pretrain" else 3 * f32
        images = full.train.epochs * steps_per_epoch(50_000, full.aug.repeats, full.train.batch_size) * \
            full.train.batch_size
        rows.append({"row": preset, "img_s": r["train_img_per_s"], "gflop": f / 1e9, "images": images,
                     "epochs": full.train.epochs, "batch": full.train.batch_size, "measured_batch": batch})
    ratio = rows[0]["img_s"] / rows[1]["img_s"] if len(rows) == 2 else float("nan")
    lines = [f"DINO recipe cost, measured on {dev} (torch {torch.__version__}, {source}); "
             f"{args.steps} steps per row at batch {rows[0]['measured_batch']}, the first not timed "
             f"({rows[0]['img_s'] / rows[0]['measured_batch']:.2f} pretrain steps/s).", "",
             "| run | schedule | images | training GFLOP/img | measured img/s | hours here | GPU h (img/s ratio) | "
             f"GPU h (FLOPs at {args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gpu_img_s = args.gpu_train_img_s * (ratio if r["row"] == "pretrain" else 1.0)
        flop_h = r["images"] * r["gflop"] * 1e9 / (args.mfu * args.peak_tflops * 1e12) / 3600
        lines.append(f"| {r['row']} | {r['epochs']} epochs x batch {r['batch']} | {r['images'] / 1e6:.2f} M | "
                     f"{r['gflop']:.3f} | {r['img_s']:.1f} | {r['images'] / r['img_s'] / 3600:.0f} | "
                     f"{r['images'] / gpu_img_s / 3600:.2f} | {flop_h:.2f} |")
    if len(rows) == 2:
        lines += ["", f"pretrain / fine-tune img/s here: {ratio:.3f}. 'GPU h (img/s ratio)' assumes the fine-tuning "
                  f"step runs at {args.gpu_train_img_s:.0f} img/s on the GPU and the pretraining step at that times "
                  f"the ratio measured here; both GPU columns are estimates unless this table was made on the GPU."]
    else:
        lines += ["", "'hours here' is the whole pretrain schedule at the measured img/s on this device."]
    scratch.cleanup()
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
