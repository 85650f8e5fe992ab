from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import CUDA
from smallvit import optim
from smallvit.backbones import build_model
from smallvit.config import ConfigError, OptimConfig
from smallvit.experiments import make_config
from smallvit.optim import build_optimizer, lr_at, param_groups, schedule_factor


def test_schedule_matches_reference_trace():
    # reference §8: B=256 single process -> W = 5,850, T = 58,500, from 1e-6 to 1e-3 and back to 1e-6.
    T, W, peak, lo = 58_500, 5_850, 1e-3, 1e-6
    assert lr_at(0, T, W, peak, lo) == pytest.approx(1e-6)
    assert lr_at(W // 2, T, W, peak, lo) == pytest.approx(lo + (peak - lo) * 0.5)
    assert lr_at(W, T, W, peak, lo) == pytest.approx(peak)
    mid = W + (T - W) // 2
    assert lr_at(mid, T, W, peak, lo) == pytest.approx(lo + (peak - lo) * 0.5, rel=1e-6)
    assert lr_at(T - 1, T, W, peak, lo) == pytest.approx(lo, abs=1e-9)
    assert lr_at(T, T, W, peak, lo) == lo
    s = W + 1000
    want = lo + (peak - lo) * (1 + math.cos(math.pi * 1000 / (T - W))) / 2
    assert lr_at(s, T, W, peak, lo) == pytest.approx(want)


def test_train_uses_baseline_step_counts():
    from smallvit.data import steps_per_epoch

    assert steps_per_epoch(50_000, 3, 256) == 585
    assert steps_per_epoch(50_000, 3, 1024) == 146


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups():
    model = build_model(make_config("smoke").model)
    (g,) = param_groups(model, OptimConfig())
    assert len(g["params"]) == len(list(model.parameters())) and g["weight_decay"] == 0.05
    decay, nodecay = param_groups(model, OptimConfig(decay_all=False))
    assert nodecay["weight_decay"] == 0.0
    nd = _names(model, nodecay)
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias"} <= nd
    assert not any(n.endswith("weight") and "norm" not in n for n in nd)
    muon, adamw = param_groups(model, OptimConfig(name="muon"))
    mu = _names(model, muon)
    assert "blocks.0.mlp.fc1.weight" in mu and "blocks.0.attn.q.weight" in mu
    assert not ({"cls_token", "pos_embed", "patch_embed.weight", "head.weight"} & mu)
    assert all(model.get_parameter(n).ndim == 2 for n in mu)
    assert muon["peak_lr"] == 0.02 and adamw["peak_lr"] == 1e-3


@pytest.mark.parametrize("name", ["adamw", "lion", "muon"])
def test_optimizers_step_and_follow_schedule(name):
    model = build_model(make_config("smoke").model)
    cfg = OptimConfig(name=name)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    f = schedule_factor(10, 100, 20, cfg)
    for g in opt.param_groups:
        g["lr"] = g["peak_lr"] * f
    assert opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["peak_lr"] * f)


@pytest.mark.parametrize("fallback", ["adamw", "nadamw"])
def test_muon_fallback_is_the_configured_one(fallback):
    """timm's Muon sends a group with nesterov=True to NAdamW: optim.muon_fallback says which the non-matrix
    tensors get (adamw: torch's AdamW update, with timm Muon's betas and eps)."""
    torch.manual_seed(0)
    model = build_model(make_config("smoke").model)
    opt = build_optimizer(model, OptimConfig(name="muon", muon_fallback=fallback), torch.device("cpu"))
    muon, rest = opt.param_groups
    assert muon["nesterov"] and rest["nesterov"] == (fallback == "nadamw") and rest["kind"] == fallback
    ref_params = [p.detach().clone().requires_grad_() for p in rest["params"]]
    ref = torch.optim.AdamW(ref_params, lr=rest["lr"], betas=rest["betas"], eps=rest["eps"],
                            weight_decay=rest["weight_decay"])
    for p, q in zip(rest["params"], ref_params):
        p.grad = q.grad = torch.randn_like(p)
    opt.step()
    ref.step()
    same = all(torch.allclose(p, q, rtol=0, atol=1e-7) for p, q in zip(rest["params"], ref_params))
    assert same == (fallback == "adamw")


def test_muon_fallback_is_validated():
    from smallvit.config import ConfigError

    with pytest.raises(ConfigError, match="optim.muon_fallback must be one of adamw, nadamw"):
        make_config("baseline", {"optim.muon_fallback": "sgd"})


# ---- schedule shapes


def test_linear_and_wsd_schedules():
    T, W, peak, lo = 110, 10, 1.0, 0.0
    assert lr_at(5, T, W, peak, lo, "linear") == pytest.approx(0.5)  # the warm-up is shared
    assert lr_at(10, T, W, peak, lo, "linear") == pytest.approx(1.0)
    assert lr_at(60, T, W, peak, lo, "linear") == pytest.approx(0.5)
    assert lr_at(110, T, W, peak, lo, "linear") == 0.0
    # wsd with the last 20% of the 100 post-warm-up steps decaying: flat until step 90, then a line to 0 at 110
    assert [lr_at(s, T, W, peak, lo, "wsd", 0.2) for s in (10, 50, 90)] == pytest.approx([1.0, 1.0, 1.0])
    assert lr_at(100, T, W, peak, lo, "wsd", 0.2) == pytest.approx(0.5)
    assert lr_at(60, T, W, peak, lo) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))  # cosine stays default
    with pytest.raises(ConfigError, match="optim.schedule must be"):
        make_config("smoke", {"optim.schedule": "step"})
    with pytest.raises(ConfigError, match="decay_fraction"):
        make_config("smoke", {"optim.schedule": "wsd", "optim.decay_fraction": 0})


# ---- fused AdamW after a resume on another device (CUDA faked: every tensor stays on CPU)


def _adamw(device: torch.device):
    torch.manual_seed(0)
    model = build_model(make_config("smoke").model)
    return model, optim.build_optimizer(model, OptimConfig(), device)


def _step(model, opt):
    torch.manual_seed(2)  # drop path
    model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))).sum().backward()
    opt.step()
    opt.zero_grad()


def test_cpu_checkpoint_resumed_on_cuda_runs_fused():
    model, cpu_opt = _adamw(torch.device("cpu"))
    _step(model, cpu_opt)
    saved = copy.deepcopy(cpu_opt.state_dict())  # as written to and read from a checkpoint
    assert saved["param_groups"][0]["fused"] is False
    model2, opt = _adamw(CUDA)
    assert opt.param_groups[0]["fused"]
    model2.load_state_dict(model.state_dict())
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["fused"] is False  # what load_state_dict does: the saved group options come back
    optim.match_device(opt, CUDA)
    assert all(g["fused"] for g in opt.param_groups)
    steps = [s["step"] for s in opt.state.values()]
    assert steps and all(s.dtype == torch.float32 and float(s) == 1.0 for s in steps)
    _step(model2, opt)  # the fused kernel runs on the loaded state
    _step(model, cpu_opt)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the fused and the loop kernels agree
    optim.match_device(opt, torch.device("cpu"))  # and back: a CUDA checkpoint resumed on CPU
    assert not any(g["fused"] for g in opt.param_groups)
