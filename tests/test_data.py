import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import smallvit
from conftest import (
    HAVE_REAL,
    REAL_DATA,
    SHORT_RUN,
    json_out,
    make_images,
    needs_real_cifar,
    smoke_config,
    use_checksums,
)
from smallvit import data as D
from smallvit.cli import main
from smallvit.config import ConfigError
from smallvit.datasets import DATASETS
from smallvit.evaluate import evaluate_run
from smallvit.experiments import make_config


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


# ---- the held-out validation split


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


# ---- SVHN's .mat files and image folders


def _write_svhn(root, n_train=96, n_test=40):
    from scipy.io import savemat

    folder = root / "svhn"
    folder.mkdir(parents=True)
    x, y = make_images(n_train + n_test, 3)
    sums = {}
    for name, sl in (("train_32x32.mat", slice(0, n_train)), ("test_32x32.mat", slice(n_train, None))):
        lab = np.where(y[sl] == 0, 10, y[sl]).astype(np.uint8)[:, None]  # the official files write 0 as 10
        savemat(folder / name, {"X": x[sl].transpose(2, 3, 1, 0), "y": lab})
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return x, y, sums


def test_svhn_reads_the_official_mat_files(tmp_path, monkeypatch):
    x, y, sums = _write_svhn(tmp_path)
    with pytest.raises(D.DataError, match="train_32x32.mat has md5"):
        D.load("svhn", str(tmp_path), download=False)  # the official checksums refuse the fake files
    use_checksums(monkeypatch, "svhn", sums)
    xs, ys = D.load("svhn", str(tmp_path), download=False, train=True)
    assert xs.shape == (96, 3, 32, 32) and xs.dtype == torch.uint8
    assert torch.equal(xs, torch.from_numpy(x[:96])) and torch.equal(ys, torch.from_numpy(y[:96]))
    xt, yt = D.load("svhn", str(tmp_path / "svhn"), download=False, train=False)  # the folder itself works too
    assert xt.shape == (40, 3, 32, 32) and yt.min() >= 0 and yt.max() <= 9
    with pytest.raises(D.DataError, match="ufldl.stanford.edu"):
        D.load("svhn", str(tmp_path / "none"), download=False)


@pytest.mark.slow
def test_svhn_end_to_end(tmp_path, monkeypatch, capsys):
    _, _, sums = _write_svhn(tmp_path / "data")
    use_checksums(monkeypatch, "svhn", sums)
    cfg = make_config("svhn", {"model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2, "train.epochs": 2,
                               "optim.warmup_epochs": 1, "train.batch_size": 32, "train.max_steps": 2,
                               "train.progress": False, "data.data_dir": str(tmp_path / "data"),
                               "data.download": False})
    assert cfg.aug.autoaugment == "svhn" and not cfg.aug.flip and cfg.data.dataset == "svhn"
    r = smallvit.train(cfg, tmp_path / "run")
    assert r["step"] == 2
    report = evaluate_run(tmp_path / "run", device="cpu")
    assert report["dataset"] == "svhn" and report["n"] == 40
    assert smallvit.load(tmp_path / "run").preprocess.mean.tolist() == pytest.approx(DATASETS["svhn"].mean)


def _write_folder(root, classes=("dog", "cat", "bird"), n_train=4, n_val=2):
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = 20 + 7 * i, 30 + 3 * ci  # odd sizes, resized on load
                arr = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                arr[..., ci] += 150
                ext = ".jpg" if i == 1 else ".png"
                Image.fromarray(arr).convert("L" if i == 2 else "RGB").save(root / split / c / f"{i}{ext}")


def test_image_folder_dataset(tmp_path):
    _write_folder(tmp_path)
    x, y, classes = D.load_folder(tmp_path, "train", 16)
    assert classes == ("bird", "cat", "dog") and x.shape == (12, 3, 16, 16) and x.dtype == torch.uint8
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    xv, yv = D.load("folder", str(tmp_path), train=False, img_size=16)
    assert xv.shape == (6, 3, 16, 16) and yv.tolist() == [0, 0, 1, 1, 2, 2]
    meta = D.dataset_meta("folder", str(tmp_path), 16)
    xf = x.double() / 255
    assert meta.num_classes == 3 and meta.class_names == classes
    assert meta.mean == pytest.approx(xf.mean((0, 2, 3)).tolist(), abs=1e-4)
    assert meta.std == pytest.approx(xf.transpose(0, 1).reshape(3, -1).std(1).tolist(), abs=1e-4)
    (tmp_path / "stats.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    assert D.dataset_meta("folder", str(tmp_path), 16).std == (0.25, 0.25, 0.25)  # given statistics win
    (tmp_path / "val" / "fish").mkdir()
    with pytest.raises(D.DataError, match="fish"):
        D.load("folder", str(tmp_path), train=False)
    with pytest.raises(D.DataError, match="train/<class>"):
        D.load("folder", str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_image_folder_end_to_end(tmp_path, capsys):
    _write_folder(tmp_path / "pets")
    over = {**SHORT_RUN, "data.dataset": "folder", "model.img_size": 16, "model.num_classes": 3, "train.batch_size": 4,
            "train.max_steps": 2}
    with pytest.raises(ConfigError, match="3 classes"):
        smallvit.train(smoke_config(tmp_path / "pets", **{**over, "model.num_classes": 10}), tmp_path / "bad")
    r = smallvit.train(smoke_config(tmp_path / "pets", **over), tmp_path / "run")
    assert r["step"] == 2
    p = smallvit.load(tmp_path / "run")
    assert p.class_names == ("bird", "cat", "dog") and p.preprocess.img_size == 16
    img = str(tmp_path / "pets" / "val" / "cat" / "1.jpg")
    assert main(["predict", str(tmp_path / "run"), img, "--json"]) == 0
    assert {t["class"] for t in json_out(capsys.readouterr().out)[0]["top"]} == {"bird", "cat", "dog"}
