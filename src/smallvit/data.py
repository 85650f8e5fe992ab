"""CIFAR-10 / CIFAR-100 in the official python layout, checksum-verified, held as uint8 tensors.

The files are pickles: each one's md5 is checked *before* it is unpickled, and a mismatch refuses to load.
The whole split is returned as one uint8 tensor (N, 3, 32, 32) so it can live on the training device:
no per-image Python loop and no DataLoader workers (the reference's PIL pipeline is the bottleneck, SPEC 5.3).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DataError(RuntimeError):
    """The dataset is missing or damaged; the message says what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    folder: str
    url: str
    archive_md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]  # SPEC 5.1
    std: tuple[float, float, float]


DATASETS = {
    "cifar10": DatasetInfo(
        "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(
        "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        ("train",), ("test",), b"fine_labels", 100,
        (0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# The official md5 of every pickle (the same values torchvision checks).
CHECKSUMS: dict[str, dict[str, str]] = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    },
}

CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def resolve_data_dir(data_dir: str = "") -> Path:
    """--data-dir / data.data_dir, else $SMALLVIT_DATA, else ./data."""
    return Path(data_dir or os.environ.get("SMALLVIT_DATA") or "data").expanduser()


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_folder(root: Path, info: DatasetInfo) -> Path:
    """Accept either the parent of the official folder or the official folder itself."""
    return root if root.name == info.folder else root / info.folder


def _download(root: Path, info: DatasetInfo) -> None:
    """Fetch the official archive, check its md5, unpack it next to the other datasets."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=root, suffix=".tar.gz", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        print(f"downloading {info.url} to {root} ...", flush=True)
        urllib.request.urlretrieve(info.url, tmp_path)
        if md5sum(tmp_path) != info.archive_md5:
            raise DataError(f"the downloaded archive {info.url} has the wrong md5; try again later")
        with tarfile.open(tmp_path) as tar:
            tar.extractall(root, filter="data")
    finally:
        tmp_path.unlink(missing_ok=True)


def _missing_message(name: str, folder: Path, missing: list[str], why: str = "") -> str:
    info = DATASETS[name]
    return (
        f"{name}: missing {', '.join(missing)} in {folder}.{why}\n"
        f"Download {info.url} (md5 {info.archive_md5}), unpack it so that {folder} holds the official files, "
        f"and point --data-dir (or $SMALLVIT_DATA) at {folder.parent}."
    )


def verify(name: str, root: Path, download: bool = True) -> Path:
    """Check every file's md5 (downloading when missing and allowed); return the dataset folder."""
    info = DATASETS[name]
    folder = _find_folder(root, info)
    files = info.train_files + info.test_files
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        try:
            _download(folder.parent, info)
        except DataError:
            raise
        except Exception as e:  # no network, refused, disk full: say so, do not hide it
            raise DataError(_missing_message(name, folder, missing, f" Download failed: {e}.")) from None
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(_missing_message(name, folder, missing))
    for f in files:
        got, want = md5sum(folder / f), CHECKSUMS[name][f]
        if got != want:
            raise DataError(
                f"{name}: {folder / f} has md5 {got}, expected {want}: the file is corrupt or truncated and "
                f"was not loaded. Delete {folder} and download the dataset again."
            )
    return folder


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")  # safe: the md5 was verified first
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(d[label_key], dtype=np.int64)
    return x, y


def load(name: str = "cifar10", data_dir: str = "", download: bool = True, train: bool = True,
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 (N, 3, 32, 32), labels int64 (N,)) on `device`."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    info = DATASETS[name]
    folder = verify(name, resolve_data_dir(data_dir), download)
    parts = [_read_batch(folder / f, info.label_key) for f in (info.train_files if train else info.test_files)]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return x.to(device), y.to(device)


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float normalised with per-channel mean/std given in [0, 1] units."""
    return (x_uint8.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def epoch_indices(n: int, epoch: int, seed: int, repeats: int, mode: str, batch_size: int) -> torch.Tensor:
    """Sample order for one epoch, a pure function of (seed, epoch), so a resumed run sees the same data.

    passes:   `repeats` fresh permutations chained (SPEC 5.5, single process); no image twice in a batch.
    in_batch: one permutation, each index `repeats` times in a row (SPEC 5.5, torchrun; Hoffer et al. 2020).
    The remainder that does not fill a batch is dropped, as the reference does.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if mode == "passes":
        idx = torch.cat([torch.randperm(n, generator=g) for _ in range(repeats)])
    else:
        idx = torch.randperm(n, generator=g).repeat_interleave(repeats)
    steps = len(idx) // batch_size
    return idx[: steps * batch_size]


def steps_per_epoch(n: int, repeats: int, batch_size: int) -> int:
    return (n * repeats) // batch_size
