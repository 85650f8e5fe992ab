"""The dataset records (datasets.py): presets and class names, facts that agree with the readers, and a new
dataset in a known format as one record."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import smallvit
from conftest import smoke_config
from smallvit import data as D
from smallvit.config import ConfigError, key_choices
from smallvit.datasets import DATASETS
from smallvit.experiments import make_config


def test_dataset_presets_and_names():
    assert make_config("cifar100").model.num_classes == 100 and make_config("cifar100").data.dataset == "cifar100"
    svhn = make_config("svhn")
    assert (svhn.data.dataset, svhn.aug.autoaugment, svhn.aug.flip) == ("svhn", "svhn", False)
    with pytest.raises(ConfigError, match="data.dataset"):
        make_config("smoke", {"data.dataset": "imagenet"})
    names = DATASETS["cifar100"].class_names
    assert len(names) == len(set(names)) == 100 and list(names) == sorted(names)
    assert D.dataset_meta("cifar100").class_names[:3] == ("apple", "aquarium_fish", "baby")


def test_dataset_facts_agree_with_the_reader():
    """One record per dataset (datasets.py) is what the checks and the readers both read; its facts agree."""
    from smallvit import data as D

    for name, info in DATASETS.items():
        assert info.name == name and info.kind in D.READERS
        assert not info.class_names or len(info.class_names) == info.num_classes
        # image files are decoded at model.img_size; arrays (pickle, mat) are stored at their size
        assert info.resized == (info.kind not in ("pickle", "mat"))


@pytest.mark.slow
def test_a_new_dataset_is_one_registry_record(fake_cifar, tmp_path, one_thread):
    """A dataset in a format smallvit reads needs one record and nothing else: registered, it is a choice of
    data.dataset, the checks read its facts, it loads and a run trains on it; removed, it is refused again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(DATASETS, "cifar10-copy", dataclasses.replace(DATASETS["cifar10"], name="cifar10-copy"))
        assert "cifar10-copy" in key_choices("data.dataset")
        with pytest.raises(ConfigError, match="data.dataset=cifar10-copy has 10 classes"):
            smoke_config(fake_cifar, **{"data.dataset": "cifar10-copy", "model.num_classes": 100})
        x, y = D.load("cifar10-copy", str(fake_cifar), download=False, train=False)
        assert x.shape == (200, 3, 32, 32) and torch.equal(y, D.load("cifar10", str(fake_cifar), download=False,
                                                                      train=False)[1])
        cfg = smoke_config(fake_cifar, **{"data.dataset": "cifar10-copy", "train.max_steps": 2})
        assert smallvit.train(cfg, tmp_path / "run")["step"] == 2
        assert smallvit.load(tmp_path / "run").class_names == DATASETS["cifar10"].class_names
    assert "cifar10-copy" not in DATASETS
    with pytest.raises(ConfigError, match="data.dataset must be one of cifar10, .*got 'cifar10-copy'"):
        smoke_config(fake_cifar, **{"data.dataset": "cifar10-copy"})
