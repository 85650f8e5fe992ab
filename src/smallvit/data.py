"""Datasets held as uint8 tensors, read as their registry record (datasets.py) says: CIFAR-10/100 and SVHN (official
files, checksum-verified, here), Tiny-ImageNet and CINIC-10 (official archives, md5-checked, decoded once and cached:
imagesets.py) and image folders (here).

The CIFAR files are pickles: each one's md5 is checked *before* it is unpickled, and a mismatch refuses to load.
SVHN is the official `train_32x32.mat` / `test_32x32.mat` pair (labels 1..10, where 10 is the digit 0).
A folder dataset is the ImageFolder layout root/train/<class>/*.png and root/val/<class>/*.png, resized once.
The whole split is returned as one uint8 tensor (N, 3, H, W) so it can live on the training device:
no per-image Python loop and no DataLoader workers (the reference's PIL pipeline is the bottleneck, reference §5.3).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import imagesets
from .config import ConfigError
from .datasets import FOLDER  # noqa: F401  (the modules that load data read it as data.FOLDER)
from .datasets import DataError, Dataset, dataset, image_to_uint8, md5sum

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


def resolve_data_dir(data_dir: str = "") -> Path:
    """--data-dir / data.data_dir, else $SMALLVIT_DATA, else ./data."""
    return Path(data_dir or os.environ.get("SMALLVIT_DATA") or "data").expanduser()


def _find_folder(root: Path, info: Dataset) -> Path:
    """Accept either the parent of the official folder or the official folder itself (torchvision's SVHN root)."""
    if root.name == info.folder or (root / (info.train_files + info.test_files)[0]).is_file():
        return root
    return root / info.folder


def _download_files(folder: Path, info: Dataset) -> None:
    """Fetch each missing file of a dataset published as separate files (SVHN), checking its md5 before keeping it."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in info.train_files + info.test_files:
        if (folder / f).is_file():
            continue
        tmp = folder / f".{f}.part"
        try:
            print(f"downloading {info.url}{f} to {folder} ...", flush=True)
            urllib.request.urlretrieve(info.url + f, tmp)
            if md5sum(tmp) != info.md5[f]:
                raise DataError(f"the downloaded file {info.url}{f} has the wrong md5; try again later")
            os.replace(tmp, folder / f)
        finally:
            tmp.unlink(missing_ok=True)


def _download(root: Path, info: Dataset) -> None:
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


def _missing_message(info: Dataset, folder: Path, missing: list[str], why: str = "") -> str:
    name = info.name
    if info.kind == "mat":  # fetched file by file: each file's link
        links = ", ".join(f"{info.url}{f} (md5 {info.md5[f]})" for f in info.train_files + info.test_files)
        return (f"{name}: missing {', '.join(missing)} in {folder}.{why}\n"
                f"Download {links} into {folder} and point --data-dir (or $SMALLVIT_DATA) at {folder.parent}.")
    return (
        f"{name}: missing {', '.join(missing)} in {folder}.{why}\n"
        f"Download {info.url} (md5 {info.archive_md5}), unpack it so that {folder} holds the official files, "
        f"and point --data-dir (or $SMALLVIT_DATA) at {folder.parent}."
    )


def _verify_files(info: Dataset, root: Path, download: bool = True) -> Path:
    """Check every file's md5 (downloading when missing and allowed); return the dataset folder."""
    folder = _find_folder(root, info)
    files = info.train_files + info.test_files
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        try:
            if info.kind == "mat":
                _download_files(folder, info)
            else:
                _download(folder.parent, info)
        except DataError:
            raise
        except Exception as e:  # no network, refused, disk full: say so, do not hide it
            raise DataError(_missing_message(info, folder, missing, f" Download failed: {e}.")) from None
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(_missing_message(info, folder, missing))
    for f in files:
        got, want = md5sum(folder / f), info.md5[f]
        if got != want:
            raise DataError(
                f"{info.name}: {folder / f} has md5 {got}, expected {want}: the file is corrupt or truncated and "
                f"was not loaded. Delete {folder} and download the dataset again."
            )
    return folder


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")  # safe: the md5 was verified first
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(d[label_key], dtype=np.int64)
    return x, y


def _read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN .mat file: X (32, 32, 3, N) uint8, y (N, 1) in 1..10 where 10 is the digit 0 (as torchvision)."""
    from scipy.io import loadmat

    d = loadmat(path)
    x = np.ascontiguousarray(np.asarray(d["X"], dtype=np.uint8).transpose(3, 2, 0, 1))  # (N, 3, H, W)
    y = np.asarray(d["y"], dtype=np.int64).reshape(-1) % 10
    return x, y


def _read_files(info: Dataset, folder: Path, train: bool, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of a dataset published as array files (pickle, mat), concatenated; stored at its own size."""
    read = _read_mat if info.kind == "mat" else functools.partial(_read_batch, label_key=info.label_key)
    parts = [read(folder / f) for f in (info.train_files if train else info.test_files)]
    x, y = (torch.from_numpy(np.concatenate([p[i] for p in parts])) for i in (0, 1))
    return x, y


def verify(name: str, root: Path, download: bool = True) -> Path:
    """The dataset's folder under `root`, checked as its reader checks it (fetched when missing and allowed)."""
    info = dataset(name)
    return READERS[info.kind].locate(info, Path(root), download)


def load(name: str = "cifar10", data_dir: str = "", download: bool = True, train: bool = True,
         device: torch.device | str = "cpu", img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 (N, 3, H, W), labels int64 (N,)) on `device`; `img_size` resizes image-file datasets."""
    info = dataset(name)
    reader = READERS[info.kind]
    x, y = reader.read(info, reader.locate(info, resolve_data_dir(data_dir), download), train, img_size)
    return x.to(device), y.to(device)


@dataclass(frozen=True)
class DatasetMeta:
    """What a model trained on a dataset needs to know about it."""

    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]


def dataset_meta(name: str, data_dir: str = "", img_size: int = 32, download: bool = False) -> DatasetMeta:
    """Classes, names and normalisation of a named dataset: from its record, and what the record leaves open
    (Tiny-ImageNet's class names, an image folder's classes and statistics) from its files (fetched first with
    `download`)."""
    info = dataset(name)
    if info.class_names and info.mean is not None:
        return DatasetMeta(info.num_classes, info.mean, info.std, info.class_names)
    reader = READERS[info.kind]
    folder = reader.locate(info, resolve_data_dir(data_dir), download)
    names = info.class_names or reader.class_names(info, folder)
    mean, std = (info.mean, info.std) if info.mean is not None else reader.stats(folder, img_size)
    return DatasetMeta(info.num_classes or len(names), mean, std, names)


def meta_of(cfg, saved: dict | None = None) -> DatasetMeta:
    """The dataset facts a trained model needs: those saved in its checkpoint (so a run stays usable when its image
    folder moves), else looked up from its config."""
    if saved:
        return DatasetMeta(int(saved["num_classes"]), tuple(saved["mean"]), tuple(saved["std"]),
                           tuple(saved["class_names"]))
    return dataset_meta(cfg.data.dataset, cfg.data.data_dir, cfg.model.img_size)


def _folder_files(root: Path, split: str, classes: tuple[str, ...] | None = None
                  ) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """Class names (sorted sub-folder names of the train split) and (file, label) pairs of one split."""
    base = root / split
    if not base.is_dir():
        raise DataError(
            f"folder dataset: {base} does not exist. Arrange your images as {root}/train/<class>/*.png and "
            f"{root}/val/<class>/*.png (any of {', '.join(IMAGE_SUFFIXES)}) and set data.data_dir={root}."
        )
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = tuple(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"folder dataset: {base} has classes {unknown} that {root}/train does not have")
    files = []
    for label, c in enumerate(classes):
        d = base / c
        imgs = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if d.is_dir() else []
        if not imgs and split == "train":
            raise DataError(f"folder dataset: class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, label) for p in imgs]
    if not classes or not files:
        raise DataError(f"folder dataset: no class folders with images in {base}")
    return classes, files


def load_folder(root: Path, split: str = "train", img_size: int = 32
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """An ImageFolder split as (uint8 (N, 3, img_size, img_size), int64 labels, class names); classes from train/."""
    root = Path(root)
    classes, _ = _folder_files(root, "train")
    _, files = _folder_files(root, split, classes)
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p, _ in files)
    x, y = _read_folder(stamp, tuple(lab for _, lab in files), img_size)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), classes  # the cache keeps its own arrays


@functools.lru_cache(maxsize=4)  # train() and dataset_meta() both read the train split: decode it once
def _read_folder(stamp: tuple, labels: tuple[int, ...], img_size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    x = np.empty((len(stamp), 3, img_size, img_size), dtype=np.uint8)
    for i, (path, _, _) in enumerate(stamp):
        try:
            with Image.open(path) as img:
                x[i] = image_to_uint8(img, img_size)
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"folder dataset: cannot read image {path}: {e}") from None
    x.flags.writeable = False
    return x, np.asarray(labels, dtype=np.int64)


def folder_stats(root: Path, img_size: int = 32) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units: from root/stats.json ({"mean": [..], "std": [..]}) when given,
    else computed from the training images resized to img_size."""
    given = Path(root) / "stats.json"
    if given.is_file():
        try:
            d = json.loads(given.read_text())
            mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{given} must hold {{\"mean\": [r, g, b], \"std\": [r, g, b]}} ({e})") from None
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise DataError(f"{given}: mean and std need 3 values each, std > 0")
        return mean, std
    x = load_folder(root, "train", img_size)[0].double().div(255.0).transpose(0, 1).reshape(3, -1)  # (3, N*H*W)
    return tuple(round(v, 4) for v in x.mean(1).tolist()), tuple(round(v, 4) for v in x.std(1).tolist())


def _folder_root(info: Dataset, root: Path, download: bool = True) -> Path:
    """An image folder is data.data_dir itself, checked as it is read (there is nothing to fetch)."""
    return root


def _read_folder_split(info: Dataset, root: Path, train: bool, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = load_folder(root, "train" if train else "val", img_size)
    return x, y


class Reader(NamedTuple):
    """How one kind of dataset (Dataset.kind) is read."""

    # (record, data root, download) -> the dataset's folder, checked (fetched first when missing and allowed)
    locate: Callable[[Dataset, Path, bool], Path]
    # (record, folder, train split?, img_size) -> (uint8 (N, 3, H, W), int64 (N,))
    read: Callable[[Dataset, Path, bool, int], tuple[torch.Tensor, torch.Tensor]]
    # (record, folder) -> class names in label order, for a record that gives none
    class_names: Callable[[Dataset, Path], tuple[str, ...]] | None = None
    # (folder, img_size) -> per-channel (mean, std) in [0, 1] units, for a record that gives none
    stats: Callable[[Path, int], tuple[tuple[float, ...], tuple[float, ...]]] | None = None


# Every kind of dataset: a new file format is a reader module and one line here, a new dataset one DATASETS record.
READERS: dict[str, Reader] = {
    "pickle": Reader(_verify_files, _read_files),
    "mat": Reader(_verify_files, _read_files),
    "class-folders": Reader(imagesets.locate, imagesets.read, imagesets.class_names),
    "wnids": Reader(imagesets.locate, imagesets.read, imagesets.class_names),
    "folder": Reader(_folder_root, _read_folder_split, lambda info, root: _folder_files(root, "train")[0],
                     folder_stats),
}


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float normalised with per-channel mean/std given in [0, 1] units."""
    return (x_uint8.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def val_split(labels: torch.Tensor, n_val: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), disjoint and sorted: n_val images stratified by class.

    Each class gives its share of n_val (largest remainders for the fractions, ties to the lower class), chosen
    by a permutation from `seed` alone, so the split is the same for every training seed and on every machine.
    """
    labels = labels.cpu()
    n = len(labels)
    if not 0 < n_val < n:
        raise ConfigError(f"data.val_images={n_val} must be between 1 and {n - 1} (there are {n} training images)")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = [int(c) * n_val / n for c in counts]
    take = [int(e) for e in exact]
    for i in sorted(range(len(take)), key=lambda i: (-(exact[i] - take[i]), i))[: n_val - sum(take)]:
        take[i] += 1
    g = torch.Generator().manual_seed(seed)
    val = []
    for c, k in zip(classes.tolist(), take):
        members = torch.nonzero(labels == c).flatten()
        val.append(members[torch.randperm(len(members), generator=g)[:k]])
    val_idx = torch.cat(val).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_idx] = False
    return torch.nonzero(keep).flatten(), val_idx


def epoch_indices(n: int, epoch: int, seed: int, repeats: int, mode: str, batch_size: int) -> torch.Tensor:
    """Sample order for one epoch, a pure function of (seed, epoch), so a resumed run sees the same data.

    passes:   `repeats` fresh permutations chained (reference §5.5, single process); no image twice in a batch.
    in_batch: one permutation, each index `repeats` times in a row (reference §5.5, torchrun; Hoffer et al. 2020).
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


@dataclass(frozen=True)
class Shard:
    """One process's part of every global batch of `batch` samples under torchrun: the contiguous samples
    rank * size .. (rank + 1) * size - 1, size = batch // world.

    Random draws (augmentation, Mixup/CutMix partners, drop path) are made for whole global batches and then cut to
    the shard with `pick`, so every sample gets the draw it would get in one process, on any number of processes.
    A batch here may hold several global batches' shards one after another (several steps, or several DINO views):
    `groups` of them.
    """

    batch: int
    rank: int = 0
    world: int = 1

    @property
    def size(self) -> int:
        return self.batch // self.world

    def groups(self, local_n: int) -> int:
        """How many global batches a local batch of `local_n` samples holds a shard of."""
        if local_n % self.size:
            raise ValueError(f"a batch of {local_n} samples is not a whole number of shards of {self.size}")
        return local_n // self.size

    def global_n(self, local_n: int) -> int:
        """The samples to draw for so that a local batch of `local_n` samples can take its rows (`pick`)."""
        return self.groups(local_n) * self.batch

    def pick(self, drawn):
        """This shard's rows of `drawn` (a torch tensor or numpy array drawn for `global_n` samples), in order."""
        if self.world == 1:
            return drawn
        groups, rest = len(drawn) // self.batch, tuple(drawn.shape[1:])
        start = self.rank * self.size
        return drawn.reshape(groups, self.batch, *rest)[:, start : start + self.size].reshape(groups * self.size,
                                                                                               *rest)
