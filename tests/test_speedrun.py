"""The speed-run ingredients as general options: average pooling, patch dropout, schedule shapes, progressive
resizing, flip test-time augmentation, and the wall-time records the speed run is judged by."""

import json
import math

import pytest
import torch

from conftest import REAL_DATA, needs_real_cifar, smoke_config
from smallvit import train
from smallvit.augment import resize, resolution_at
from smallvit.config import ConfigError, res_stages
from smallvit.experiments import make_config
from smallvit.backbones import build_model
from smallvit.optim import lr_at
from smallvit.runs import load_checkpoint, read_metrics


def _vit(**overrides):
    torch.manual_seed(0)
    return build_model(make_config("smoke", overrides).model)


# ---- no CLS token: global average pooling


def test_gap_reads_the_mean_of_the_normalised_patch_tokens():
    model = _vit(**{"model.num_cls_tokens": 0}).eval()
    assert model.cls_token is None and model.pos_embed.shape[1] == 64
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        t = model.tokens(x)
        assert t.shape == (3, 64, 32)
        for blk in model.blocks:
            t = blk(t)
        expected = model.head(model.norm(t).mean(1))
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="class_attn_depth needs CLS tokens"):
        make_config("smoke", {"model.num_cls_tokens": 0, "model.class_attn_depth": 1})
    with pytest.raises(ConfigError, match="num_cls_tokens must be >= 0"):
        make_config("smoke", {"model.num_cls_tokens": -1})


def test_gap_model_exports_to_timm_average_pooling():
    from smallvit.export import to_timm

    model = _vit(**{"model.num_cls_tokens": 0}).eval()
    tm = to_timm(model)
    assert tm.global_pool == "avg" and tm.cls_token is None
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tm(x), model(x), atol=1e-5, rtol=0)


# ---- patch dropout


def test_patch_dropout_keeps_a_random_subset_in_training_only():
    seen = []
    model = _vit(**{"model.patch_drop": 0.5})
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    torch.manual_seed(2)
    c = model(x)
    assert seen == [1 + 32] * 3  # the CLS token and half of the 64 patches
    assert torch.equal(a, b) and not torch.equal(a, c)  # a function of the global seed (train.py: of the step)
    full = _vit()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), full.eval()(x), atol=0, rtol=0)
    assert seen[-1] == 65
    with pytest.raises(ConfigError, match="patch_drop must be in"):
        make_config("smoke", {"model.patch_drop": 1.0})
    with pytest.raises(ConfigError, match="patch_drop.*not supported by model.arch=swin"):
        make_config("smoke", {"model.arch": "swin", "model.patch_drop": 0.25})


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


# ---- progressive resizing


def test_res_schedule_parsing_and_refusals():
    assert res_stages("16:0.25, 24:0.5") == ((16, 0.25), (24, 0.5))
    assert res_stages("") == ()
    assert [resolution_at(s, 100, ((16, 0.25), (24, 0.5)), 32) for s in (0, 24, 25, 49, 50, 99)] == \
        [16, 16, 24, 24, 32, 32]
    for bad, match in (("16", "SIZE:FRACTION"), ("16:0.5,24:0.25", "must increase"), ("18:0.5", "multiple of"),
                       ("40:0.5", "at most"), ("16:0", "must increase")):
        with pytest.raises(ConfigError, match=match):
            make_config("smoke", {"train.res_schedule": bad})
    with pytest.raises(ConfigError, match="needs model.arch=vit"):
        make_config("smoke", {"model.arch": "swin", "model.patch_size": 2, "train.res_schedule": "16:0.5"})


def test_resize_averages_when_shrinking():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    small = resize(x, 2)
    torch.testing.assert_close(small[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))  # 2x2 block means
    assert resize(x, 4) is x


def test_training_follows_the_res_schedule_and_resumes_exactly(fake_cifar, tmp_path, monkeypatch):
    import smallvit.model as M

    over = {"train.res_schedule": "16:0.3,24:0.6", "model.patch_drop": 0.25, "model.num_cls_tokens": 0,
            "optim.schedule": "linear", "train.eval_flip": True}
    sizes, tokens = [], M.ViT.tokens
    monkeypatch.setattr(M.ViT, "tokens", lambda self, x: sizes.append(x.shape[-1]) or tokens(self, x))
    full = smoke_config(fake_cifar, **over)
    r = train(full, tmp_path / "full")
    assert r["total_steps"] == 18
    # steps 0-5 at 16 px (0.3 * 18 = 5.4), steps 6-10 at 24 px, the rest (7 steps), the FLOP count and the
    # evaluations (each test batch and its mirror, after epochs 1 and 2) at 32 px
    assert [s for s in sizes if s != 32] == [16] * 6 + [24] * 5 and sizes.count(32) == 7 + 1 + 2 * 2
    train(smoke_config(fake_cifar, **over, **{"train.max_steps": 8}), tmp_path / "resumed")
    train(full, tmp_path / "resumed", resume=True)
    a, b = load_checkpoint(tmp_path / "full")["model"], load_checkpoint(tmp_path / "resumed")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- flip test-time augmentation and the wall-time records


def test_eval_flip_scores_the_mean_of_both_views(fake_cifar, tmp_path):
    from smallvit.evaluate import load, predict_logits
    from smallvit.data import load as load_data
    from smallvit.datasets import DATASETS

    cfg = smoke_config(fake_cifar, **{"train.eval_flip": True, "optim.lr": 3e-3})
    r = train(cfg, tmp_path / "run")
    model, _ = load(tmp_path / "run")
    x, y = load_data("cifar10", str(fake_cifar), False, train=False)
    info = DATASETS["cifar10"]
    logits = predict_logits(model, x, info.mean, info.std, tta_flip=True)
    assert r["final_test_acc"] == 100.0 * (logits.argmax(1) == y).sum().item() / len(y) > 20
    plain = predict_logits(model, x, info.mean, info.std)
    assert not torch.equal(plain, logits)


def test_wall_time_includes_data_loading_and_is_in_every_evaluation(fake_cifar, tmp_path):
    r = train(smoke_config(fake_cifar), tmp_path / "run")
    evals = [m for m in read_metrics(tmp_path / "run") if "test_acc" in m]
    walls = [m["wall_seconds"] for m in evals]
    assert walls == sorted(walls) and all(w >= m["train_seconds"] for w, m in zip(walls, evals))
    assert r["wall_seconds"] >= walls[-1] >= r["train_seconds"]
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["wall_seconds"] == r["wall_seconds"]


# ---- the speedrun preset, its ingredients and the benchmark


def test_each_speedrun_ablation_takes_back_exactly_its_ingredient():
    from smallvit.config import Config, diff
    from smallvit.experiments import ABLATIONS, SPEEDRUN_ABLATIONS, SPEEDRUN_INGREDIENTS, STUDIES

    recipe = make_config("speedrun")
    assert recipe.model.arch == "vit" and recipe.model.patch_size == 4  # a plain patch embedding, no conv stem
    assert STUDIES["speedrun"] == ["baseline", *SPEEDRUN_ABLATIONS] and not set(SPEEDRUN_ABLATIONS) & set(STUDIES["all"])
    for name, keys in SPEEDRUN_INGREDIENTS.items():
        assert all(diff(recipe)[k] == v for k, v in keys.items())  # the recipe holds the ingredient
        without = make_config("speedrun", ablation=f"-{name}")
        assert set(diff(without, recipe)) == set(keys)  # and the ablation undoes only that
        assert all(diff(without, Config()).get(k) is None for k in keys)
        assert f"-{name}" in ABLATIONS
        assert all(diff(make_config("speedrun-gpu"))[k] == v for k, v in keys.items())  # the GPU starting point too


@needs_real_cifar
def test_cpu_speedrun_benchmark_runs_the_recipe_and_its_ablations(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cpu_speedrun

    tiny = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "data.subset=600", "data.test_subset=200",
            "train.epochs=2", "train.batch_size=100", "train.threads=1"]
    out = tmp_path / "table.md"
    args = ["--root", str(tmp_path / "runs"), "--data-dir", str(REAL_DATA), "--val-images", "100", "--seeds", "2",
            "--ablations=baseline,-gap", "--set", *tiny, "--out", str(out)]
    assert cpu_speedrun.main(args) == 0
    text = out.read_text()
    assert "| speedrun (the recipe) | 1 |" in text and "| -gap (without it) | 1 |" in text
    assert "| **mean ± std** |" in text and text.count("| 0 |") == 1 and "| 1 |" in text
    val = json.loads((tmp_path / "runs" / "val" / "-gap" / "seed0" / "result.json").read_text())
    assert val["eval_split"] == "val" and val["val_images"] == 100 and "model.num_cls_tokens" not in val["overrides"]  # a CLS token again
    test = json.loads((tmp_path / "runs" / "test" / "seed1" / "result.json").read_text())
    assert test["eval_split"] == "test" and test["overrides"]["train.seed"] == 1
    evals = [m for m in read_metrics(tmp_path / "runs" / "test" / "seed1") if "test_acc" in m]
    assert len(evals) == 1  # the test set once, at the end
    assert cpu_speedrun.main(args) == 0 and out.read_text() == text  # finished runs are read, not rerun


def test_ema_of_the_weights_is_what_evaluations_and_commands_use_and_resumes_exactly(fake_cifar, tmp_path):
    from smallvit.data import load as load_data
    from smallvit.datasets import DATASETS
    from smallvit.evaluate import load, predict_logits
    from smallvit.pretrained import read_state_dict

    over = {"train.ema_decay": 0.9, "optim.lr": 3e-3}
    r = train(smoke_config(fake_cifar, **over), tmp_path / "full")
    state = load_checkpoint(tmp_path / "full")
    assert set(state["model_ema"]) == set(state["model"])
    assert any(not torch.equal(state["model_ema"][k], state["model"][k]) for k in state["model"])
    model, _ = load(tmp_path / "full")  # eval, export, predict and inspect load the EMA weights
    assert all(torch.equal(v, state["model_ema"][k]) for k, v in model.state_dict().items())
    x, y = load_data("cifar10", str(fake_cifar), False, train=False)
    info = DATASETS["cifar10"]
    logits = predict_logits(model, x, info.mean, info.std)
    assert r["final_test_acc"] == 100.0 * (logits.argmax(1) == y).sum().item() / len(y)
    weights, kind = read_state_dict(tmp_path / "full")  # train.init_from takes them too
    assert kind == "model_ema" and all(torch.equal(weights[k], state["model_ema"][k]) for k in weights)
    train(smoke_config(fake_cifar, **over, **{"train.max_steps": 7}), tmp_path / "resumed")
    train(smoke_config(fake_cifar, **over), tmp_path / "resumed", resume=True)
    resumed = load_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(resumed["model_ema"][k], state["model_ema"][k]) for k in state["model_ema"])
    with pytest.raises(ConfigError, match="ema_decay"):
        make_config("smoke", {"train.ema_decay": 1.0})
