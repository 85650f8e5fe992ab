"""The dataset registry: one record per dataset, from which the readers, the config checks and the presets derive.

A dataset in a format smallvit already reads is one more entry in DATASETS; a new file format is one new reader
module plus its line in data.READERS. Nothing here imports from smallvit: config.py checks values against these
records, so this is the bottom layer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(RuntimeError):
    """The dataset is missing or damaged; the message says what to do."""


@dataclass(frozen=True)
class Dataset:
    name: str
    # How the files are read (data.READERS): pickle (CIFAR python batches in a tar.gz) | mat (SVHN .mat files,
    # fetched one by one) | class-folders (an archive of <split>/<class>/*.png: imagesets.py) | wnids (Tiny-ImageNet's
    # archive layout: imagesets.py) | folder (the user's ImageFolder tree at data.data_dir)
    kind: str
    num_classes: int  # 0: known only once read (an image folder)
    mean: tuple[float, float, float] | None = None  # reference §5.1; None: computed from the training images
    std: tuple[float, float, float] | None = None
    image_size: int = 32  # the stored images' size (the size preset dataset_preset trains at)
    resized: bool = False  # the reader decodes the images at any model.img_size; False: image_size only
    # In label order; (): read from the files (Tiny-ImageNet's words.txt, an image folder's sub-folders)
    class_names: tuple[str, ...] = ()
    folder: str = ""  # the official folder under the data root, as the archive unpacks
    url: str = ""  # the archive (whose file name is its last part), or the folder its files are fetched from (mat)
    archive_md5: str = ""
    train_files: tuple[str, ...] = ()  # the training split's files (pickle, mat) or folder (image archives)
    test_files: tuple[str, ...] = ()
    md5: dict[str, str] = field(default_factory=dict)  # of each file (pickle, mat): checked before it is read
    label_key: bytes = b""  # pickle: the labels' key in each batch
    # Images per split (image archives also check them, so a cut-short unpack is refused); 0: known once read.
    train_images: int = 0
    test_images: int = 0
    # Image archives: the paths an unpacked folder must hold, and the layout as the messages describe it ({f}: folder)
    markers: tuple[str, ...] = ()
    layout: str = ""

    @property
    def archive(self) -> str:
        """The archive's file name."""
        return self.url.rsplit("/", 1)[-1]


FOLDER = "folder"  # the user's image folder: data.dataset=folder
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The fine labels in label order (alphabetical), as in the archive's `meta` file.
CIFAR100_CLASSES = (
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
)

# File md5s are the official ones (the values torchvision checks); archive md5s as torchvision-style loaders check
# them; mean/std from reference §5.1 (CINIC-10: its README).
_RECORDS = (
    Dataset(
        "cifar10", "pickle", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), class_names=CIFAR10_CLASSES,
        folder="cifar-10-batches-py", url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        md5={"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
             "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
             "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"},
        label_key=b"labels", train_images=50_000, test_images=10_000),
    Dataset(
        "cifar100", "pickle", 100, (0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), class_names=CIFAR100_CLASSES,
        folder="cifar-100-python", url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85", train_files=("train",), test_files=("test",),
        md5={"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        label_key=b"fine_labels", train_images=50_000, test_images=10_000),
    Dataset(  # the 'extra' split is not used
        "svhn", "mat", 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
        class_names=tuple(str(i) for i in range(10)), folder="svhn", url="http://ufldl.stanford.edu/housenumbers/",
        train_files=("train_32x32.mat",), test_files=("test_32x32.mat",),
        md5={"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
             "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"},
        train_images=73_257, test_images=26_032),
    # The labelled `val` split is the test set (the `test` images carry no labels).
    Dataset(
        "tinyimagenet", "wnids", 200, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), image_size=64, resized=True,
        folder="tiny-imagenet-200", url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        archive_md5="90528d7ca1a48142e341f4ef8d21d0de", train_files=("train",), test_files=("val",),
        train_images=100_000, test_images=10_000,
        markers=("wnids.txt", "words.txt", "train", "val/val_annotations.txt"),
        layout="{f}/wnids.txt, {f}/words.txt, {f}/train/<wnid>/images/*.JPEG, {f}/val/images/*.JPEG and "
               "{f}/val/val_annotations.txt"),
    # CIFAR-10's classes; trains on `train`, tests on `test` (`valid` is not used).
    Dataset(
        "cinic10", "class-folders", 10, (0.47889522, 0.47227842, 0.43047404),
        (0.24205776, 0.23828046, 0.25874835), resized=True, class_names=CIFAR10_CLASSES, folder="cinic-10",
        url="https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz",
        archive_md5="6ee4d0c996905fe93221de577967a372", train_files=("train",), test_files=("test",),
        train_images=90_000, test_images=90_000, markers=("train", "valid", "test"),
        layout="{f}/train/<class>/*.png, {f}/valid/<class>/*.png and {f}/test/<class>/*.png"),
    # data.dataset=folder: an ImageFolder tree at data.data_dir (data.load_folder); its facts are read from it.
    Dataset(FOLDER, "folder", 0, resized=True),
)
DATASETS: dict[str, Dataset] = {d.name: d for d in _RECORDS}


def dataset(name: str) -> Dataset:
    """The registered record of `name`, or DataError naming the registered ones."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_to_uint8(img, size: int) -> np.ndarray:
    """A PIL image -> uint8 (3, size, size): converted to RGB, resized (bilinear, antialiased) to size x size."""
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
