"""The CUDA code paths, run on a CPU under an op census: no op that synchronises on CUDA in a whole augmentation
chunk or a training step (tests/sync_census.py), and the op counts of the two Muon steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smallvit import autoaugment as A
from smallvit import cpu_kernels
from smallvit.augment import BatchAugment
from smallvit.experiments import make_config
from smallvit.datasets import DATASETS
from smallvit.backbones import build_model
from smallvit.optim import build_optimizer, schedule_factor, set_lr
from sync_census import SyncCensus  # a test helper (tests/sync_census.py)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cuda_paths(monkeypatch):
    """What a CUDA tensor gets: no numba kernels, and AutoAugment's sync-free path (its default on CUDA)."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    stages = A._apply_stages

    def sync_free(x, ops, values, fired, candidates=A.OPS, sync_free=None):
        return stages(x, ops, values, fired, candidates, True if sync_free is None else sync_free)

    monkeypatch.setattr(A, "_apply_stages", sync_free)


def test_census_flags_the_ops_that_sync_on_cuda():
    x = torch.arange(12)
    with SyncCensus() as c:
        torch.bincount(x)
        x.nonzero()
        x[x > 3]
        x[0].item()
        x.tolist()
        torch.repeat_interleave(x, x)
        torch.tensor([1, 2])
    flagged = {op for op, _, _ in c.syncs}
    assert flagged == {"bincount", "nonzero", "index", "_local_scalar_dense", "Tensor.tolist", "repeat_interleave"}
    assert all(where == "test_sync_census.py:test_census_flags_the_ops_that_sync_on_cuda" for _, where, _ in c.syncs)
    assert sum(c.created.values()) == 1 and c.ops["aten::bincount"] == 1
    with SyncCensus() as c:  # the sync-free spellings of the same work
        torch.zeros(12).scatter_add_(0, x, torch.ones(12))
        torch.where(x > 3, x, 0)
        torch.repeat_interleave(x, x, output_size=66)
        torch.repeat_interleave(x, 2)
        x.index_select(0, x[:3])
    assert not c.syncs, c.report()
    assert torch.Tensor.tolist is not None and x.tolist() == list(range(12))  # methods restored


def test_equalize_histograms_equal_bincount():
    """The scatter-add histogram gives torch.bincount's counts exactly (equalize's table is built from them)."""
    g = torch.Generator().manual_seed(0)
    for shape in ((7, 3, 32, 32), (2, 1, 5, 9), (3, 3, 64, 48)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        x[0] = 17  # a flat image: every count in one bin
        N, C = shape[:2]
        offsets = torch.arange(0, N * C * 256, 256).view(N * C, 1)
        ref = torch.bincount((x.reshape(N * C, -1).long() + offsets).view(-1), minlength=N * C * 256)
        assert torch.equal(A._histograms(x), ref.view(N * C, 256).float())


@pytest.mark.parametrize("policy", ["cifar10", "svhn", "imagenet", "rand"])
def test_augmentation_chunk_has_no_syncing_op(cuda_paths, policy):
    """A whole chunk (the per-sample part, then every step's mixing) on the CUDA path: nothing waits for the device.
    Host data becomes a tensor only for Random Erasing's host-drawn boxes (non-blocking copies on CUDA)."""
    cfg = make_config("baseline", {"aug.autoaugment": policy}).aug
    info = DATASETS["cifar10"]
    aug = BatchAugment(cfg, info.mean, info.std, 10, 0.1, torch.device("cpu"))
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (128,))
    aug.images(x[:8], 0)  # the cached tables are built outside the census, as in the first chunk of a run
    with SyncCensus() as c:
        out = aug.images(x, 3)
        for step in range(4):  # 4 steps of 32
            aug.targets(out[step * 32:(step + 1) * 32], y[step * 32:(step + 1) * 32], step)
    assert not c.syncs, c.report()
    assert set(c.created) <= {"augment.py:random_erasing"}, c.created
    assert c.ops["aten::scatter_add_"] or policy == "svhn"  # equalize ran (svhn's policy has it too, maybe unfired)


def _train_step(cfg, model, opt, aug, x_u8, y, loss_sum):
    def step(i):
        set_lr(opt, schedule_factor(i, 1000, 100, cfg.optim))
        xb, tb = aug.targets(x_u8[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8], i)
        loss = torch.sum(-tb * F.log_softmax(model(xb).float(), dim=1), dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum.add_(loss.detach())
    return step


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_training_step_has_no_syncing_op(cuda_paths, optim):
    """train.py's step (schedule, mixing, forward, backward, optimiser) with the CUDA choices: fused AdamW."""
    cfg = make_config("smoke", {"optim.name": optim})
    info = DATASETS["cifar10"]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cuda"))  # only picks fused AdamW; the tensors stay here
    if optim == "adamw":
        assert opt.param_groups[0]["fused"]
    aug = BatchAugment(cfg.aug, info.mean, info.std, 10, 0.1, torch.device("cpu"))
    x = aug.images(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), 0)
    loss_sum = torch.zeros(())
    step = _train_step(cfg, model, opt, aug, x, torch.randint(0, 10, (16,)), loss_sum)
    step(0)  # optimiser state created
    # timm's Muon keeps its fallback's step counters on the host (capturable=False) and reads them there.
    host = [s["step"] for s in opt.state.values() if optim == "muon" and "step" in s]
    with SyncCensus(host_tensors=host) as c:
        step(1)
    assert not c.syncs, c.report()
    # timm 1.0.31 reads each counter once per step, 1.0.28 (pyproject's lower bound) twice: host tensors, no sync.
    reads = sum(c.host_reads.values())
    assert (reads in (len(host), 2 * len(host))) if optim == "muon" else reads == 0, c.host_reads
    assert not c.created, c.created
    assert torch.isfinite(loss_sum)


def _muon_step_census(batched: bool, depth: int) -> tuple[SyncCensus, list[torch.Tensor]]:
    cfg = make_config("baseline", {"model.depth": depth, "optim.name": "muon", "optim.muon_batched": batched})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    matrices = opt.param_groups[0]["params"]  # the Muon group; the fallback groups run timm's code either way
    assert opt.param_groups[0]["kind"] == "muon" and len(matrices) == 6 * depth
    for i in range(2):
        torch.manual_seed(10 + i)
        for p in matrices:
            p.grad = torch.randn_like(p)
        if i:
            with SyncCensus() as c:
                opt.step()
        else:
            opt.step()
    return c, [p.detach().clone() for p in matrices]


def test_batched_muon_equals_timm_and_launches_far_fewer_ops():
    """Same-shape matrices stacked through one Newton-Schulz iteration: the matrices after two steps equal timm's
    matrix-by-matrix step, with a fraction of the ops (each op is a kernel launch on a GPU)."""
    timm_c, timm_p = _muon_step_census(False, 12)  # the baseline's depth: 72 matrices of 3 shapes
    ours_c, ours_p = _muon_step_census(True, 12)
    # Newton-Schulz runs in bfloat16 in both; a batched matmul may sum in another order than the 2-D ones, which
    # moves an entry of the orthogonalised update (|entries| < 1) by up to about one bf16 ulp (2^-8), times the
    # step lr 0.02 x scale sqrt(384 / 192); two steps. Measured: 7.8e-5 at depth 12, 0 at depth 4, on CPU.
    for a, b in zip(timm_p, ours_p):
        assert torch.allclose(a, b, rtol=0, atol=2 * 0.02 * 2 ** 0.5 * 2 ** -8), (a - b).abs().max()
    assert not ours_c.syncs and not timm_c.syncs
    assert ours_c.total * 10 < timm_c.total, (ours_c.total, timm_c.total)  # measured 138 against 2,414
    assert _muon_step_census(True, 2)[0].total == ours_c.total  # per shape, not per matrix: flat in depth
