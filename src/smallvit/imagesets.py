"""Datasets published as one archive of image files: Tiny-ImageNet (a zip of JPEGs) and CINIC-10 (a tar.gz of PNGs).

Layouts, as the official archives unpack (SPEC 5.1; the reference needed them rearranged, SPEC 5.2, not here):
  tiny-imagenet-200/  wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt
  cinic-10/           train/<class>/*.png, valid/<class>/*.png, test/<class>/*.png
Trust: an archive's md5 is checked before it is unpacked and a mismatch is refused; an unpacked folder must hold
the official layout and image counts (a cut-short unpack is refused). The labelled Tiny-ImageNet `val` split is the
test set (its `test` images carry no labels); CINIC-10 trains on `train` and tests on `test`.
Each split is decoded once per image size into a uint8 array cached next to the images, under a key made of every
file's path, size and mtime: changing, adding or removing an image decodes it again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import data as D

ARCHIVES = {"tinyimagenet": "tiny-imagenet-200.zip", "cinic10": "CINIC-10.tar.gz"}
# Images per split in the official archives; an unpacked folder with other counts is refused (tests patch these).
EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "tinyimagenet": {"train": 100_000, "val": 10_000},
    "cinic10": {"train": 90_000, "valid": 90_000, "test": 90_000},
}
LAYOUT = {
    "tinyimagenet": "{f}/wnids.txt, {f}/words.txt, {f}/train/<wnid>/images/*.JPEG, {f}/val/images/*.JPEG and "
                    "{f}/val/val_annotations.txt",
    "cinic10": "{f}/train/<class>/*.png, {f}/valid/<class>/*.png and {f}/test/<class>/*.png",
}
CACHE = ".smallvit-cache"


def _markers(name: str, folder: Path) -> list[Path]:
    if name == "tinyimagenet":
        return [folder / "wnids.txt", folder / "words.txt", folder / "train", folder / "val" / "val_annotations.txt"]
    return [folder / s for s in EXPECTED_COUNTS[name]]


def _layout_ok(name: str, folder: Path) -> bool:
    return all(p.exists() for p in _markers(name, folder))


def _missing(name: str, folder: Path, why: str = "") -> D.DataError:
    info = D.DATASETS[name]
    return D.DataError(
        f"{name}: {folder} does not hold the dataset.{why}\nDownload {info.url} (md5 {info.archive_md5}) into "
        f"{folder.parent} (it is unpacked there on the next run), or unpack it yourself so that there are "
        f"{LAYOUT[name].format(f=folder)}; then point --data-dir (or $SMALLVIT_DATA) at {folder.parent}.")


def locate(name: str, root: Path, download: bool = True) -> Path:
    """The unpacked dataset folder under `root` (or `root` itself): unpacked from the archive (md5-checked) when
    only the archive is there, downloaded first when allowed."""
    info = D.DATASETS[name]
    root = Path(root)
    folder = root if _layout_ok(name, root) else root / info.folder
    if _layout_ok(name, folder):
        return folder
    archive = folder.parent / ARCHIVES[name]
    if not archive.is_file() and download:
        try:
            _download(info.url, archive)
        except Exception as e:  # no network, refused, disk full: say so, with what to do by hand
            raise _missing(name, folder, f" Download failed: {e}.") from None
    if not archive.is_file():
        raise _missing(name, folder)
    got = D.md5sum(archive)
    if got != info.archive_md5:
        raise D.DataError(f"{name}: {archive} has md5 {got}, expected {info.archive_md5}: the archive is corrupt or "
                          f"truncated and was not unpacked. Delete it and download it again from {info.url}.")
    _unpack(name, archive, folder)
    return folder


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        print(f"downloading {url} to {dest} ...", flush=True)
        urllib.request.urlretrieve(url, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _unpack(name: str, archive: Path, folder: Path) -> None:
    """Unpack into a temporary folder, then rename it into place: a cut-short unpack leaves no half dataset."""
    tmp = folder.with_name(f".{folder.name}.unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"unpacking {archive} to {folder} ...", flush=True)
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)  # zipfile drops absolute paths and ".." from member names
        else:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
        inner = [p for p in tmp.iterdir() if p.is_dir() and _layout_ok(name, p)]
        src = tmp if _layout_ok(name, tmp) else (inner[0] if len(inner) == 1 else None)
        if src is None:
            raise D.DataError(f"{name}: {archive} does not unpack to the official layout "
                              f"({LAYOUT[name].format(f=folder.name)})")
        os.replace(src, folder)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise D.DataError(f"{name}: cannot unpack {archive} ({e}); delete it and download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wnids(folder: Path) -> list[str]:
    return sorted(w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip())


def class_names(name: str, folder: Path) -> tuple[str, ...]:
    """Tiny-ImageNet: the first name words.txt gives each wnid, in label order (sorted wnids); CINIC-10: CIFAR-10's."""
    if name == "cinic10":
        return D.CLASS_NAMES["cifar10"]
    words = {}
    for line in (folder / "words.txt").read_text().splitlines():
        wnid, _, text = line.partition("\t")
        words[wnid.strip()] = text.split(",")[0].strip()
    return tuple(words.get(w) or w for w in _wnids(folder))


def split_files(name: str, folder: Path, split: str) -> list[tuple[Path, int]]:
    """(image file, label) pairs of one split, in a fixed order; the split's image count is checked."""
    if name == "tinyimagenet":
        wnids = _wnids(folder)
        label = {w: i for i, w in enumerate(wnids)}
        if split == "train":
            files = [(p, i) for i, w in enumerate(wnids)
                     for p in sorted((folder / "train" / w / "images").glob("*.JPEG"))]
        else:
            files = []
            for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
                parts = line.split("\t")
                if len(parts) < 2 or parts[1] not in label:
                    raise D.DataError(f"tinyimagenet: {folder / 'val' / 'val_annotations.txt'} has a line "
                                      f"{line!r} whose class is not in wnids.txt")
                files.append((folder / "val" / "images" / parts[0], label[parts[1]]))
    else:
        classes = class_names(name, folder)
        files = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / split / c).glob("*.png"))]
    want = EXPECTED_COUNTS[name][split]
    if len(files) != want:
        raise D.DataError(f"{name}: {folder}/{split} holds {len(files)} images, the official archive {want}: an "
                          f"incomplete unpack? Delete {folder} and unpack {ARCHIVES[name]} again.")
    return files


def load(name: str, root: Path, download: bool = True, train: bool = True, img_size: int = 32
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, img_size, img_size), int64 labels) of the train or test split, from the cache when valid."""
    folder = locate(name, root, download)
    split = "train" if train else ("val" if name == "tinyimagenet" else "test")
    files = split_files(name, folder, split)
    key = hashlib.sha1(f"{img_size}\n".encode())
    for p, label in files:
        st = p.stat() if p.is_file() else None
        if st is None:
            raise D.DataError(f"{name}: {p} is listed but missing; delete {folder} and unpack the archive again")
        key.update(f"{p.relative_to(folder)}\t{st.st_size}\t{st.st_mtime_ns}\t{label}\n".encode())
    cache = folder / CACHE / f"{split}-{img_size}px-{key.hexdigest()[:16]}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    x = _decode([p for p, _ in files], img_size)
    y = np.asarray([label for _, label in files], dtype=np.int64)
    _write_cache(cache, x, y)
    return torch.from_numpy(x), torch.from_numpy(y)


def _decode(paths: list[Path], img_size: int) -> np.ndarray:
    """Decode and resize every image; PIL releases the GIL while decoding, so threads help."""
    from PIL import Image, UnidentifiedImageError

    x = np.empty((len(paths), 3, img_size, img_size), dtype=np.uint8)

    def one(i: int) -> None:
        try:
            with Image.open(paths[i]) as img:
                x[i] = D.image_to_uint8(img, img_size)
        except (OSError, UnidentifiedImageError) as e:
            raise D.DataError(f"cannot read image {paths[i]}: {e}; the file is damaged, unpack the archive again"
                              ) from None

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(paths)), chunksize=256))
    return x


def _write_cache(cache: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Atomic write; older caches of the same split and size go. A read-only folder just means no cache."""
    try:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_name(cache.name + ".part")
        with open(tmp, "wb") as f:
            np.savez(f, x=x, y=y)
        os.replace(tmp, cache)
        for old in cache.parent.glob(cache.name.rsplit("-", 1)[0] + "-*.npz"):
            if old != cache:
                old.unlink(missing_ok=True)
    except OSError as e:
        print(f"note: cannot cache decoded images in {cache.parent} ({e.strerror or e}); decoding again next time",
              flush=True)
