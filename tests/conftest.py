"""Shared fixtures: a tiny dataset written in the official CIFAR-10 layout, and the real one when present."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

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
    import torch

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
