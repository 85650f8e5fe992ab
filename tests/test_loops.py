"""The two loops (train.py, pretrain.py) share one run lifecycle (lifecycle.py): each test runs both, so that what
one of them once did alone (compile mode, the rank-0 download, the wall clock) cannot drift again; plus the
backbone interface (backbones.Backbone) on every arch and the weight-decay schedule's groups."""

import importlib
from dataclasses import replace

import pytest
import torch

from conftest import smoke_config
from smallvit import distributed as dist_
from smallvit import lifecycle
from smallvit import pretrain as P
from smallvit.backbones import ARCHS, Backbone, build_model
from smallvit.experiments import make_config
from smallvit.knn import knn_accuracy
from smallvit.optim import build_optimizer, resolve_lr
from smallvit.runs import read_metrics

TINY = {  # as tests/test_backbones.py
    "vit": {},
    "swin": {"model.arch": "swin", "model.embed_dim": 16, "model.patch_size": 2, "model.swin_depths": "1,2",
             "model.swin_heads": "1,2"},
    "cait": {"model.arch": "cait", "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2,
             "model.class_attn_depth": 1},
}
T = importlib.import_module("smallvit.train")  # the module (smallvit.train is also the function)
SSL = {"ssl.local_crops": 2, "ssl.out_dim": 64}


def _both(data, tmp_path, **over):
    """A 2-step train run and a 2-step pretrain run of the same settings; their results."""
    tr = T.train(smoke_config(data, **{"train.max_steps": 2, **over}), tmp_path / "train")
    pr = P.pretrain(smoke_config(data, **{"train.max_steps": 2, **SSL, **over}), tmp_path / "pretrain")
    return tr, pr


def test_both_loops_compile_through_the_one_torchrun_safe_mode(cifar, tmp_path, monkeypatch, one_thread):
    """Under torchrun, reduce-overhead (CUDA graphs) crashes a compiled DDP module: both loops ask
    distributed.compile_mode, so both get the graph-free mode (here as if two processes asked)."""
    asked, compiled = [], []
    monkeypatch.setattr(dist_, "compile_mode", lambda mode, world: (asked.append(mode), ("default", "note"))[1])
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: (compiled.append(mode), fn)[1])
    _both(cifar, tmp_path, **{"train.compile": True, "train.compile_mode": "reduce-overhead"})
    assert asked == ["reduce-overhead", "reduce-overhead"] and compiled == [None, None]


def test_both_loops_download_on_rank_0_before_every_rank_loads(cifar, tmp_path, monkeypatch, one_thread):
    """Both loops take the dataset's facts from lifecycle.dataset_info, which under torchrun lets rank 0 check and
    download the files before any rank reads them (Tiny-ImageNet pre-training without the files)."""
    calls = []
    real = lifecycle.dataset_info
    monkeypatch.setattr(T, "dataset_info", lambda cfg, world: (calls.append("train"), real(cfg, world))[1])
    monkeypatch.setattr(P, "dataset_info", lambda cfg, world: (calls.append("pretrain"), real(cfg, world))[1])
    _both(cifar, tmp_path)
    assert calls == ["train", "pretrain"]
    # what it does with two processes: rank 0 (here: on_rank0 runs it) loads with download=True first
    loads = []
    monkeypatch.setattr(lifecycle.dist_, "on_rank0", lambda fn, world: fn())
    monkeypatch.setattr(lifecycle.D, "load", lambda *a, **k: loads.append((a, k)) or True)
    monkeypatch.setattr(lifecycle.D, "dataset_meta", lambda *a, **k: "meta")
    cfg = smoke_config(cifar, **{"data.download": True})
    assert real(cfg, 2) == "meta" and loads == [(("cifar10", str(cifar), True), {"train": False})]
    loads.clear()
    real(cfg, 1)
    assert loads == []  # one process: D.load's own download, as before


def test_both_loops_time_from_set_up_and_every_evaluation_has_wall_seconds(cifar, tmp_path, one_thread):
    tr, pr = _both(cifar, tmp_path, **{"train.max_steps": 0, "train.epochs": 2, "train.eval_every_epochs": 1})
    for r, kind, key in ((tr, "train", "test_acc"), (pr, "pretrain", "knn_acc")):
        evals = [m for m in read_metrics(tmp_path / kind) if key in m]
        assert len(evals) >= 2 and all("wall_seconds" in m and "train_seconds" in m for m in evals), kind
        walls = [m["wall_seconds"] for m in evals]
        assert walls == sorted(walls) and r["wall_seconds"] >= walls[-1], kind
        # the wall clock starts before set-up: it holds the first step (and loading) besides the timed steps
        assert r["first_step_seconds"] > 0 and r["wall_seconds"] >= r["first_step_seconds"] + r["train_seconds"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_provides_the_backbone_interface(arch, one_thread):
    cfg = make_config("smoke", TINY[arch]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, Backbone), arch
    assert model.cfg is cfg and model.grid == cfg.img_size // cfg.patch_size and model.num_cls >= 0
    assert isinstance(model.no_weight_decay(), set)
    x = torch.randn(3, 3, cfg.img_size, cfg.img_size)
    model.eval()  # no drop path: the three calls see the same network
    f, pooled, logits = model.features(x), model.pooled(x), model(x)
    assert f.ndim == 3 and f.shape[0] == 3 and f.shape[1] == max(model.num_cls, 1)
    assert pooled.shape == (3, model.feature_dim) and logits.shape == (3, cfg.num_classes)
    headless = build_model(replace(cfg, num_classes=0)).eval()
    torch.testing.assert_close(headless(x), headless.pooled(x))  # without a classifier, the model is `pooled`
    model.train()
    model(x).square().mean().backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    backbone = build_model(replace(cfg, num_classes=0), any_size=True)  # DINO's: features, any view size
    assert backbone(x).shape == (3, backbone.feature_dim)
    assert backbone(torch.randn(2, 3, cfg.img_size // 2, cfg.img_size // 2)).shape == (2, backbone.feature_dim)


@pytest.mark.parametrize("arch", ["swin", "cait"])
def test_pretrain_and_knn_on_timms_backbones(arch, cifar, tmp_path, capsys, one_thread):
    """`smallvit pretrain --set model.arch=swin|cait` used to die on feature_dim / features (ViT only)."""
    from smallvit.cli import main

    r = P.pretrain(smoke_config(cifar, **{"train.max_steps": 2, **SSL, **TINY[arch]}), tmp_path / "p")
    assert r["status"] == "stopped_at_max_steps" and 0 <= r["final_knn_acc"] <= 100
    assert main(["knn", str(tmp_path / "p"), "--train-images", "64", "--test-images", "32", "--device", "cpu"]) == 0
    assert '"backbone": "teacher"' in capsys.readouterr().out
    model = build_model(make_config("smoke", TINY[arch]).model)
    x, y = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8), torch.arange(20) % 10
    assert 0 <= knn_accuracy(model, x, y, x, y, (0.5,) * 3, (0.25,) * 3, 10, k=3) <= 100


@pytest.mark.parametrize("fallback", ["adamw", "nadamw"])
def test_every_decayed_group_follows_the_weight_decay_schedule(fallback, cifar, tmp_path, one_thread):
    """Groups carry decay_scheduled (optim.param_groups); muon_fallback=nadamw once dropped its decayed group."""
    over = {"optim.name": "muon", "optim.muon_fallback": fallback, "optim.decay_all": False,
            "optim.weight_decay": 0.04, "ssl.weight_decay_end": 0.4}
    cfg = smoke_config(cifar, **{**SSL, **over})
    net = P.DINO(cfg)
    groups = build_optimizer(net, resolve_lr(cfg.optim, cfg.train.batch_size), torch.device("cpu")).param_groups
    flagged = {g["kind"] for g in groups if g["decay_scheduled"]}
    assert flagged == {fallback}  # the fallback's decayed group; not its no-decay group, not Muon's own decay
    P.pretrain(smoke_config(cifar, **{**SSL, **over, "train.max_steps": 3, "train.log_every_steps": 1}),
               tmp_path / "p")
    state = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    wd = [m["weight_decay"] for m in read_metrics(tmp_path / "p") if "weight_decay" in m]
    assert wd[0] == pytest.approx(0.04) and wd[-1] > wd[0]
    for g in state:
        if g["decay_scheduled"]:
            assert g["weight_decay"] == pytest.approx(wd[-1]), g["kind"]
        else:
            assert g["weight_decay"] in (0.0, cfg.optim.muon_weight_decay), g["kind"]
