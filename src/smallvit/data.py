"""Datasets held as uint8 tensors: CIFAR-10/100 and SVHN (official files, checksum-verified), Tiny-ImageNet and
CINIC-10 (official archives, md5-checked, decoded once and cached: imagesets.py) and image folders.

The CIFAR files are pickles: each one's md5 is checked *before* it is unpickled, and a mismatch refuses to load.
SVHN is the official `train_32x32.mat` / `test_32x32.mat` pair (labels 1..10, where 10 is the digit 0).
A folder dataset is the ImageFolder layout root/train/<class>/*.png and root/val/<class>/*.png, resized once.
The whole split is returned as one uint8 tensor (N, 3, H, W) so it can live on the training device:
no per-image Python loop and no DataLoader workers (the reference's PIL pipeline is the bottleneck, SPEC 5.3).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError


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
    # pickle: CIFAR python batches in an archive | mat: SVHN .mat files, fetched one by one | images: an archive of
    # image files (imagesets.py; train_files / test_files name the split folders)
    layout: str = "pickle"


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
    "svhn": DatasetInfo(
        "svhn", "http://ufldl.stanford.edu/housenumbers/", "",
        ("train_32x32.mat",), ("test_32x32.mat",), b"y", 10,
        (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), layout="mat"),  # the 'extra' split is not used
    # Archive md5s as torchvision-style loaders check them; mean/std from SPEC 5.1 (CINIC-10: its README).
    "tinyimagenet": DatasetInfo(
        "tiny-imagenet-200", "http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de",
        ("train",), ("val",), b"", 200, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), layout="images"),
    "cinic10": DatasetInfo(
        "cinic-10", "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz",
        "6ee4d0c996905fe93221de577967a372", ("train",), ("test",), b"", 10,
        (0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835), layout="images"),
}
FOLDER = "folder"  # data.dataset=folder: an ImageFolder tree at data.data_dir (see load_folder)

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
    "svhn": {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    },
}

CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    # The fine labels in label order (alphabetical), as in the archive's `meta` file.
    "cifar100": (
        "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
        "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
        "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
        "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
        "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
        "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
        "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
        "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel",
        "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
        "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm"
    ),
    "svhn": tuple(str(i) for i in range(10)),
    "cinic10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


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
    """Accept either the parent of the official folder or the official folder itself (torchvision's SVHN root)."""
    if root.name == info.folder or (root / (info.train_files + info.test_files)[0]).is_file():
        return root
    return root / info.folder


def _download_files(folder: Path, info: DatasetInfo, name: str) -> None:
    """Fetch each missing file of a dataset published as separate files (SVHN), checking its md5 before keeping it."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in info.train_files + info.test_files:
        if (folder / f).is_file():
            continue
        tmp = folder / f".{f}.part"
        try:
            print(f"downloading {info.url}{f} to {folder} ...", flush=True)
            urllib.request.urlretrieve(info.url + f, tmp)
            if md5sum(tmp) != CHECKSUMS[name][f]:
                raise DataError(f"the downloaded file {info.url}{f} has the wrong md5; try again later")
            os.replace(tmp, folder / f)
        finally:
            tmp.unlink(missing_ok=True)


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
    if info.layout == "mat":
        links = ", ".join(f"{info.url}{f} (md5 {CHECKSUMS[name][f]})" for f in info.train_files + info.test_files)
        return (f"{name}: missing {', '.join(missing)} in {folder}.{why}\n"
                f"Download {links} into {folder} and point --data-dir (or $SMALLVIT_DATA) at {folder.parent}.")
    return (
        f"{name}: missing {', '.join(missing)} in {folder}.{why}\n"
        f"Download {info.url} (md5 {info.archive_md5}), unpack it so that {folder} holds the official files, "
        f"and point --data-dir (or $SMALLVIT_DATA) at {folder.parent}."
    )


def verify(name: str, root: Path, download: bool = True) -> Path:
    """Check every file's md5 (downloading when missing and allowed); return the dataset folder."""
    info = DATASETS[name]
    if info.layout == "images":  # one archive of image files: its md5, layout and image counts (imagesets.py)
        from . import imagesets

        return imagesets.locate(name, root, download)
    folder = _find_folder(root, info)
    files = info.train_files + info.test_files
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        try:
            if info.layout == "mat":
                _download_files(folder, info, name)
            else:
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


def _read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN .mat file: X (32, 32, 3, N) uint8, y (N, 1) in 1..10 where 10 is the digit 0 (as torchvision)."""
    from scipy.io import loadmat

    d = loadmat(path)
    x = np.ascontiguousarray(np.asarray(d["X"], dtype=np.uint8).transpose(3, 2, 0, 1))  # (N, 3, H, W)
    y = np.asarray(d["y"], dtype=np.int64).reshape(-1) % 10
    return x, y


def load(name: str = "cifar10", data_dir: str = "", download: bool = True, train: bool = True,
         device: torch.device | str = "cpu", img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 (N, 3, H, W), labels int64 (N,)) on `device`; `img_size` resizes image-file datasets."""
    if name == FOLDER:
        x, y, _ = load_folder(resolve_data_dir(data_dir), "train" if train else "val", img_size)
        return x.to(device), y.to(device)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join([*DATASETS, FOLDER])}")
    info = DATASETS[name]
    if info.layout == "images":
        from . import imagesets

        x, y = imagesets.load(name, resolve_data_dir(data_dir), download, train, img_size)
        return x.to(device), y.to(device)
    folder = verify(name, resolve_data_dir(data_dir), download)
    files = info.train_files if train else info.test_files
    read = _read_mat if info.layout == "mat" else functools.partial(_read_batch, label_key=info.label_key)
    parts = [read(folder / f) for f in files]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return x.to(device), y.to(device)


@dataclass(frozen=True)
class DatasetMeta:
    """What a model trained on a dataset needs to know about it."""

    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]


def dataset_meta(name: str, data_dir: str = "", img_size: int = 32, download: bool = False) -> DatasetMeta:
    """Classes, names and normalisation of a named dataset, or of the image folder at `data_dir` (name "folder").
    Tiny-ImageNet's class names come from its files (fetched first with `download`)."""
    if name == FOLDER:
        root = resolve_data_dir(data_dir)
        classes, _ = _folder_files(root, "train")
        mean, std = folder_stats(root, img_size)
        return DatasetMeta(len(classes), mean, std, classes)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join([*DATASETS, FOLDER])}")
    info = DATASETS[name]
    names = CLASS_NAMES.get(name, tuple(str(i) for i in range(info.num_classes)))
    if name == "tinyimagenet":
        from . import imagesets

        names = imagesets.class_names(name, imagesets.locate(name, resolve_data_dir(data_dir), download))
    return DatasetMeta(info.num_classes, info.mean, info.std, names)


def meta_of(cfg, saved: dict | None = None) -> DatasetMeta:
    """The dataset facts a trained model needs: those saved in its checkpoint (so a run stays usable when its image
    folder moves), else looked up from its config."""
    if saved:
        return DatasetMeta(int(saved["num_classes"]), tuple(saved["mean"]), tuple(saved["std"]),
                           tuple(saved["class_names"]))
    return dataset_meta(cfg.data.dataset, cfg.data.data_dir, cfg.model.img_size)


def image_to_uint8(img, size: int) -> np.ndarray:
    """A PIL image -> uint8 (3, size, size): converted to RGB, resized (bilinear, antialiased) to size x size."""
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


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
