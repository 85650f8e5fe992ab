import dataclasses
import pickle

import pytest
import torch

import smallvit
from conftest import HAVE_REAL, REAL_DATA, needs_real_cifar, smoke_config
from smallvit import data as D
from smallvit.config import ConfigError, key_choices
from smallvit.datasets import DATASETS


def test_reads_official_layout(fake_cifar):
    x, y = D.load("cifar10", str(fake_cifar), download=False, train=True)
    assert x.shape == (600, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    xt, _ = D.load("cifar10", str(fake_cifar / "cifar-10-batches-py"), download=False, train=False)
    assert xt.shape == (200, 3, 32, 32)


class _Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_checksum_mismatch_refuses_to_unpickle(fake_cifar, tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    (fake_cifar / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(evil))
    with pytest.raises(D.DataError, match="data_batch_3 has md5"):
        D.load("cifar10", str(fake_cifar), download=False)
    assert not marker.exists()


def test_truncated_file_is_reported(fake_cifar):
    p = fake_cifar / "cifar-10-batches-py" / "test_batch"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(D.DataError, match="corrupt or truncated"):
        D.load("cifar10", str(fake_cifar), download=False, train=False)


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(D.DataError) as e:
        D.load("cifar10", str(tmp_path / "nowhere"), download=False)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and "--data-dir" in msg and "data_batch_1" in msg


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SMALLVIT_DATA", str(tmp_path))
    assert D.resolve_data_dir("") == tmp_path
    assert D.resolve_data_dir("/x") == D.resolve_data_dir("/x")


def test_epoch_indices_modes():
    p = D.epoch_indices(10, 0, 0, 3, "passes", 5)
    assert len(p) == 30 and sorted(p[:10].tolist()) == list(range(10))  # each pass is a permutation
    b = D.epoch_indices(10, 0, 0, 3, "in_batch", 6)
    assert len(b) == 30 and torch.equal(b[0::3], b[1::3]) and torch.equal(b[0::3], b[2::3])
    assert torch.equal(D.epoch_indices(10, 4, 1, 3, "passes", 5), D.epoch_indices(10, 4, 1, 3, "passes", 5))
    assert not torch.equal(D.epoch_indices(10, 4, 1, 3, "passes", 5), D.epoch_indices(10, 5, 1, 3, "passes", 5))


@needs_real_cifar
def test_real_cifar10():
    x, y = D.load("cifar10", str(REAL_DATA), download=False, train=False)
    assert x.shape == (10_000, 3, 32, 32)
    assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(y).tolist() == [1000] * 10


def test_real_data_presence_is_reported():
    # Visible in the summary: the real-data tests are skipped, not silently passed, when the data is absent.
    if not HAVE_REAL:
        pytest.skip(f"real CIFAR-10 absent at {REAL_DATA}")


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
