import importlib
import json

import pytest
import torch

from conftest import REAL_DATA, needs_real_cifar, smoke_config
from smallvit import train
from smallvit.cli import main
from smallvit.runs import CheckpointError, load_checkpoint, read_metrics


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


def _json_tail(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def test_cli_train_eval_info(fake_cifar, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--preset", "smoke", "--data-dir", str(fake_cifar), "--set", "data.download=false",
            "data.subset=0", "data.test_subset=0", "train.max_steps=3"]
    assert main(["train", *args, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data-dir", str(fake_cifar), "--tta-flip"]) == 0
    report = _json_tail(capsys.readouterr().out)
    assert 0 <= report["test_acc"] <= 100 and "test_acc_tta_flip" in report and len(report["per_class_acc"]) == 10
    assert (out / "confusion.png").stat().st_size > 1000
    assert main(["info", "--ablation", "mla-q"]) == 0
    info = _json_tail(capsys.readouterr().out)
    assert info["params"] == 3_441_226 and info["diff_from_baseline"] == {"model.latent": "q"}
    assert main(["info", "--ablation", "-aa"]) == 0  # a name that starts with a dash is still a value
    assert _json_tail(capsys.readouterr().out)["diff_from_baseline"] == {"aug.autoaugment": "none"}
    assert main(["info", "--set", "model.depth=9", "--set", "model.drop_path=0", "optim.lr=0.002"]) == 0
    assert _json_tail(capsys.readouterr().out)["diff_from_baseline"] == {  # repeated --set flags add up
        "model.depth": 9, "model.drop_path": 0.0, "optim.lr": 0.002}
    assert main(["train", *args, "--set", "model.bogus=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


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
