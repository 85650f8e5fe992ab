"""Tiny-ImageNet and CINIC-10 from files written here in the official layouts (no network)."""

import dataclasses
import hashlib
import os
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import smallvit
from smallvit import data as D
from smallvit import imagesets as S
from smallvit.cli import main
from smallvit.datasets import DATASETS
from smallvit.evaluate import evaluate_run
from smallvit.experiments import make_config

WNIDS = ["n09999999", "n01443537", "n02123045"]  # wnids.txt is not sorted; labels follow the sorted order
WORDS = {"n01443537": "goldfish, Carassius auratus", "n02123045": "tabby, tabby cat", "n09999999": "volcano",
         "n00001740": "entity"}


def _img(rng, size, label, path, fmt):
    arr = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    arr[..., label % 3] += 150  # learnable: one colour per class
    Image.fromarray(arr).save(path, fmt)


def write_tiny_imagenet(root, n_train=4, n_val=2, size=64, wnids=WNIDS, words=WORDS):
    """The layout of tiny-imagenet-200.zip, with JPEGs; returns the folder."""
    f = root / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    (f / "val" / "images").mkdir(parents=True)
    (f / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (f / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in words.items()))
    lines = []
    for w in wnids:
        label = sorted(wnids).index(w)
        (f / "train" / w / "images").mkdir(parents=True)
        (f / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(n_train):
            _img(rng, size, label, f / "train" / w / "images" / f"{w}_{i}.JPEG", "JPEG")
        for _ in range(n_val):
            name = f"val_{len(lines)}.JPEG"
            _img(rng, size, label, f / "val" / "images" / name, "JPEG")
            lines.append(f"{name}\t{w}\t0\t0\t{size - 1}\t{size - 1}")
    (f / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (f / "test" / "images").mkdir(parents=True)  # unlabelled in the official archive: never read
    return f


def write_cinic(root, n=(6, 2, 3), size=32):
    """The layout of CINIC-10.tar.gz (train / valid / test / <class> / *.png); returns the folder."""
    rng = np.random.default_rng(1)
    for split, k in zip(("train", "valid", "test"), n):
        for label, c in enumerate(DATASETS["cinic10"].class_names):
            (root / split / c).mkdir(parents=True)
            for i in range(k):
                _img(rng, size, label, root / split / c / f"cifar10-{split}-{i}.png", "PNG")
    return root


def _set(monkeypatch, name, **facts):
    """Replace some facts of a dataset's registry record for the test."""
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], **facts))


@pytest.fixture
def counts(monkeypatch):
    _set(monkeypatch, "tinyimagenet", train_images=12, test_images=6)
    _set(monkeypatch, "cinic10", train_images=60, test_images=30)


def _set_md5(monkeypatch, name, archive):
    _set(monkeypatch, name, archive_md5=hashlib.md5(archive.read_bytes()).hexdigest())


def zipped_tiny_imagenet(tmp_path):
    """(data folder, archive): only tiny-imagenet-200.zip, laid out as the official one, in tmp_path/data."""
    src = write_tiny_imagenet(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    archive = data / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(src.rglob("*")):
            z.write(p, p.relative_to(src.parent))
    return data, archive


def test_tiny_imagenet_official_layout(tmp_path, counts):
    f = write_tiny_imagenet(tmp_path)
    x, y = D.load("tinyimagenet", str(tmp_path), download=False, train=True, img_size=64)
    assert x.shape == (12, 3, 64, 64) and x.dtype == torch.uint8 and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    xv, yv = D.load("tinyimagenet", str(f), download=False, train=False, img_size=64)  # the folder itself works too
    assert xv.shape == (6, 3, 64, 64) and yv.tolist() == [2, 2, 0, 0, 1, 1]  # from val_annotations.txt
    assert (xv[yv == 0].float().mean((0, 2, 3)).argmax()) == 0  # images match their labels (class 0 is red)
    meta = D.dataset_meta("tinyimagenet", str(tmp_path))
    assert meta.class_names == ("goldfish", "tabby", "volcano") and meta.num_classes == 200
    assert D.load("tinyimagenet", str(tmp_path), download=False, img_size=32)[0].shape == (12, 3, 32, 32)
    assert D.verify("tinyimagenet", tmp_path, download=False) == f  # the same entry point as the other datasets


def test_decoded_cache_is_used_and_invalidated_when_files_change(tmp_path, counts, monkeypatch):
    f = write_tiny_imagenet(tmp_path)
    x1, _ = D.load("tinyimagenet", str(tmp_path), download=False, img_size=64)
    caches = list((f / S.CACHE).glob("train-64px-*.npz"))
    assert len(caches) == 1
    decode = S._decode
    monkeypatch.setattr(S, "_decode", lambda *a: pytest.fail("decoded again although nothing changed"))
    assert torch.equal(D.load("tinyimagenet", str(tmp_path), download=False, img_size=64)[0], x1)
    monkeypatch.setattr(S, "_decode", decode)
    p = f / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_0.JPEG"  # label 0, the first image
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(p, "JPEG")
    os.utime(p, ns=(1, 1))
    x2, _ = D.load("tinyimagenet", str(tmp_path), download=False, img_size=64)
    assert x2[0].max() < 10 and not torch.equal(x2[0], x1[0]) and torch.equal(x2[1:], x1[1:])
    assert list((f / S.CACHE).glob("train-64px-*.npz")) != caches and len(list((f / S.CACHE).glob("train-*"))) == 1


def test_zip_is_checked_then_unpacked_and_a_corrupt_one_refused(tmp_path, counts, monkeypatch):
    data, archive = zipped_tiny_imagenet(tmp_path)
    with pytest.raises(D.DataError, match="corrupt or truncated"):  # the official md5 refuses this archive
        D.load("tinyimagenet", str(data), download=False)
    assert not (data / "tiny-imagenet-200").exists()
    _set_md5(monkeypatch, "tinyimagenet", archive)
    x, _ = D.load("tinyimagenet", str(data), download=False, img_size=64)
    assert x.shape == (12, 3, 64, 64) and (data / "tiny-imagenet-200" / "wnids.txt").is_file()
    assert not any(p.name.endswith(".unpacking") for p in data.iterdir())


def test_missing_files_and_incomplete_unpack(tmp_path, counts, monkeypatch):
    for name, url, layout in (("tinyimagenet", "tiny-imagenet-200.zip", "val_annotations.txt"),
                              ("cinic10", "CINIC-10.tar.gz", "valid/<class>/*.png")):
        with pytest.raises(D.DataError) as e:
            D.load(name, str(tmp_path / "none"), download=False)
        assert url in str(e.value) and layout in str(e.value) and DATASETS[name].archive_md5 in str(e.value)
    write_cinic(tmp_path / "cinic-10")
    _set(monkeypatch, "cinic10", train_images=90_000, test_images=90_000)
    with pytest.raises(D.DataError, match="holds 60 images, the official archive 90000"):
        D.load("cinic10", str(tmp_path), download=False)


@pytest.mark.slow
def test_cinic_tar_gz_unpacks_and_trains_end_to_end(tmp_path, counts, monkeypatch, capsys, one_thread):
    src = write_cinic(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    archive = data / "CINIC-10.tar.gz"
    with tarfile.open(archive, "w:gz") as t:  # the official archive has no top-level folder
        for split in ("train", "valid", "test"):
            t.add(src / split, arcname=split)
    bad = data / "bad"
    bad.mkdir()
    (bad / "CINIC-10.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(D.DataError, match="corrupt or truncated"):
        D.load("cinic10", str(bad), download=False)
    _set_md5(monkeypatch, "cinic10", archive)
    x, y = D.load("cinic10", str(data), download=False, train=False)
    assert x.shape == (30, 3, 32, 32) and torch.bincount(y).tolist() == [3] * 10

    cfg = make_config("cinic10", {"model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2, "train.epochs": 2,
                                  "optim.warmup_epochs": 1, "train.batch_size": 20, "train.max_steps": 3,
                                  "train.progress": False, "data.data_dir": str(data), "data.download": False})
    assert (cfg.data.dataset, cfg.aug.autoaugment, cfg.model.num_classes) == ("cinic10", "cifar10", 10)
    assert smallvit.train(cfg, tmp_path / "run")["step"] == 3
    report = evaluate_run(tmp_path / "run", device="cpu")
    assert report["dataset"] == "cinic10" and report["n"] == 30 and "airplane" in report["per_class_acc"]
    assert smallvit.load(tmp_path / "run").preprocess.mean.tolist() == pytest.approx(DATASETS["cinic10"].mean)


@pytest.mark.slow
def test_tiny_imagenet_preset_trains_at_64_px(tmp_path, monkeypatch, one_thread):
    wnids = [f"n{10_000_000 + 7 * i:08d}" for i in range(200)]  # the real class count: the head has 200 outputs
    write_tiny_imagenet(tmp_path / "data", n_train=1, n_val=1, wnids=wnids,
                        words={w: f"thing {i}, other name" for i, w in enumerate(wnids)})
    _set(monkeypatch, "tinyimagenet", train_images=200, test_images=200)
    cfg = make_config("tinyimagenet", {"model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2,
                                       "model.patch_size": 8, "train.epochs": 2, "optim.warmup_epochs": 1,
                                       "train.batch_size": 50, "train.max_steps": 2, "train.progress": False,
                                       "data.data_dir": str(tmp_path / "data"), "data.download": False})
    assert (cfg.model.img_size, cfg.model.num_classes, cfg.aug.autoaugment) == (64, 200, "imagenet")
    r = smallvit.train(cfg, tmp_path / "run")
    assert r["step"] == 2
    p = smallvit.load(tmp_path / "run")
    assert p.class_names[:2] == ("thing 0", "thing 1") and p.preprocess.img_size == 64
    assert main(["predict", str(tmp_path / "run"),
                 str(tmp_path / "data" / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG")]) == 0


def test_damaged_cache_is_detected_and_rebuilt(tmp_path, counts, capsys):
    write_tiny_imagenet(tmp_path)
    x1, y1 = D.load("tinyimagenet", str(tmp_path), download=False, img_size=64)
    (cache,) = (tmp_path / "tiny-imagenet-200" / S.CACHE).glob("train-64px-*.npz")
    with np.load(cache) as z:
        x, y, sha = z["x"].copy(), z["y"], z["sha1"]
    x[0, 0, 0, 0] ^= 0xFF  # a flipped byte in a cache that still unzips
    np.savez(cache, x=x, y=y, sha1=sha)
    x2, y2 = D.load("tinyimagenet", str(tmp_path), download=False, img_size=64)
    assert torch.equal(x2, x1) and torch.equal(y2, y1)
    assert "is damaged; decoding the images again" in capsys.readouterr().out
    cache.write_bytes(cache.read_bytes()[:1000])  # cut short
    assert torch.equal(D.load("tinyimagenet", str(tmp_path), download=False, img_size=64)[0], x1)
    assert torch.equal(D.load("tinyimagenet", str(tmp_path), download=False, img_size=64)[0], x1)  # rebuilt
    assert capsys.readouterr().out.count("is damaged") == 1


CHILD = """
import dataclasses, json, sys
from smallvit import data as D
from smallvit.datasets import DATASETS
DATASETS["tinyimagenet"] = dataclasses.replace(DATASETS["tinyimagenet"], train_images=12, test_images=6,
                                               archive_md5=sys.argv[2])
x, y = D.load("tinyimagenet", sys.argv[1], download=False, img_size=64)
print(json.dumps([x.sum().item(), y.tolist()]))
"""


@pytest.mark.slow
def test_concurrent_processes_unpack_and_cache_once(tmp_path):
    """Four processes (as torchrun ranks or SLURM jobs would) find only the archive: one unpacks while the others
    wait, none deletes another's work, and all get the same images."""
    import subprocess
    import sys

    data, archive = zipped_tiny_imagenet(tmp_path)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(data), md5], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    got = [o.strip().splitlines()[-1] for o in outs]
    assert all(g == got[0] for g in got)
    assert sum("unpacking" in o for o in outs) == 1  # one unpacked; the others waited and found it done
    assert sorted(p.name for p in data.iterdir() if not p.name.endswith(".lock")) == \
        ["tiny-imagenet-200", "tiny-imagenet-200.zip"]  # no temporary folder left behind
    assert len(list((data / "tiny-imagenet-200" / S.CACHE).glob("*.npz"))) == 1
    assert not list((data / "tiny-imagenet-200" / S.CACHE).glob("*.part"))
