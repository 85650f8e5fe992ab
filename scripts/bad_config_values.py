"""Try bad config values on the real `smallvit train` entry and print what each one gets, as a Markdown table.

    python scripts/bad_config_values.py --data-dir /path/to/data   # folder holding cifar-10-batches-py

Each row runs `smallvit train --preset smoke --out DIR --set ...` in this process and records the exit code, what
reached stderr (its last line, and how many lines) and whether DIR was created. docs/reliability.md's "Bad config
values" table is this script's output.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import traceback
from pathlib import Path

# The 18 values of issue 23 (item 3) first, then more of the same kinds. Where a key matters only with another
# one (the RandAugment knobs, the whitening images), the row sets both.
CASES: list[list[str]] = [
    ["train.seed=-1"],
    ["train.log_every_steps=0"],
    ["optim.betas=1.5,0.999"],
    ["model.in_chans=1"],
    ["aug.autoaugment=rand", "aug.randaugment_magnitude=40"],
    ["train.device=gpu"],
    ["model.img_size=64"],
    ["train.max_steps=-1"],
    ["aug.mixup_alpha=-1"],
    ["optim.grad_clip=-1"],
    ["model.patch_init=whiten", "model.whiten_images=0"],
    ["optim.eps=0"],
    ["train.threads=-1"],
    ["model.num_classes=5"],
    ["aug.autoaugment=rand", "aug.randaugment_ops=0"],
    ["model.latent=q", "model.latent_dim=500"],
    ["ssl.out_dim=5"],
    ["data.val_seed=-1"],
    # more
    ["aug.cutmix_beta=0"],
    ["optim.weight_decay=Infinity"],
    ["model.norm_eps=0"],
    ["model.cls_pool=max"],
    ["train.device=cuda:x"],
    ["data.dataset=svhn", "model.img_size=64"],
    ["data.dataset=cifar100"],
    ["train.precision=fp16"],
    ["optim.muon_momentum=1.5"],
    ["data.subset=40"],
    ["data.val_images=50000"],
    ["model.arch=swin", "model.patch_drop=0.25"],
]


def run_case(sets: list[str], data_dir: str, steps: int) -> dict:
    """Run the CLI in-process; an exception that escapes main() is what a user would see as a traceback."""
    from smallvit.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        extra = [] if any(s.startswith("train.max_steps=") for s in sets) else [f"train.max_steps={steps}"]
        argv = ["train", "--preset", "smoke", "--out", str(out), "--data-dir", data_dir,
                "--set", "data.download=false", "train.threads=1", *extra, *sets]
        err, outbuf = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outbuf):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
            except Exception as e:  # noqa: BLE001 - an escaping exception is the finding
                traceback.print_exc(file=err)
                code = f"traceback ({type(e).__name__})"
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        stdout = outbuf.getvalue().strip().splitlines()
        return {"sets": " ".join(sets), "code": code, "lines": len(lines), "last": lines[-1] if lines else "",
                "stdout": stdout[-2] if len(stdout) > 1 else "", "written": out.exists()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--steps", type=int, default=2, help="train.max_steps of rows that do not set it")
    args = p.parse_args()
    print("| `--set` | exit | stderr lines | `--out` written | what is said |")
    print("|---|---|---|---|---|")
    for sets in CASES:
        r = run_case(sets, args.data_dir, args.steps)
        said = r["last"] or (f"(stdout) {r['stdout']}" if r["stdout"] else "")
        said = said.replace("|", "\\|")[:300]
        print(f"| `{r['sets']}` | {r['code']} | {r['lines']} | {'yes' if r['written'] else 'no'} | {said} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
