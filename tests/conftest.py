"""Shared fixtures: a tiny dataset written in the official CIFAR-10 layout, and the real one when present; tiny
trained runs and the helpers that more than one test file uses."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from smallvit.datasets import DATASETS
from smallvit.experiments import make_config

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("SMALLVIT_REAL_DATA", REPO.parent / "shared" / "data"))
HAVE_REAL = (REAL_DATA / "cifar-10-batches-py" / "test_batch").is_file()
# In CI (SMALLVIT_REQUIRE_SERVICES=1, .ci/run) the real data must be there: a missing copy fails, never skips.
if not HAVE_REAL and os.environ.get("SMALLVIT_REQUIRE_SERVICES") == "1":
    needs_real_cifar = pytest.mark.usefixtures("_real_cifar_required")
else:
    needs_real_cifar = pytest.mark.skipif(not HAVE_REAL, reason=f"real CIFAR-10 not found at {REAL_DATA}")


@pytest.fixture
def _real_cifar_required():
    pytest.fail(f"SMALLVIT_REQUIRE_SERVICES=1 but real CIFAR-10 is not at {REAL_DATA}")


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: each class is a colour and a stripe position, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 60, (n, 3, 32, 32)).astype(np.int64)
    for c in range(10):
        sel = y == c
        x[sel, c % 3] += 120
        x[sel, :, 3 * c : 3 * c + 3, :] += 70
    return np.clip(x, 0, 255).astype(np.uint8), y


def write_fake_cifar10(root: Path, n_train: int = 600, n_test: int = 200) -> dict[str, str]:
    """Write pickles with the official names and keys; return their md5s."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    xs, ys = make_images(n_train + n_test, 0)
    per = n_train // 5
    chunks = [(f"data_batch_{i + 1}", slice(i * per, (i + 1) * per)) for i in range(5)]
    chunks.append(("test_batch", slice(n_train, n_train + n_test)))
    for name, sl in chunks:
        d = {b"data": xs[sl].reshape(-1, 3072), b"labels": ys[sl].tolist(), b"batch_label": name.encode()}
        path = folder / name
        path.write_bytes(pickle.dumps(d))
        sums[name] = hashlib.md5(path.read_bytes()).hexdigest()
    return sums


def use_checksums(mp: pytest.MonkeyPatch, name: str, sums: dict[str, str]) -> None:
    """Point the dataset's registry record at these files' md5s (a fake dataset's) until `mp` is undone."""
    mp.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], md5=sums))


@pytest.fixture
def one_thread():
    """Small tensors gain nothing from extra intra-op threads, which only thrash on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch) -> Path:
    """A tiny CIFAR-10 in the official layout; the reader's checksum table points at these files."""
    root = tmp_path / "data"
    sums = write_fake_cifar10(root)
    use_checksums(monkeypatch, "cifar10", sums)
    return root


def smoke_config(data_dir: Path, **overrides):
    """The smoke preset on the given data, with no download attempt."""
    # One thread: tiny models gain nothing from two, and tests share the 2-core machine with each other.
    base = {"data.data_dir": str(data_dir), "data.download": False, "data.subset": 0, "data.test_subset": 0,
            "train.threads": 1}
    base.update(overrides)
    return make_config("smoke", base)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A tiny fake CIFAR-10 for the whole module (the function-scoped `fake_cifar` would retrain per test)."""
    root = tmp_path_factory.mktemp("data")
    sums = write_fake_cifar10(root, n_train=320, n_test=64)
    with pytest.MonkeyPatch.context() as mp:
        use_checksums(mp, "cifar10", sums)
        yield root


# ---- shared by several test files

CUDA = torch.device("cuda")  # only decides fused=True in build_optimizer / match_device; every tensor stays on CPU
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # the normalisation of the multi-crop views in the DINO tests
SSL = {"ssl.local_crops": 2, "ssl.out_dim": 64}  # a light DINO: two local views, a small projection
SHORT_RUN = {"train.max_steps": 3, "aug.autoaugment": "none", "aug.erase_p": 0.0}  # a trained run in seconds
MULTI_CLS = {"model.num_cls_tokens": 2, "model.class_attn_depth": 1}  # several CLS tokens + a class-attention block


@pytest.fixture
def restore_threads():
    """In-process runs use one thread (fast on a shared machine); restore torch's setting afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def one_thread_config(data: Path, **overrides):
    return smoke_config(data, **{"train.threads": 1, **overrides})


def train_args(data: Path, out: Path, *sets: str) -> list[str]:
    """`smallvit train` arguments for the smoke preset on `data`."""
    return ["train", "--preset", "smoke", "--data-dir", str(data), "--out", str(out), "--set", "data.download=false",
            "data.subset=0", "data.test_subset=0", "train.threads=1", *sets]


def run_main(capsys, *args) -> tuple[int, str]:
    """The exit code and stderr of `smallvit ARGS`, in this process."""
    from smallvit.cli import main

    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_one_error(err: str, start: str) -> None:
    assert err.startswith(f"smallvit train: error: {start}"), err
    assert err.count("error:") == 1 and "Traceback" not in err, err


def seeded_vit(**overrides):
    """The smoke preset's ViT with these model keys, initialised from seed 0."""
    from smallvit.backbones import build_model

    torch.manual_seed(0)
    return build_model(make_config("smoke", overrides).model)


def smoke_model(**overrides):
    """The smoke preset's model with these keys, in eval mode."""
    from smallvit.backbones import build_model

    return build_model(make_config("smoke", overrides).model).eval()


def cifar_test_images(cifar, n=7):
    """The first n test images and labels of a (fake) CIFAR-10 folder."""
    from smallvit import data as D

    x, y = D.load("cifar10", str(cifar), download=False, train=False)
    return x[:n], y[:n]


def json_out(text: str):
    """The JSON object or list a command printed after any other lines."""
    return json.loads(text[min(i for i in (text.find("{"), text.find("[")) if i >= 0):])


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """One tiny trained baseline-shaped run (one CLS token, full-rank q/k/v: what timm can express)."""
    import smallvit

    data = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        use_checksums(mp, "cifar10", write_fake_cifar10(data, n_train=320, n_test=64))
        out = tmp_path_factory.mktemp("runs") / "base"
        smallvit.train(smoke_config(data, **SHORT_RUN), out)
    return out


@pytest.fixture(scope="module")
def multi_cls_run(cifar, tmp_path_factory):
    """One tiny trained run with two CLS tokens and a class-attention block."""
    import smallvit

    out = tmp_path_factory.mktemp("runs") / "cls2-ca1"
    smallvit.train(smoke_config(cifar, **MULTI_CLS, **SHORT_RUN), out)
    return out
