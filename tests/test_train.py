"""train() end to end on tiny data: records, determinism, resume, the speed-run options in training
(progressive resizing, flip TTA, wall time, EMA), the validation split, the compile and bf16 paths, and where the
loop waits for the device."""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import CUDA, REAL_DATA, needs_real_cifar, smoke_config
from smallvit import data as D
from smallvit import optim, train
from smallvit.config import ConfigError
from smallvit.experiments import make_config
from smallvit.runs import CheckpointError, load_checkpoint, read_metrics

pytestmark = pytest.mark.slow  # every test here runs a training


def test_loss_falls_and_records_are_written(fake_cifar, tmp_path):
    cfg = smoke_config(fake_cifar, **{"train.epochs": 6, "aug.autoaugment": "none", "aug.mixup": False,
                                      "aug.cutmix": False, "aug.erase_p": 0.0, "optim.lr": 3e-3})
    out = tmp_path / "run"
    result = train(cfg, out)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert result["step"] == 6 * (600 // 64) == 54
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert result["final_test_acc"] > 20  # twice chance on the toy classes
    for f in ("config.json", "overrides.json", "env.json", "metrics.jsonl", "result.json", "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert json.loads((out / "result.json").read_text())["final_test_acc"] == result["final_test_acc"]
    evals = [r for r in read_metrics(out) if "test_acc" in r]
    assert [r["step"] for r in evals] == [9 * e for e in range(1, 7)]  # every epoch, including the last
    env = json.loads((out / "env.json").read_text())
    assert {"torch", "git", "device"} <= set(env)


def test_same_seed_same_loss(fake_cifar, tmp_path):
    cfg = smoke_config(fake_cifar, **{"train.max_steps": 6})
    a, b = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
    la = [r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert la == lb and a["final_test_acc"] == b["final_test_acc"]
    c = train(smoke_config(fake_cifar, **{"train.max_steps": 6, "train.seed": 1}), tmp_path / "c")
    assert [r["loss"] for r in read_metrics(tmp_path / "c") if "loss" in r] != la
    assert c["step"] == 6


def test_resume_matches_uninterrupted(fake_cifar, tmp_path):
    full = smoke_config(fake_cifar)
    train(full, tmp_path / "full")
    part = smoke_config(fake_cifar, **{"train.max_steps": 11})
    r1 = train(part, tmp_path / "resumed")
    assert r1["status"] == "stopped_at_max_steps" and r1["step"] == 11
    with pytest.raises(CheckpointError, match="--resume"):
        train(full, tmp_path / "resumed")  # never overwrite a run by accident
    r2 = train(full, tmp_path / "resumed", resume=True)
    assert r2["step"] == r2["total_steps"]
    a = load_checkpoint(tmp_path / "full")["model"]
    b = load_checkpoint(tmp_path / "resumed")["model"]
    assert all((a[k] == b[k]).all() for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert steps == sorted(set(steps))  # no duplicated records after the resume


def test_resume_with_a_different_model_is_refused(fake_cifar, tmp_path):
    train(smoke_config(fake_cifar, **{"train.max_steps": 2}), tmp_path / "r")
    with pytest.raises(CheckpointError, match="different config"):
        train(smoke_config(fake_cifar, **{"model.depth": 3}), tmp_path / "r", resume=True)


@needs_real_cifar
def test_real_cifar10_short_run(tmp_path):
    cfg = smoke_config(REAL_DATA, **{"data.subset": 2048, "data.test_subset": 1000, "train.max_steps": 20})
    r = train(cfg, tmp_path / "real")
    assert r["step"] == 20 and 0 <= r["final_test_acc"] <= 100


def test_checkpoint_carries_the_dataset_facts(fake_cifar, tmp_path, monkeypatch):
    import smallvit
    from smallvit import data as D

    out = tmp_path / "r"
    train(smoke_config(fake_cifar, **{"train.max_steps": 2}), out)
    saved = load_checkpoint(out)["dataset"]
    assert saved["num_classes"] == 10 and saved["class_names"][0] == "airplane" and len(saved["mean"]) == 3

    def gone(*args, **kwargs):
        raise D.DataError("the dataset folder moved")

    monkeypatch.setattr(D, "dataset_meta", gone)  # e.g. an image folder that is not there any more
    model, preprocess, names = smallvit.load(out)
    assert names == tuple(saved["class_names"]) and preprocess.mean.tolist() == pytest.approx(saved["mean"])


@pytest.mark.parametrize("chunk_images, sizes", [(192, [192] * 6), (0, [512, 512, 128]), (1, [64] * 18)])
def test_augmentation_runs_once_per_chunk_of_steps(fake_cifar, tmp_path, monkeypatch, chunk_images, sizes):
    """aug.chunk_images batches whole steps into one augmentation call (0 = auto: 512 images on CPU)."""
    T = importlib.import_module("smallvit.train")  # the module; smallvit.train is also the function

    calls = []

    class Counting(T.BatchAugment):
        def images(self, x, key):
            calls.append((x.shape[0], key))
            return super().images(x, key)

    monkeypatch.setattr(T, "BatchAugment", Counting)
    result = train(smoke_config(fake_cifar, **{"aug.chunk_images": chunk_images}), tmp_path / "r")  # 2 x 9 steps
    assert result["step"] == 18
    assert [n for n, _ in calls] == sizes and [k for _, k in calls] == list(range(len(sizes)))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert T.chunk_steps(0, 64, cuda) == 64 and T.chunk_steps(100, 64, cpu) == 1 and T.chunk_steps(0, 64, cpu) == 8
    assert T.chunk_steps(0, 16, cuda, 3 * 224 * 224) == 6 and T.chunk_steps(0, 64, cpu, 3 * 224 * 224) == 1


# ---- speed-run options in training: progressive resizing, flip TTA, wall time, EMA


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


# ---- the held-out validation split in training


def test_training_seed_does_not_move_the_split(fake_cifar, tmp_path, monkeypatch):
    held = []
    real = D.val_split

    def spy(labels, n, seed=0):
        keep, val = real(labels, n, seed)
        held.append(val.tolist())
        return keep, val

    monkeypatch.setattr(D, "val_split", spy)
    for seed in (0, 3):
        train(smoke_config(fake_cifar, **{"data.val_images": 100, "train.seed": seed, "train.max_steps": 2}),
              tmp_path / f"s{seed}")
    assert len(held) == 2 and held[0] == held[1]


def test_validation_during_training_and_the_test_set_once_at_the_end(fake_cifar, tmp_path):
    cfg = smoke_config(fake_cifar, **{"data.val_images": 100, "train.epochs": 3})
    out = tmp_path / "run"
    result = train(cfg, out)
    rec = read_metrics(out)
    vals = [r for r in rec if "val_acc" in r]
    tests = [r for r in rec if "test_acc" in r]
    spe = 500 // 64  # 600 training images minus 100 held out, batch 64
    assert [r["step"] for r in vals] == [spe, 2 * spe, 3 * spe]
    assert len(tests) == 1 and tests[0]["step"] == 3 * spe  # the test set, exactly once, at the end
    assert result["eval_split"] == "val" and result["best_test_acc"] is None
    assert result["final_val_acc"] == vals[-1]["val_acc"]
    assert result["best_val_acc"] == max(r["val_acc"] for r in vals)
    assert result["final_test_acc"] == tests[0]["test_acc"]
    assert json.loads((out / "result.json").read_text())["val_images"] == 100


def test_paper_protocol_is_unchanged_without_a_split(fake_cifar, tmp_path):
    result = train(smoke_config(fake_cifar), tmp_path / "run")
    assert result["eval_split"] == "test" and "final_val_acc" not in result
    assert len([r for r in read_metrics(tmp_path / "run") if "test_acc" in r]) == 2  # every epoch, as the paper
    assert make_config("baseline").data.val_images == 0


# ---- the device's optimiser options after a resume


def test_train_resume_sets_this_devices_optimizer_options(fake_cifar, tmp_path, monkeypatch):
    """train() puts the device's fused choice back after loading the checkpoint (seen in the next checkpoint)."""
    out = tmp_path / "r"
    T.train(smoke_config(fake_cifar, **{"train.max_steps": 2}), out)
    assert load_checkpoint(out)["optimizer"]["param_groups"][0]["fused"] is False
    monkeypatch.setattr(T, "match_device", lambda opt, device: optim.match_device(opt, CUDA))  # as if on CUDA
    T.train(smoke_config(fake_cifar, **{"train.max_steps": 3}), out, resume=True)
    assert load_checkpoint(out)["optimizer"]["param_groups"][0]["fused"] is True


# ---- torch.compile, bf16 autocast, and where the loop waits for the device (CPU)


T = importlib.import_module("smallvit.train")  # the module: `import smallvit.train` gives the re-exported function


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()  # compiled graphs hold the test's model; do not let them pile up across tests


@pytest.mark.slow  # about 40 s on 2 CPU cores with a cold inductor cache, 3 s warm
def test_compiled_run_matches_eager(fake_cifar, tmp_path):
    kw = {"train.max_steps": 3, "train.log_every_steps": 1, "data.test_subset": 64}
    eager = train(smoke_config(fake_cifar, **kw), tmp_path / "eager")
    comp = train(smoke_config(fake_cifar, **kw, **{"train.compile": True}), tmp_path / "compiled")
    assert comp["status"] == "stopped_at_max_steps" and comp["step"] == 3
    assert comp["first_step_seconds"] > eager["first_step_seconds"] > 0  # compilation is reported, not timed
    le, lc = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(lc) == 3 and all(math.isfinite(v) for v in lc)
    assert lc == pytest.approx(le, rel=1e-3)  # the same steps: inductor only reorders floating-point sums
    assert comp["final_test_acc"] == pytest.approx(eager["final_test_acc"], abs=100 / 64 + 1e-9)  # <= 1 image


def test_bf16_autocast_on_cpu(fake_cifar, tmp_path):
    kw = {"train.max_steps": 2, "train.log_every_steps": 1, "data.test_subset": 64}
    fp32 = train(smoke_config(fake_cifar, **kw, **{"train.precision": "fp32"}), tmp_path / "fp32")
    bf16 = train(smoke_config(fake_cifar, **kw, **{"train.precision": "bf16"}), tmp_path / "bf16")
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
    l32, l16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert all(math.isfinite(v) for v in l16) and math.isfinite(bf16["final_test_acc"])
    assert l16[0] != l32[0]  # autocast really ran in bf16 ...
    assert l16[0] == pytest.approx(l32[0], rel=0.02)  # ... and step 0 (same data, same init) agrees to bf16 precision


# Tensor methods that copy a value to the host, i.e. wait for the device on CUDA.
SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def _count_host_syncs(monkeypatch) -> Counter:
    """Count syncing Tensor calls by the (file, function) that made them."""
    calls: Counter = Counter()
    for name in SYNCING:
        orig = getattr(torch.Tensor, name)

        def counted(self, *args, _orig=orig, **kwargs):
            caller = sys._getframe(1).f_code
            calls[(Path(caller.co_filename).name, caller.co_name)] += 1
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def _run_for_syncs(fake_cifar, tmp_path, monkeypatch) -> tuple[Counter, int]:
    # 2 epochs of 9 steps; one log, one evaluation and one checkpoint, all at the last step.
    cfg = smoke_config(fake_cifar, **{"train.epochs": 2, "train.eval_every_epochs": 0, "train.log_every_steps": 1000,
                                      "data.test_subset": 64})
    calls = _count_host_syncs(monkeypatch)
    result = train(cfg, tmp_path / "run")
    return calls, result["step"]


def test_loop_syncs_only_at_log_and_eval_points(fake_cifar, tmp_path, monkeypatch):
    calls, steps = _run_for_syncs(fake_cifar, tmp_path, monkeypatch)
    assert steps == 18
    by_file = Counter()
    for (file, _), n in calls.items():
        by_file[file] += n
    # The CPU policy (deliberate): the loss is checked for NaN/inf every step, through any_rank.
    assert calls[("distributed.py", "any_rank")] == steps
    # the loop's own code: train.py and the run-lifecycle helpers it calls (lifecycle.py)
    loop = (by_file["train.py"] + by_file["lifecycle.py"] + by_file["distributed.py"]
            - calls[("distributed.py", "any_rank")])
    assert loop <= 8, calls  # log stats, evaluation, the checkpoint's finite check: a constant, not per step
    assert by_file["autoaugment.py"] <= steps, calls  # its documented one sync per batch (op counts to the host)
    assert by_file["augment.py"] + by_file["model.py"] + by_file["optim.py"] == 0, calls


def test_cuda_policy_has_no_per_step_sync(fake_cifar, tmp_path, monkeypatch):
    """With the GPU policy (check at log points only), no step of the loop itself waits for the device."""
    monkeypatch.setattr(T, "check_each_step", lambda device, on_nonfinite: False)
    calls, steps = _run_for_syncs(fake_cifar, tmp_path, monkeypatch)
    assert calls[("distributed.py", "any_rank")] == 0
    loop_files = ("train.py", "lifecycle.py", "distributed.py")
    assert sum(n for (file, _), n in calls.items() if file in loop_files) <= 8, calls


@pytest.mark.parametrize("mode, expected", [("default", None), ("reduce-overhead", "reduce-overhead")])
def test_compile_mode_reaches_torch_compile(fake_cifar, tmp_path, monkeypatch, mode, expected):
    """train.compile_mode is passed to torch.compile (reduce-overhead = CUDA graphs on a GPU); bad modes are refused."""
    seen = []

    def fake_compile(model, mode=None):
        seen.append(mode)
        return model

    monkeypatch.setattr(T.torch, "compile", fake_compile)
    train(smoke_config(fake_cifar, **{"train.max_steps": 1, "train.compile": True, "train.compile_mode": mode,
                                      "data.test_subset": 64}), tmp_path / "r")
    assert seen == [expected]
    with pytest.raises(ConfigError, match="train.compile_mode must be one of default, reduce-overhead"):
        smoke_config(fake_cifar, **{"train.compile_mode": "fast"})
