"""The harness's data sets: Fashion-MNIST, digits, CIFAR-10/100, image folders; seeded loaders.

:func:`load_dataset` returns a :class:`LoadedData` of torch Datasets yielding
``(image float32 (C, H, W), label int64)``; :func:`make_loader` wraps one in a seeded
DataLoader.  Formats:

* ``fashion-mnist``: the four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (gzipped ``.gz`` or not) in ``path``,
  by default :data:`FASHION_MNIST_PATH` (Debian's ``dataset-fashion-mnist``); 60,000/10,000
  grey 28×28 images, 10 classes.
* ``digits``: scikit-learn's ``load_digits`` (1,797 grey 8×8 images, 17 levels 0..16, 10
  classes; no path), split once into 1,437 training and 360 test images, stratified by class
  with ``random_state=0`` (the same split for every seed).
* ``cifar10`` / ``cifar100``: the official "python version" pickles, in ``path`` or in
  ``path/cifar-10-batches-py`` (``data_batch_1`` … ``data_batch_5``, ``test_batch``,
  ``batches.meta``) or ``path/cifar-100-python`` (``train``, ``test``, ``meta``; the 100 fine
  labels).  These are Python pickles and unpickling can run arbitrary code: load only files
  from a source you trust.
* ``imagefolder``: ``path/train/<class>/<image>`` and ``path/val/<class>/<image>`` (or
  ``path/test/...``), any format Pillow decodes, converted to RGB; classes are the training
  sub-folders sorted by name.  Decoded lazily, one image per ``__getitem__``.

Pipeline per image (training split; validation and test skip step 3):

1. pixel values scaled to [0, 1] (÷255; digits ÷16);
2. ``pad_to``: zero (black) border, symmetric, the odd pixel at the bottom/right;
3. augmentation when ``augment``: CIFAR a random 32-pixel crop of the image zero-padded by 4
   and a horizontal flip with probability 1/2; Fashion-MNIST the same with padding 2;
   image folders a random crop (see :class:`ImageFolderDataset`) and a flip; digits none;
4. normalisation ``(x − mean_c)/std_c`` with the per-channel mean and population standard
   deviation of the training split as the model sees it (after ``val_fraction``, ``subset``
   and ``pad_to``, without augmentation), so that split has mean 0 and std 1 per channel.
   In-memory data sets use every training pixel; image folders estimate both from up to
   :data:`STATS_SAMPLE` evenly spaced training images.  A channel with std 0 keeps std 1.

Random numbers of the augmentation come from the global torch RNG of the process that loads
the batch: in the main process (``num_workers=0``) the state the harness checkpoints, in a
worker the seed DataLoader derives from the loader's generator.  Either way a run resumes
bit for bit from the torch RNG state and ``loader.generator``'s state.

Example::

    data = load_dataset("digits", subset=500, val_fraction=0.1, seed=0)
    loader = make_loader(data.train, 64, shuffle=True, seed=0)
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DATASETS",
    "FASHION_MNIST_PATH",
    "IMAGE_EXTENSIONS",
    "STATS_SAMPLE",
    "ImageFolderDataset",
    "ImageTensorDataset",
    "LoadedData",
    "load_dataset",
    "make_loader",
    "without_augmentation",
]

#: Names :func:`load_dataset` accepts.
DATASETS = ("fashion-mnist", "digits", "cifar10", "cifar100", "imagefolder")
#: Where Debian's ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_PATH = Path("/usr/share/datasets/fashion-mnist")
#: File suffixes (lower case) an image folder's images may have.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
#: Training images an image folder's normalisation statistics are estimated from.
STATS_SAMPLE = 256

_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_DIGITS_TEST = 360


class _Raw(NamedTuple):
    """A whole in-memory data set: uint8 ``(N, C, H, W)`` images, int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    scale: float  # multiplies the integers into [0, 1]


@dataclass(frozen=True)
class _CifarFormat:
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels_key: bytes
    names_key: bytes
    num_classes: int


_CIFAR = {
    "cifar10": _CifarFormat(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
        10,
    ),
    "cifar100": _CifarFormat(
        "cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names", 100
    ),
}
_AUGMENT_PAD = {"cifar10": 4, "cifar100": 4, "fashion-mnist": 2}


@dataclass(frozen=True)
class LoadedData:
    """A data set's splits and shape.

    Attributes:
        name: the data set's name (one of :data:`DATASETS`).
        train: the training split (augmented when asked).
        val: held out from the training images (``None`` when ``val_fraction`` is 0).
        test: the data set's own test split.
        num_classes: number of classes; labels are ``0 … num_classes − 1``.
        in_channels: image channels (1 grey, 3 RGB).
        classes: class names, index = label.
        mean, std: the per-channel normalisation, shape ``(in_channels,)``.
    """

    name: str
    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    in_channels: int
    classes: tuple[str, ...]
    mean: torch.Tensor
    std: torch.Tensor


# ---- transforms on batches (B, C, H, W) -----------------------------------------------------
def _pad_to(x: torch.Tensor, side: int | None) -> torch.Tensor:
    """Zero-pad the last two dims symmetrically to ``side`` (odd pixel at the bottom/right)."""
    if side is None:
        return x
    h, w = x.shape[-2:]
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(x, (left, side - w - left, top, side - h - top))


def _random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per image: zero-pad by ``pad`` on every side, crop back to (H, W) at a uniform offset."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offset = torch.randint(0, 2 * pad + 1, (b, 2))
    rows = (offset[:, :1] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (offset[:, 1:] + torch.arange(w))[:, None, :]  # (B, 1, W)
    # advanced indices around a slice: the result is (B, H, W, C)
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def _random_flip(x: torch.Tensor) -> torch.Tensor:
    """Per image: mirror left-right with probability 1/2."""
    flip = torch.randint(0, 2, (x.shape[0],), dtype=torch.bool)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean[:, None, None]) / std[:, None, None]


# ---- data sets ------------------------------------------------------------------------------
class ImageTensorDataset(Dataset):
    """Images held in memory as integers; each item is scaled, padded, augmented, normalised.

    Args:
        images: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64.
        scale: multiplies the integers into [0, 1] (1/255; digits 1/16).
        mean, std: per-channel normalisation ``(C,)``, applied last.
        pad_to: zero-pad to this side length first (see the module docstring).
        crop_pad: random crop of the image zero-padded by this many pixels (0: none).
        flip: random horizontal flip.

    ``__getitems__`` transforms a whole batch at once (the DataLoader calls it); ``dataset[i]``
    is the same transform on a batch of one.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        scale: float,
        mean: torch.Tensor,
        std: torch.Tensor,
        pad_to: int | None = None,
        crop_pad: int = 0,
        flip: bool = False,
    ) -> None:
        self.images, self.labels, self.scale = images, labels, scale
        self.mean, self.std = mean, std
        self.pad_to, self.crop_pad, self.flip = pad_to, crop_pad, flip

    def __len__(self) -> int:
        return len(self.labels)

    def _batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _pad_to(self.images[index].float() * self.scale, self.pad_to)
        if self.crop_pad:
            x = _random_crop(x, self.crop_pad)
        if self.flip:
            x = _random_flip(x)
        return _normalise(x, self.mean, self.std), self.labels[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._batch(torch.tensor([int(i)]))
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self._batch(torch.as_tensor(list(indices), dtype=torch.int64))
        return list(zip(x.unbind(0), y.unbind(0), strict=True))


class ImageFolderDataset(Dataset):
    """Image files decoded on access with Pillow, as RGB, to ``image_size``².

    Evaluation (``random_crop=False``): the central square of side min(W, H), resized to
    ``image_size`` (= resize the shorter side, then centre-crop).  Training
    (``random_crop=True``): a crop covering a uniform fraction 0.25–1 of the image's area with
    log-uniform aspect ratio 3/4–4/3 (clamped to the image) at a uniform position, resized to
    ``image_size`` (like torchvision's RandomResizedCrop); then, with ``flip``, a horizontal
    flip with probability 1/2.  Resampling is bilinear.  Then ``pad_to`` and normalisation as
    in :class:`ImageTensorDataset`.  An undecodable file raises ValueError naming it.
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        *,
        image_size: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        pad_to: int | None = None,
        random_crop: bool = False,
        flip: bool = False,
    ) -> None:
        self.files, self.labels = list(files), torch.as_tensor(labels, dtype=torch.int64)
        self.image_size, self.mean, self.std = image_size, mean, std
        self.pad_to, self.random_crop, self.flip = pad_to, random_crop, flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = _decode(self.files[i], self.image_size, random_crop=self.random_crop)[None] / 255.0
        if self.flip:
            x = _random_flip(x)
        return _normalise(_pad_to(x, self.pad_to)[0], self.mean, self.std), self.labels[i]


def _crop_box(w: int, h: int, random_crop: bool) -> tuple[float, float, float, float]:
    if not random_crop:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return (left, top, left + side, top + side)
    area, logr, u, v = torch.rand(4).tolist()
    area = (0.25 + 0.75 * area) * w * h
    ratio = math.exp(math.log(3 / 4) + logr * math.log(16 / 9))
    cw, ch = min(w, math.sqrt(area * ratio)), min(h, math.sqrt(area / ratio))
    left, top = u * (w - cw), v * (h - ch)
    return (left, top, left + cw, top + ch)


def _decode(path: Path, size: int, *, random_crop: bool) -> torch.Tensor:
    """The image at ``path`` as ``(3, size, size)`` uint8 (see :class:`ImageFolderDataset`)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: cannot decode the image ({err})") from err
    box = _crop_box(*rgb.size, random_crop)
    out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)


# ---- readers --------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({err})") from err


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: magic ``00 00 08 ndim``, ``ndim`` big-endian uint32 sizes,
    then the data in C order."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise ValueError(
            f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
            f"(magic {raw[:4].hex()}, expected 000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    if len(raw) != header + math.prod(dims) or not dims:
        raise ValueError(
            f"{path}: {len(raw)} bytes do not match its header (sizes {dims}): "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_fashion(folder: Path) -> dict[str, Path]:
    """The four IDX files by name (``name.gz`` preferred over ``name``)."""
    found = {}
    for stem in _FASHION_FILES:
        hit = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
        if hit is not None:
            found[stem] = hit
    missing = [stem for stem in _FASHION_FILES if stem not in found]
    if missing:
        where = f"in {folder}" if folder.is_dir() else f"{folder} is not a folder"
        raise FileNotFoundError(
            f"Fashion-MNIST: {', '.join(missing)} not found ({where}); expected the IDX files "
            f"{', '.join(f + '.gz' for f in _FASHION_FILES)} (gzipped or not). "
            "Install them with `apt-get install dataset-fashion-mnist` (Debian; they go to "
            f"{FASHION_MNIST_PATH}) or pass the folder holding them as the data path"
        )
    return found


def _fashion(path: Path) -> _Raw:
    files = _find_fashion(path)
    tensors = []
    for split in ("train", "t10k"):
        image_file, label_file = (
            files[f"{split}-images-idx3-ubyte"],
            files[f"{split}-labels-idx1-ubyte"],
        )
        images, labels = _read_idx(image_file, 3), _read_idx(label_file, 1)
        if len(images) != len(labels):
            raise ValueError(
                f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels"
            )
        if labels.size and labels.max() >= 10:
            raise ValueError(f"{label_file}: label {labels.max()} outside 0..9")
        tensors += [
            torch.from_numpy(images.copy())[:, None],
            torch.from_numpy(labels.copy()).long(),
        ]
    return _Raw(*tensors, _FASHION_CLASSES, 1 / 255)


def _digits() -> _Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    index = np.arange(len(bunch.target))
    train, test = train_test_split(
        index, test_size=_DIGITS_TEST, stratify=bunch.target, random_state=0
    )
    images = torch.from_numpy(bunch.images.astype(np.uint8))[:, None]
    labels = torch.from_numpy(bunch.target).long()
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    classes = tuple(map(str, range(10)))
    return _Raw(images[train], labels[train], images[test], labels[test], classes, 1 / 16)


def _unpickle(path: Path) -> dict:
    with path.open("rb") as f:
        try:
            obj = pickle.load(f, encoding="bytes")  # trusted files only: see the docstring
        except Exception as err:  # a corrupt pickle can raise almost anything
            raise ValueError(f"{path}: not a readable CIFAR pickle ({err!r})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _cifar_batch(path: Path, fmt: _CifarFormat) -> tuple[torch.Tensor, torch.Tensor]:
    obj = _unpickle(path)
    data, labels = obj.get(b"data"), obj.get(fmt.labels_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: b'data' is not a uint8 array of shape (N, 3072)")
    if data.shape[1] != 3 * 32 * 32 or labels is None or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected b'data' (N, 3072) and {fmt.labels_key!r} with N labels, found "
            f"{data.shape} and {None if labels is None else len(labels)}"
        )
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < fmt.num_classes:
        raise ValueError(f"{path}: labels outside 0..{fmt.num_classes - 1}")
    # each row: 1024 red, 1024 green, 1024 blue values, each plane 32×32 row-major
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), y


def _cifar(name: str, path: Path | None) -> _Raw:
    fmt = _CIFAR[name]
    if path is None:
        raise ValueError(
            f"path: {name} has no default location; pass the folder holding {fmt.folder}/ "
            "(the python version from https://www.cs.toronto.edu/~kriz/cifar.html)"
        )
    folder = path / fmt.folder if (path / fmt.folder).is_dir() else path
    names = (*fmt.train, fmt.test, fmt.meta)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: {', '.join(missing)} not found in {folder}; expected {', '.join(names)} "
            f"in {path} or {path / fmt.folder} (the python version from "
            "https://www.cs.toronto.edu/~kriz/cifar.html, extracted)"
        )
    train = [_cifar_batch(folder / n, fmt) for n in fmt.train]
    test_x, test_y = _cifar_batch(folder / fmt.test, fmt)
    meta = _unpickle(folder / fmt.meta).get(fmt.names_key)
    if not isinstance(meta, list) or len(meta) != fmt.num_classes:
        raise ValueError(f"{folder / fmt.meta}: expected {fmt.num_classes} {fmt.names_key!r}")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta)
    train_x, train_y = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    return _Raw(train_x, train_y, test_x, test_y, classes, 1 / 255)


def _image_files(folder: Path, classes: Sequence[str] | None) -> tuple[list, list, list]:
    """Files and labels under ``folder/<class>/``; classes sorted by name unless given."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{folder}: class folders {unknown} do not exist in the training split")
    files, labels = [], []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        for f in sorted((folder / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(label)
    if not files:
        raise ValueError(
            f"{folder}: no images in its class folders (suffixes {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files, labels, list(classes)


def _image_folder_splits(path: Path | None) -> tuple[Path, Path]:
    if path is None:
        raise ValueError("path: imagefolder needs the folder holding train/ and val/ (or test/)")
    train = path / "train"
    evaluation = next((path / s for s in ("val", "test") if (path / s).is_dir()), None)
    if not train.is_dir() or evaluation is None:
        raise FileNotFoundError(
            f"imagefolder: expected {train}/<class>/<image> and {path / 'val'}/<class>/<image> "
            f"(or {path / 'test'}/...), found {'no train/' if not train.is_dir() else 'no val/'}"
        )
    return train, evaluation


# ---- splitting and statistics ---------------------------------------------------------------
def _split(
    n: int, *, val_fraction: float, subset: int | None, seed: int, name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training and validation indices (sorted) from one seeded permutation of ``n``.

    The first ``round(val_fraction·n)`` (at least 1 when ``val_fraction > 0``) are held out;
    of the rest, the first ``subset`` train.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n_val >= n:
        raise ValueError(f"val_fraction {val_fraction} leaves no training image of {n} ({name})")
    val, rest = order[:n_val], order[n_val:]
    if subset is not None:
        if subset > len(rest):
            held = f" after holding out {n_val} for validation" if n_val else ""
            raise ValueError(
                f"subset {subset} exceeds the {len(rest)} training images of {name}{held}"
            )
        rest = rest[:subset]
    return rest.sort().values, (val.sort().values if n_val else None)


def _moments(chunks, pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std from ``(B, C, H, W)`` chunks in [0, 1].

    ``pixels`` per channel includes the zero border of ``pad_to`` (zeros add only to it).
    """
    s1 = s2 = torch.zeros((), dtype=torch.float64)
    for x in chunks:
        x = x.double()
        s1 = s1 + x.sum(dim=(0, 2, 3))
        s2 = s2 + (x * x).sum(dim=(0, 2, 3))
    mean = s1 / pixels
    std = (s2 / pixels - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean.float(), std.float()


def _check_pad_to(pad_to: int | None, h: int, w: int, name: str) -> None:
    if pad_to is not None and pad_to < max(h, w):
        raise ValueError(f"pad_to {pad_to} is smaller than the {h}×{w} images of {name}")


def _in_memory(
    name: str,
    raw: _Raw,
    *,
    subset: int | None,
    augment: bool,
    pad_to: int | None,
    val_fraction: float,
    seed: int,
) -> LoadedData:
    train_x, train_y, test_x, test_y, classes, scale = raw
    n, c, h, w = train_x.shape
    _check_pad_to(pad_to, h, w, name)
    train_idx, val_idx = _split(n, val_fraction=val_fraction, subset=subset, seed=seed, name=name)
    side_h, side_w = (pad_to, pad_to) if pad_to else (h, w)
    chunks = (x.float() * scale for x in train_x[train_idx].split(2048))
    mean, std = _moments(chunks, len(train_idx) * side_h * side_w)
    common = {"scale": scale, "mean": mean, "std": std, "pad_to": pad_to}
    crop_pad = _AUGMENT_PAD.get(name, 0) if augment else 0
    train = ImageTensorDataset(
        train_x[train_idx], train_y[train_idx], crop_pad=crop_pad, flip=crop_pad > 0, **common
    )
    val = None
    if val_idx is not None:
        val = ImageTensorDataset(train_x[val_idx], train_y[val_idx], **common)
    test = ImageTensorDataset(test_x, test_y, **common)
    return LoadedData(name, train, val, test, len(classes), c, classes, mean, std)


def _image_folder(
    path: Path | None,
    *,
    subset: int | None,
    augment: bool,
    pad_to: int | None,
    val_fraction: float,
    seed: int,
    image_size: int,
) -> LoadedData:
    name = "imagefolder"
    train_dir, eval_dir = _image_folder_splits(path)
    files, labels, classes = _image_files(train_dir, None)
    test_files, test_labels, _ = _image_files(eval_dir, classes)
    _check_pad_to(pad_to, image_size, image_size, name)
    train_idx, val_idx = _split(
        len(files), val_fraction=val_fraction, subset=subset, seed=seed, name=name
    )
    picked = torch.linspace(0, len(train_idx) - 1, min(STATS_SAMPLE, len(train_idx)))
    sample = [files[int(train_idx[int(i)])] for i in picked.round()]
    side = pad_to or image_size
    chunks = (_decode(f, image_size, random_crop=False)[None] / 255.0 for f in sample)
    mean, std = _moments(chunks, len(sample) * side * side)
    common = {"image_size": image_size, "mean": mean, "std": std, "pad_to": pad_to}

    def subset_of(index: torch.Tensor) -> tuple[list, list]:
        return [files[i] for i in index.tolist()], [labels[i] for i in index.tolist()]

    train = ImageFolderDataset(*subset_of(train_idx), random_crop=augment, flip=augment, **common)
    val = ImageFolderDataset(*subset_of(val_idx), **common) if val_idx is not None else None
    test = ImageFolderDataset(test_files, test_labels, **common)
    return LoadedData(name, train, val, test, len(classes), 3, tuple(classes), mean, std)


def _check_arguments(
    subset: int | None, pad_to: int | None, val_fraction: float, seed: int, image_size: int
) -> None:
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for label, value in (("subset", subset), ("pad_to", pad_to), ("image_size", image_size)):
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction <= 0.9:
        raise ValueError(f"val_fraction must be a number in [0, 0.9], got {val_fraction!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")


def load_dataset(
    name: str,
    path: str | Path | None = None,
    *,
    subset: int | None = None,
    augment: bool = True,
    pad_to: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    image_size: int = 64,
) -> LoadedData:
    """Load the data set ``name`` (one of :data:`DATASETS`) as the module docstring describes.

    Args:
        name: the data set.
        path: its folder (Fashion-MNIST default :data:`FASHION_MNIST_PATH`; digits ignores it;
            CIFAR and image folders need it).
        subset: train on ``subset`` training images only: the first ones of a permutation
            seeded by ``seed`` after the validation images are taken out, so every method
            with the same seed sees the same images.  More than there are is an error.
        augment: apply the data set's training augmentation to the training split.
        pad_to: zero-pad every image to this side (it must not be smaller than the image).
        val_fraction: fraction in [0, 0.9] of the training images held out (the first ones of
            the same seeded permutation) as the ``val`` split, never augmented.
        seed: seeds the permutation; the global RNG is left alone.
        image_size: side length image folders are cropped and resized to.

    Raises:
        ValueError: unknown name, bad argument (named), corrupt or truncated file (named).
        FileNotFoundError: missing folder or files, listing the files expected.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    _check_arguments(subset, pad_to, val_fraction, seed, image_size)
    folder = Path(path).expanduser() if path is not None else None
    split = {
        "subset": subset,
        "augment": augment,
        "pad_to": pad_to,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    if name == "imagefolder":
        return _image_folder(folder, image_size=image_size, **split)
    if name == "fashion-mnist":
        raw = _fashion(folder or FASHION_MNIST_PATH)
    elif name == "digits":
        raw = _digits()
    else:
        raw = _cifar(name, folder)
    return _in_memory(name, raw, **split)


def without_augmentation(dataset: Dataset) -> Dataset:
    """The same images as ``dataset`` with its random augmentation switched off.

    What the model sees of the training split at evaluation time (padding and normalisation
    kept); used to measure how well a run fits its training images.  Returns ``dataset``
    itself when it has no augmentation.
    """
    if isinstance(dataset, ImageTensorDataset):
        if not dataset.crop_pad and not dataset.flip:
            return dataset
        return ImageTensorDataset(
            dataset.images,
            dataset.labels,
            scale=dataset.scale,
            mean=dataset.mean,
            std=dataset.std,
            pad_to=dataset.pad_to,
        )
    if isinstance(dataset, ImageFolderDataset):
        if not dataset.random_crop and not dataset.flip:
            return dataset
        return ImageFolderDataset(
            dataset.files,
            dataset.labels.tolist(),
            image_size=dataset.image_size,
            mean=dataset.mean,
            std=dataset.std,
            pad_to=dataset.pad_to,
        )
    raise TypeError(f"without_augmentation: unknown data set type {type(dataset).__name__}")


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader with its own ``torch.Generator`` seeded by ``seed`` (``loader.generator``).

    The generator orders a shuffled epoch and seeds the worker processes, so its state plus the
    global torch RNG state reproduce the loader's batches exactly.  With a ``sampler`` (e.g. a
    ``DistributedSampler``) the sampler orders the epoch and ``shuffle`` only marks the loader
    as a training loader.  A training loader (``shuffle=True``) keeps its last, smaller batch,
    except a batch of a single image (BatchNorm cannot normalise one sample on 1×1 maps),
    which it drops.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    count = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=shuffle and count > batch_size and count % batch_size == 1,
    )
