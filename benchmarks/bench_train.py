"""Training throughput (img/s) on the current device: model-only step vs full step, per preset.

model-only: forward + backward + optimiser step on an already-normalised batch.
full:       the same plus the batched augmentation (crop/flip, AutoAugment, erasing, mixing) from uint8 data, as
            train.py runs it: the per-sample part on aug.chunk_images images per call, the mixing per step.
Use --warmup and --steps as multiples of the chunk's steps (the table's "aug chunk" / batch), so that the timed
steps hold whole chunks.
Timing is honest: warm-up steps are excluded and the device is synchronised before reading the clock.

--timm adds, per preset, timm's VisionTransformer of the same shape holding the same weights (export.to_timm: the
weight map the tests hold logits equal under) trained with the same optimiser on the same batch: model-only steps of
the two alternate, one round each at a time, in this process, so a machine that speeds up or slows down (other
processes, a VM's neighbours) moves both. The table gives each one's median over the rounds and their ratio.

--bounds adds two rows to --timm's rounds, smallvit's model with work taken out (not a model to train, a measure of
what the rest costs): "- LN, GELU, bias, residual" drops every layer norm, GELU, linear bias and residual add of the
blocks; "- those - attention" also replaces the attention by its value projection (the q/k/v product still runs). If
the first is short of a speed-up, no removal of memory-bound work can reach it: the rest is matrix products and
attention.

    python benchmarks/bench_train.py --presets baseline quick --steps 10 --out benchmarks/results/train_cpu.md
    python benchmarks/bench_train.py --presets speedrun --timm --rounds 30 --out benchmarks/results/train_vs_timm_cpu.md
    python benchmarks/bench_train.py --presets speedrun --timm --bounds --rounds 30 --steps 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout's smallvit, installed or not
from timing import images_per_second

from smallvit.augment import BatchAugment
from smallvit.config import parse_overrides
from smallvit.experiments import make_config
from smallvit.datasets import DATASETS
from smallvit.backbones import build_model
from smallvit.model import count_params, flops_per_image
from smallvit.optim import build_optimizer
from smallvit.runs import device_name
from smallvit.train import chunk_steps


def bench(preset: str, overrides: dict, steps: int, warmup: int, dev: torch.device, batch: int | None):
    cfg = make_config(preset, overrides)
    B = batch or cfg.train.batch_size
    info = DATASETS[cfg.data.dataset]
    model = build_model(cfg.model).to(dev)
    opt = build_optimizer(model, cfg.optim, dev)
    aug = BatchAugment(cfg.aug, info.mean, info.std, cfg.model.num_classes, cfg.train.label_smoothing, dev)
    bf16 = dev.type == "cuda"
    S = cfg.model.img_size
    K = chunk_steps(cfg.aug.chunk_images, B, dev, 3 * S * S)  # as train.py: per-sample augmentation of K batches/call
    g = torch.Generator(device="cpu").manual_seed(0)
    x_u8 = torch.randint(0, 256, (K * B, 3, S, S), dtype=torch.uint8, generator=g).to(dev)
    y = torch.randint(0, cfg.model.num_classes, (K * B,), generator=g).to(dev)
    x_f, t_f = aug(x_u8[:B], y[:B], 0)

    def augmenter():
        """Augmented batches in train.py's order; counts its own calls (the timer repeats step numbers)."""
        state = {"calls": 0}

        def next_batch():
            i = state["calls"]
            state["calls"] += 1
            c, j = divmod(i, K)
            if j == 0:
                state["x"] = aug.images(x_u8, c)
            return aug.targets(state["x"][j * B:(j + 1) * B], y[j * B:(j + 1) * B], i)

        return next_batch

    full_batches, aug_batches = augmenter(), augmenter()

    def step(i, full):
        xb, tb = full_batches() if full else (x_f, t_f)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(xb)
        loss = torch.sum(-tb * F.log_softmax(logits.float(), 1), 1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def aug_only(i):
        aug_batches()

    out = {}
    for name, fn in (("model-only", lambda i: step(i, False)), ("full", lambda i: step(i, True)),
                     ("augment-only", aug_only)):
        out[name] = images_per_second(fn, steps, warmup, B, dev)
    return cfg, B, K, count_params(model), flops_per_image(model), out


def model_step(model, cfg, x, t, dev):
    """One model-only training step of `model` (forward, loss, backward, optimiser step) on the batch x, t."""
    opt = build_optimizer(model, cfg.optim, dev)

    def step(i):
        loss = torch.sum(-t * F.log_softmax(model(x).float(), 1), 1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def value_only(self, x):
    """An attention layer's stand-in for --bounds: proj of the value part of the one q/k/v product."""
    D = x.shape[-1]
    return self.proj(F.linear(x, torch.cat([self.q.weight, self.k.weight, self.v.weight]))[..., 2 * D:])


def stripped(model, attention: bool):
    """A copy of a ViT with its blocks' layer norms, GELUs, linear biases and residual adds removed; without
    `attention`, each attention layer returns proj(v) of the one q/k/v product (for --bounds, never trained)."""
    model = copy.deepcopy(model)
    for blk in model.blocks:
        attn = blk.attn
        if not attn.fused:
            raise SystemExit("--bounds: the preset's attention is not the fused q/k/v one (latent or shared k/v)")
        blk.norm1, blk.norm2, blk.mlp.act = torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()
        for lin in (attn.q, attn.k, attn.v, attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            lin.bias = None
        blk.forward = types.MethodType(lambda self, x: self.mlp(self.attn(x)), blk)
        if not attention:
            attn.forward = types.MethodType(value_only, attn)
    return model


def against_timm(preset: str, overrides: dict, rounds: int, steps: int, warmup: int, dev: torch.device,
                 batch: int | None, bounds: bool = False) -> tuple[int, int, dict[str, float]]:
    """Parameters, batch and the median img/s over alternating rounds of `steps` model-only steps of smallvit's
    model, timm's same-shape ViT and, with `bounds`, the two stripped copies of smallvit's."""
    from smallvit.export import to_timm

    cfg = make_config(preset, overrides)
    B = batch or cfg.train.batch_size
    ours = build_model(cfg.model).to(dev).train()
    models = {"timm": to_timm(ours).to(dev).train(), "smallvit": ours}  # the same weights under the weight map
    if bounds:
        models["smallvit - LN, GELU, bias, residual"] = stripped(ours, attention=True)
        models["smallvit - those - attention"] = stripped(ours, attention=False)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, 3, cfg.model.img_size, cfg.model.img_size, generator=g).to(dev)
    t = torch.softmax(torch.randn(B, cfg.model.num_classes, generator=g), 1).to(dev)
    steps_of = {k: model_step(m, cfg, x, t, dev) for k, m in models.items()}
    rates = {k: [] for k in steps_of}
    for fn in steps_of.values():
        images_per_second(fn, 1, warmup, B, dev)
    for _ in range(rounds):
        for k, fn in steps_of.items():
            rates[k].append(images_per_second(fn, steps, 0, B, dev))
    return count_params(ours), B, {k: statistics.median(r) for k, r in rates.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["baseline", "quick"])
    p.add_argument("--set", nargs="*", default=[], help="overrides applied to every preset")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--timm", action="store_true", help="the model-only step against timm's same-shape ViT instead")
    p.add_argument("--rounds", type=int, default=20, help="--timm: alternating rounds of --steps steps each")
    p.add_argument("--bounds", action="store_true",
                   help="--timm: also smallvit's model without its memory-bound layers, and without attention too")
    a = p.parse_args()
    if a.bounds and not a.timm:
        p.error("--bounds goes with --timm")
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if a.timm:
        rows = ["| preset | params | batch | model | model-only img/s | vs timm |", "|---|---|---|---|---|---|"]
        name = {"timm": "timm ViT, same shape"}
        for preset in a.presets:
            n, B, r = against_timm(preset, parse_overrides(a.set), a.rounds, a.steps, a.warmup, dev, a.batch,
                                   a.bounds)
            rows += [f"| {preset} | {n:,} | {B} | {name.get(k, k)} | {v:.0f} | {v / r['timm']:.2f}x |"
                     for k, v in r.items()]
        return report(rows, dev, a.out, f"median of {a.rounds} alternating rounds of {a.steps} steps each; ")
    rows = ["| preset | params | GFLOP/img (fwd) | batch | aug chunk | model-only img/s | full step img/s "
            "| augment-only img/s | augment share of step |", "|---|---|---|---|---|---|---|---|---|"]
    for preset in a.presets:
        cfg, B, K, n, fl, r = bench(preset, parse_overrides(a.set), a.steps, a.warmup, dev, a.batch)
        share = 1 - r["full"] / r["model-only"]
        rows.append(f"| {preset} | {n:,} | {fl / 1e9:.3f} | {B} | {K * B} | {r['model-only']:.0f} | {r['full']:.0f} | "
                    f"{r['augment-only']:.0f} | {100 * share:.1f}% |")
    report(rows, dev, a.out)


def report(rows: list[str], dev: torch.device, out: str | None, how: str = "") -> None:
    table = "\n".join(rows)
    head = f"Training throughput on {device_name(dev)}, torch {torch.__version__}; {how}{time.strftime('%Y-%m-%d')}\n\n"
    print(head + table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(head + table + "\n")


if __name__ == "__main__":
    main()
