"""torchrun's helpers (distributed.py): step seeds, the compile mode without CUDA graphs, the device check, and
a global batch augmented bit-identically on 1, 2 and 4 processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from smallvit import distributed
from smallvit import distributed as dist_


def test_step_seeds_differ_per_step_and_seed_and_ignore_the_rank():
    seeds = {(s, step): distributed.step_seed(s, step) for s in range(4) for step in range(100)}
    assert len(set(seeds.values())) == len(seeds)


@pytest.mark.parametrize("mode, world, expected", [
    ("reduce-overhead", 1, "reduce-overhead"), ("max-autotune", 1, "max-autotune"), ("default", 2, "default"),
    ("reduce-overhead", 2, "default"), ("max-autotune", 2, "max-autotune-no-cudagraphs"),
    ("max-autotune-no-cudagraphs", 2, "max-autotune-no-cudagraphs")])
def test_compile_mode_under_torchrun_has_no_cuda_graphs(mode, world, expected):
    got, note = dist_.compile_mode(mode, world)
    assert got == expected and (note is None) == (got == mode)
    if note:
        assert mode in note and expected in note


def test_a_gpu_index_beyond_the_machine_is_one_line(monkeypatch):
    """cuda:N is checked where the run starts (config.py cannot know the machine); faked here as a 1-GPU machine,
    since only the count matters and no CUDA call is made."""
    import torch

    from smallvit.config import ConfigError
    from smallvit.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="train.device=cuda:3 but this machine has 1 GPU"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


# ---- the same result on any number of processes


# One script for 1, 2 and 4 processes: each rank augments its slices of a few global batches (two augmentation calls
# of 3 steps, two recipes that together use every random draw), mixes each step, draws drop-path and patch-dropout
# masks for a batch of two views; rank 0 saves the gathered global tensors.
GLOBAL_BATCH = r"""
import dataclasses, os, sys
import torch
import torch.distributed as dist
from smallvit.augment import BatchAugment
from smallvit.config import AugConfig, ModelConfig
from smallvit.data import Shard
from smallvit.distributed import gather_batch, step_seed
from smallvit.backbones import build_model
from smallvit.model import draw_for_global_batch

rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    dist.init_process_group("gloo")
torch.set_num_threads(1)
B, STEPS, PER_CALL = 16, 6, 3
shard = Shard(B, rank, world)
lo, hi = rank * shard.size, (rank + 1) * shard.size
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (STEPS * B, 3, 32, 32), dtype=torch.uint8, generator=g)
labels = torch.randint(0, 10, (STEPS * B,), generator=g)
gather = lambda t: gather_batch(t, world)
out = {}
for aa, fill in (("cifar10", "reference"), ("rand", "noise")):
    cfg = dataclasses.replace(AugConfig(), autoaugment=aa, erase_p=0.5, erase_fill=fill, mix_p=1.0)
    aug = BatchAugment(cfg, (0.5,) * 3, (0.25,) * 3, 10, 0.1, torch.device("cpu"), seed=3, shard=shard,
                       gather=gather)
    xs, ts = [], []
    for c in range(STEPS // PER_CALL):
        steps = range(c * PER_CALL, (c + 1) * PER_CALL)
        mine = torch.cat([torch.arange(s * B + lo, s * B + hi) for s in steps])  # as lifecycle.BatchOrder
        x = aug.images(images[mine], c)
        for j, s in enumerate(steps):
            part = slice(j * shard.size, (j + 1) * shard.size)
            xb, tb = aug.targets(x[part], labels[mine[part]], s)
            xs.append(gather(xb))
            ts.append(gather(tb))
    out[aa] = (torch.cat(xs), torch.cat(ts))
model = build_model(ModelConfig(embed_dim=32, depth=2, num_heads=2, drop_path=0.5, patch_drop=0.5))
if world > 1:
    draw_for_global_batch(model, shard)  # as train.py; one process keeps timm's own layers
model.train()
torch.manual_seed(step_seed(3, 5))
tokens = torch.arange(65.0).expand(2 * shard.size, 65)[..., None]  # two views of this rank's samples
views = lambda t: gather(t).view(world, 2, shard.size, *t.shape[1:]).transpose(0, 1).reshape(2 * B, *t.shape[1:])
out["patch_drop"] = views(model.patch_drop(tokens))
out["drop_path"] = views(model.blocks[1].drop_path(torch.ones(2 * shard.size, 1, 1)))
if rank == 0:
    torch.save(out, sys.argv[1])
"""


@pytest.mark.slow
def test_a_global_batch_is_augmented_bit_identically_on_1_2_and_4_processes(tmp_path):
    script = tmp_path / "global_batch.py"
    script.write_text(GLOBAL_BATCH)
    got = {}
    for world in (1, 2, 4):
        launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node", str(world)]
        p = subprocess.run([*launch, str(script), str(tmp_path / f"{world}.pt")], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        got[world] = torch.load(tmp_path / f"{world}.pt")
    one = got[1]
    assert one["drop_path"].unique().tolist() == [0.0, 2.0] and one["patch_drop"].shape == (32, 33, 1)
    for world in (2, 4):
        for key, value in one.items():
            for a, b in zip(value if isinstance(value, tuple) else (value,), got[world][key] if isinstance(
                    value, tuple) else (got[world][key],)):
                assert torch.equal(a, b), f"{key} differs on {world} processes"
