"""What reproduces, measured: the same short run repeated, under other numeric code paths, and with other seeds.

Each row is a `smallvit train` process (the `quick` preset, shortened with --epochs) in its own run folder:
- `repeat`: the reference environment again; bit-for-bit equal weights are expected (same lock, same machine).
- `threads=N`: another intra-op thread count, so BLAS splits the matrix products differently.
- `no-avx2`: ATen, MKL and oneDNN told to use their pre-AVX2 kernels (ATEN_CPU_CAPABILITY=default,
  MKL_ENABLE_INSTRUCTIONS=SSE4_2, DNNL_MAX_CPU_ISA=SSE41): on one machine, the float rounding of another CPU.
- `seed=k`: another training seed, the yardstick for how much a numeric difference matters.

    python benchmarks/reproducibility.py                       # quick preset, 2 epochs, 2 extra seeds
    python benchmarks/reproducibility.py --set train.threads=1 --threads-row 2   # a busy machine: 1 thread
    python benchmarks/reproducibility.py --epochs 8 --seeds 2 --out benchmarks/results/reproducibility_cpu.md

The table gives every evaluation's test accuracy, the spread against the reference run and whether the final
weights are bit-for-bit equal to the reference's (a SHA-256 over the checkpoint's tensors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs from a checkout without pip-installing smallvit


def weights_hash(run: Path) -> str:
    import torch

    from smallvit.runs import load_checkpoint

    state = load_checkpoint(run)["model"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run(name: str, root: Path, preset: str, epochs: int, sets: list[str], env: dict[str, str]) -> dict:
    out = root / name
    cmd = [sys.executable, "-m", "smallvit.cli", "train", "--preset", preset, "--out", str(out), "--resume",
           "--set", f"train.epochs={epochs}", f"train.eval_every_epochs={max(1, epochs // 4)}",
           "train.progress=false", *sets]
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **env}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=full_env, stdout=subprocess.DEVNULL)
    res = json.loads((out / "result.json").read_text())
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accs = [r["test_acc"] for r in evals if "test_acc" in r]
    return {"name": name, "accs": accs, "hash": weights_hash(out), "wall": time.perf_counter() - t,
            "device": res["device"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2, help="extra training seeds (1..N) as the yardstick")
    p.add_argument("--root", default="runs/reproducibility")
    shared = REPO.parent / "shared" / "data"
    p.add_argument("--data-dir", default=os.environ.get("SMALLVIT_DATA") or (str(shared) if shared.is_dir() else ""),
                   help="dataset root (default: $SMALLVIT_DATA, else ../shared/data when present, else ./data)")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every row")
    p.add_argument("--threads-row", type=int, default=1, help="train.threads of the `threads=N` row (0: no row)")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = p.parse_args()
    root = Path(args.root) / time.strftime("%Y%m%d-%H%M%S")
    no_avx2 = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "DNNL_MAX_CPU_ISA": "SSE41"}
    rows_spec = [("reference", [], {}), ("repeat", [], {}), ("no-avx2", [], no_avx2)]
    if args.threads_row:
        rows_spec.append((f"threads={args.threads_row}", [f"train.threads={args.threads_row}"], {}))
    rows_spec += [(f"seed={k}", [f"train.seed={k}"], {}) for k in range(1, args.seeds + 1)]
    rows = []
    for name, sets, env in rows_spec:
        data = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
        rows.append(run(name, root, args.preset, args.epochs, data + args.set + sets, env))
        print(f"{name}: {rows[-1]['accs']} {rows[-1]['hash']} ({rows[-1]['wall']:.0f} s)", flush=True)
    ref = rows[0]
    from smallvit.runs import cpu_model

    lines = [f"Reproducibility on {cpu_model()} ({ref['device']}), `--preset {args.preset}` for {args.epochs} "
             f"epochs{' ' + ' '.join(args.set) if args.set else ''}; run folders under {root}.", "",
             "| row | test acc % at each evaluation | final Δ vs reference | max |Δ| over evaluations | weights = "
             "reference |", "|---|---|---:|---:|---|"]
    for r in rows:
        d = [a - b for a, b in zip(r["accs"], ref["accs"])]
        lines.append(f"| {r['name']} | {' / '.join(f'{a:.2f}' for a in r['accs'])} | {d[-1]:+.2f} | "
                     f"{max(abs(x) for x in d):.2f} | {'yes' if r['hash'] == ref['hash'] else 'no'} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(f"```\npython benchmarks/reproducibility.py {' '.join(sys.argv[1:])}\n```\n\n"
                                  + table)


if __name__ == "__main__":
    main()
