"""Datasets published as one archive of image files: Tiny-ImageNet (a zip of JPEGs) and CINIC-10 (a tar.gz of PNGs).

Layouts, as the official archives unpack (reference §5.1; the reference needed them rearranged, §5.2, not here):
  tiny-imagenet-200/  wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt
  cinic-10/           train/<class>/*.png, valid/<class>/*.png, test/<class>/*.png
Each archive's facts (url, md5, split folders, image counts, the paths that mark an unpacked folder) are its record
in datasets.py; the two layouts are LAYOUTS below, chosen by the record's kind.
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

from .datasets import DataError, Dataset, image_to_uint8, md5sum

CACHE = ".smallvit-cache"


def _layout_ok(info: Dataset, folder: Path) -> bool:
    return all((folder / m).exists() for m in info.markers)


def _missing(info: Dataset, folder: Path, why: str = "") -> DataError:
    return DataError(
        f"{info.name}: {folder} does not hold the dataset.{why}\nDownload {info.url} (md5 {info.archive_md5}) into "
        f"{folder.parent} (it is unpacked there on the next run), or unpack it yourself so that there are "
        f"{info.layout.format(f=folder)}; then point --data-dir (or $SMALLVIT_DATA) at {folder.parent}.")


def locate(info: Dataset, root: Path, download: bool = True) -> Path:
    """The unpacked dataset folder under `root` (or `root` itself): unpacked from the archive (md5-checked) when
    only the archive is there, downloaded first when allowed."""
    root = Path(root)
    folder = root if _layout_ok(info, root) else root / info.folder
    if _layout_ok(info, folder):
        return folder
    archive = folder.parent / info.archive
    with _exclusive(folder.parent / f".{folder.name}.lock"):  # one process unpacks; the others wait, then use it
        if _layout_ok(info, folder):
            return folder
        _fetch_and_unpack(info, archive, folder, download)
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


def _fetch_and_unpack(info: Dataset, archive: Path, folder: Path, download: bool) -> None:
    if not archive.is_file() and download:
        try:
            _download(info.url, archive)
        except Exception as e:  # no network, refused, disk full: say so, with what to do by hand
            raise _missing(info, folder, f" Download failed: {e}.") from None
    if not archive.is_file():
        raise _missing(info, folder)
    got = md5sum(archive)
    if got != info.archive_md5:
        raise DataError(f"{info.name}: {archive} has md5 {got}, expected {info.archive_md5}: the archive is corrupt "
                        f"or truncated and was not unpacked. Delete it and download it again from {info.url}.")
    _unpack(info, archive, folder)


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


def _unpack(info: Dataset, archive: Path, folder: Path) -> None:
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
        inner = [p for p in tmp.iterdir() if p.is_dir() and _layout_ok(info, p)]
        src = tmp if _layout_ok(info, tmp) else (inner[0] if len(inner) == 1 else None)
        if src is None:
            raise DataError(f"{info.name}: {archive} does not unpack to the official layout "
                            f"({info.layout.format(f=folder.name)})")
        os.replace(src, folder)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DataError(f"{info.name}: cannot unpack {archive} ({e}); delete it and download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wnids(folder: Path) -> list[str]:
    return sorted(w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip())


def _wnid_names(info: Dataset, folder: Path) -> tuple[str, ...]:
    """Tiny-ImageNet: the first name words.txt gives each wnid, in label order (sorted wnids)."""
    words = {}
    for line in (folder / "words.txt").read_text().splitlines():
        wnid, _, text = line.partition("\t")
        words[wnid.strip()] = text.split(",")[0].strip()
    return tuple(words.get(w) or w for w in _wnids(folder))


def _wnid_files(info: Dataset, folder: Path, split: str) -> list[tuple[Path, int]]:
    """Tiny-ImageNet: train/<wnid>/images/*.JPEG; the val split's labels from val/val_annotations.txt."""
    wnids = _wnids(folder)
    label = {w: i for i, w in enumerate(wnids)}
    if split == info.train_files[0]:
        return [(p, i) for i, w in enumerate(wnids) for p in sorted((folder / split / w / "images").glob("*.JPEG"))]
    files = []
    for line in (folder / split / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in label:
            raise DataError(f"{info.name}: {folder / split / 'val_annotations.txt'} has a line {line!r} whose class is "
                            f"not in wnids.txt")
        files.append((folder / split / "images" / parts[0], label[parts[1]]))
    return files


def _class_folder_names(info: Dataset, folder: Path) -> tuple[str, ...]:
    """<split>/<class>/: the record's class names (CINIC-10: CIFAR-10's), else the training split's sub-folders."""
    return info.class_names or tuple(sorted(p.name for p in (folder / info.train_files[0]).iterdir() if p.is_dir()))


def _class_folder_files(info: Dataset, folder: Path, split: str) -> list[tuple[Path, int]]:
    classes = _class_folder_names(info, folder)
    return [(p, i) for i, c in enumerate(classes) for p in sorted((folder / split / c).glob("*.png"))]


# Dataset.kind -> (its split's (file, label) pairs, its class names)
LAYOUTS = {"wnids": (_wnid_files, _wnid_names), "class-folders": (_class_folder_files, _class_folder_names)}


def class_names(info: Dataset, folder: Path) -> tuple[str, ...]:
    """The class names in label order, as the archive's layout gives them."""
    return LAYOUTS[info.kind][1](info, folder)


def split_files(info: Dataset, folder: Path, train: bool) -> list[tuple[Path, int]]:
    """(image file, label) pairs of one split, in a fixed order; the split's image count is checked."""
    split = (info.train_files if train else info.test_files)[0]
    files = LAYOUTS[info.kind][0](info, folder, split)
    want = info.train_images if train else info.test_images
    if len(files) != want:
        raise DataError(f"{info.name}: {folder}/{split} holds {len(files)} images, the official archive {want}: an "
                        f"incomplete unpack? Delete {folder} and unpack {info.archive} again.")
    return files


def read(info: Dataset, folder: Path, train: bool = True, img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, img_size, img_size), int64 labels) of the train or test split of the located `folder`, from the
    cache when valid."""
    split = (info.train_files if train else info.test_files)[0]
    files = split_files(info, folder, train)
    key = hashlib.sha1(f"{img_size}\n".encode())
    for p, label in files:
        st = p.stat() if p.is_file() else None
        if st is None:
            raise DataError(f"{info.name}: {p} is listed but missing; delete {folder} and unpack the archive again")
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
                x[i] = image_to_uint8(img, img_size)
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot read image {paths[i]}: {e}; the file is damaged, unpack the archive again"
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
