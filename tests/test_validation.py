"""The held-out validation split: disjoint, stratified, the same for every training seed; the test set seen once."""

import json

import pytest
import torch

from conftest import smoke_config
from smallvit import data as D
from smallvit import train
from smallvit.cli import main
from smallvit.config import ConfigError
from smallvit.experiments import make_config
from smallvit.runs import read_metrics


def test_split_is_disjoint_stratified_and_fixed_by_its_own_seed():
    labels = torch.arange(10).repeat_interleave(torch.tensor([500, 500, 500, 500, 500, 500, 500, 500, 500, 437]))
    keep, val = D.val_split(labels, 1000)
    assert len(val) == 1000 and len(keep) == len(labels) - 1000
    assert not set(keep.tolist()) & set(val.tolist()) and len(set(val.tolist())) == 1000
    counts = torch.bincount(labels[val], minlength=10)
    shares = torch.bincount(labels, minlength=10) * 1000 / len(labels)
    assert ((counts - shares).abs() < 1).all()  # each class its share, to the image
    again, val2 = D.val_split(labels, 1000)
    assert torch.equal(val, val2) and torch.equal(keep, again)
    assert not torch.equal(D.val_split(labels, 1000, seed=1)[1], val)  # val_seed chooses, nothing else does
    with pytest.raises(ConfigError, match="val_images"):
        D.val_split(labels, len(labels))


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


def test_bad_split_sizes_are_refused(fake_cifar, tmp_path):
    with pytest.raises(ConfigError, match="data.val_images"):
        make_config("smoke", {"data.val_images": -1})
    with pytest.raises(ConfigError, match="data.val_images=600"):
        make_config("smoke", {"data.val_images": 600, "data.subset": 600})
    with pytest.raises(ConfigError, match="between 1 and 599"):
        train(smoke_config(fake_cifar, **{"data.val_images": 600}), tmp_path / "r")


def test_study_with_a_split_reports_validation_and_test(fake_cifar, tmp_path, monkeypatch, capsys):
    from smallvit.experiments import STUDIES

    monkeypatch.setitem(STUDIES, "tiny", ["baseline", "-mixup"])
    root = tmp_path / "studies"
    sets = [f"data.data_dir={fake_cifar}", "data.download=false", "data.subset=0", "data.test_subset=0",
            "train.max_steps=4", "aug.autoaugment=none", "data.val_images=100", "train.threads=1"]
    assert main(["ablate", "tiny", "--preset", "smoke", "--seeds", "2", "--root", str(root), "--set", *sets]) == 0
    assert main(["report", str(root / "tiny")]) == 0
    table = (root / "tiny" / "report.md").read_text()
    assert "val acc % (mean ± std)" in table and "test acc % (mean ± std)" in table
    row = next(line for line in table.splitlines() if line.startswith("| baseline"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[3] == "2" and "±" in cells[4] and "±" in cells[5]
