"""benchmarks/bench_train.py --bounds: the stripped copies measure what they say and leave the model alone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train  # noqa: E402

from smallvit.backbones import build_model  # noqa: E402
from smallvit.experiments import make_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stripped_copies_drop_the_pointwise_work_and_then_the_attention():
    torch.manual_seed(0)
    model = build_model(make_config("speedrun", {"model.depth": 2}).model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    bare, no_attn = bench_train.stripped(model, attention=True), bench_train.stripped(model, attention=False)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert all(blk.norm1 is not None and blk.mlp.fc1.bias is not None for blk in model.blocks)
    for m in (bare, no_attn):
        assert not any(isinstance(mod, (torch.nn.LayerNorm, torch.nn.GELU)) for mod in m.blocks.modules())
        assert all(lin.bias is None for lin in m.blocks.modules() if isinstance(lin, torch.nn.Linear))

    # a step runs on each (the benchmark trains them), and only the copy with attention reads the queries
    for m in (bare, no_attn):
        m(x).sum().backward()
    assert bare.blocks[0].attn.q.weight.grad.abs().sum() > 0
    assert no_attn.blocks[0].attn.q.weight.grad is None or no_attn.blocks[0].attn.q.weight.grad.abs().sum() == 0
    assert no_attn.blocks[0].attn.v.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_bounds_without_timm_is_refused_in_one_line():
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--bounds"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--bounds goes with --timm" in p.stderr.strip().splitlines()[-1]
