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

import contextlib
import fcntl
import hashlib
import os
import shutil
import tarfile
import tempfile
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
    with _exclusive(folder.parent / f".{folder.name}.lock"):  # one process unpacks; the others wait, then use it
        if _layout_ok(name, folder):
            return folder
        _fetch_and_unpack(name, info, archive, folder, download)
    return folder


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Hold an exclusive flock on `lock` (waiting for it): several ranks or jobs that find the dataset missing take
    turns, so no two download or unpack into one folder. The kernel releases it when a holder dies."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fetch_and_unpack(name: str, info, archive: Path, folder: Path, download: bool) -> None:
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


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")  # this process's own
    os.close(fd)
    tmp = Path(tmp)
    try:
        print(f"downloading {url} to {dest} ...", flush=True)
        urllib.request.urlretrieve(url, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _unpack(name: str, archive: Path, folder: Path) -> None:
    """Unpack into a temporary folder, then rename it into place: a cut-short unpack leaves no half dataset."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.unpacking."))  # never another's
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
    cached = _read_cache(cache)
    if cached is not None:
        return cached
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


def _digest(x: np.ndarray, y: np.ndarray) -> str:
    return hashlib.sha1(x.tobytes() + y.tobytes()).hexdigest()


def _read_cache(cache: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached arrays if the file is whole and its content matches the checksum stored with it; a damaged cache
    (cut short, flipped bits) is reported and rebuilt from the images."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache) as z:
            x, y, sha = z["x"], z["y"], str(z["sha1"])
        if _digest(x, y) == sha:
            return torch.from_numpy(x), torch.from_numpy(y)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    print(f"note: the decoded-image cache {cache} is damaged; decoding the images again", flush=True)
    return None


def _write_cache(cache: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Atomic write through this process's own temporary file (ranks and jobs may write the same cache at once:
    the last rename wins, and every version is whole); older caches of the same split and size go. A read-only
    folder just means no cache."""
    try:
        cache.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, x=x, y=y, sha1=np.array(_digest(x, y)))
            os.replace(tmp, cache)
        finally:
            Path(tmp).unlink(missing_ok=True)
        for old in cache.parent.glob(cache.name.rsplit("-", 1)[0] + "-*.npz"):
            if old != cache:
                old.unlink(missing_ok=True)
    except OSError as e:
        print(f"note: cannot cache decoded images in {cache.parent} ({e.strerror or e}); decoding again next time",
              flush=True)
