"""Data loaders on small files written here in each real format, splits, augmentation, loaders."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradshape.harness.data import DATASETS, FASHION_MNIST_PATH, load_dataset, make_loader

FASHION_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _raw(ds, data) -> torch.Tensor:
    """Every item of ``ds`` un-normalised back to [0, 1] pixels, stacked ``(N, C, H, W)``."""
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    return x * data.std[:, None, None] + data.mean[:, None, None]


def _labels(ds) -> list[int]:
    return [int(ds[i][1]) for i in range(len(ds))]


# ---- Fashion-MNIST (IDX) --------------------------------------------------------------------
def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX format: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian uint32 sizes, C-order data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, *, gz: bool, n_train=40, n_test=6, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 7, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 7, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


@pytest.fixture
def fashion(tmp_path):
    return tmp_path, _write_fashion(tmp_path, gz=True)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_pixels_labels_and_shape(tmp_path, gz):
    arrays = _write_fashion(tmp_path, gz=gz)
    data = load_dataset("fashion-mnist", tmp_path, augment=False)
    assert (data.name, data.num_classes, data.in_channels) == ("fashion-mnist", 10, 1)
    assert data.val is None and len(data.classes) == 10
    for ds, images, labels in (
        (data.train, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        (data.test, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ):
        x, y = ds[0]
        assert x.dtype == torch.float32 and x.shape == (1, 7, 5) and y.dtype == torch.int64
        expected = torch.from_numpy(arrays[images]).float()[:, None] / 255
        torch.testing.assert_close(_raw(ds, data), expected, atol=1e-6, rtol=0)
        assert _labels(ds) == arrays[labels].tolist()


def test_normalisation_uses_training_split_statistics(fashion):
    folder, arrays = fashion
    for pad_to in (None, 9):
        data = load_dataset("fashion-mnist", folder, augment=False, pad_to=pad_to)
        x = torch.stack([data.train[i][0] for i in range(len(data.train))]).double()
        assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-5
    data = load_dataset("fashion-mnist", folder, augment=False)
    pixels = arrays["train-images-idx3-ubyte"] / 255.0
    assert float(data.mean[0]) == pytest.approx(pixels.mean(), rel=1e-5)
    assert float(data.std[0]) == pytest.approx(pixels.std(), rel=1e-5)


def test_pad_to_adds_a_black_border(fashion):
    folder, arrays = fashion
    data = load_dataset("fashion-mnist", folder, augment=False, pad_to=10)
    x = _raw(data.test, data)
    assert x.shape == (6, 1, 10, 10)
    # 7 → 10 rows: 1 above, 2 below; 5 → 10 columns: 2 left, 3 right
    expected = torch.zeros(6, 1, 10, 10)
    expected[:, 0, 1:8, 2:7] = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 255
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pad_to 6 is smaller than the 7×5 images"):
        load_dataset("fashion-mnist", folder, pad_to=6)


def _is_shifted_copy(out: torch.Tensor, image: torch.Tensor, pad: int) -> tuple[int, int, bool]:
    """The (row, column, flipped) of the crop of zero-padded ``image`` that equals ``out``."""
    h, w = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    hits = [
        (r, c, flip)
        for r in range(2 * pad + 1)
        for c in range(2 * pad + 1)
        for flip in (False, True)
        if torch.allclose(
            padded[..., r : r + h, c : c + w].flip(-1)
            if flip
            else padded[..., r : r + h, c : c + w],
            out,
            atol=1e-5,
        )
    ]
    assert hits, "the augmented image is no shifted crop of the original"
    return hits[0]


def test_fashion_augmentation_is_a_shifted_crop_and_flip(fashion):
    folder, arrays = fashion
    data = load_dataset("fashion-mnist", folder)
    image = torch.from_numpy(arrays["train-images-idx3-ubyte"][3]).float()[None] / 255
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        out = data.train[3][0] * data.std[0] + data.mean[0]
        seen.add(_is_shifted_copy(out, image, pad=2))
    assert len({(r, c) for r, c, _ in seen}) > 5 and {f for *_, f in seen} == {False, True}
    clean = _raw(data.test, data)  # the test split is never augmented
    torch.testing.assert_close(
        clean[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 255
    )


def _identities(ds, data, arrays) -> list[int]:
    """The index in the training file of every (unaugmented) image of ``ds``."""
    originals = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float()[:, None] / 255
    found = []
    for x in _raw(ds, data):
        (match,) = torch.nonzero((originals - x).abs().amax(dim=(1, 2, 3)) < 1e-5)
        found.append(int(match))
    return found


def test_validation_and_subset_split(fashion):
    folder, arrays = fashion

    def split(seed, subset):
        data = load_dataset(
            "fashion-mnist", folder, augment=False, val_fraction=0.25, subset=subset, seed=seed
        )
        assert len(data.test) == 6  # never taken from the test set
        return _identities(data.train, data, arrays), _identities(data.val, data, arrays)

    train, val = split(seed=1, subset=12)
    assert len(train) == 12 and len(val) == 10 and not set(train) & set(val)
    assert split(seed=1, subset=12) == (train, val)  # deterministic by seed
    train_more, val_same = split(seed=1, subset=20)
    assert val_same == val and set(train) < set(train_more)  # the first `subset` of one order
    assert set(split(seed=2, subset=None)[1]) != set(val)
    full_train, _ = split(seed=1, subset=None)
    assert sorted(full_train + val) == list(range(40))


def test_bad_arguments_name_the_parameter(fashion):
    folder, _ = fashion
    with pytest.raises(ValueError, match="subset must be an int >= 1"):
        load_dataset("fashion-mnist", folder, subset=0)
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \[0, 0.9\]"):
        load_dataset("fashion-mnist", folder, val_fraction=0.95)
    with pytest.raises(ValueError, match="subset 31 exceeds the 30 training images"):
        load_dataset("fashion-mnist", folder, subset=31, val_fraction=0.25)
    with pytest.raises(ValueError, match="unknown data set 'mnist'") as err:
        load_dataset("mnist")
    assert all(name in str(err.value) for name in DATASETS)


def test_missing_fashion_folder_says_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    message = str(err.value)
    assert all(name in message for name in FASHION_NAMES)
    assert "apt-get install dataset-fashion-mnist" in message and "nowhere" in message


def test_corrupt_idx_files_are_named(tmp_path):
    _write_fashion(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-2])  # truncated
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: .* truncated or corrupt"):
        load_dataset("fashion-mnist", tmp_path)
    labels.unlink()
    _write_fashion(tmp_path, gz=True)  # the .gz files are preferred
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-20])  # truncated gzip stream
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: corrupt or truncated"):
        load_dataset("fashion-mnist", tmp_path)
    raw = bytearray(_idx_bytes(np.zeros((2, 3, 3), np.uint8)))
    raw[2] = 0x0D  # float32 type code
    images.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte.gz: not an IDX .*\(magic 00000d03"
    ):
        load_dataset("fashion-mnist", tmp_path)


@pytest.mark.skipif(
    not (FASHION_MNIST_PATH / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist():
    data = load_dataset("fashion-mnist", augment=False)
    assert (len(data.train), len(data.test), data.num_classes) == (60_000, 10_000, 10)
    assert data.train[0][0].shape == (1, 28, 28)
    # the widely quoted Fashion-MNIST training statistics
    assert float(data.mean[0]) == pytest.approx(0.2860, abs=1e-4)
    assert float(data.std[0]) == pytest.approx(0.3530, abs=1e-4)
    assert sorted(set(_labels(torch.utils.data.Subset(data.test, range(500))))) == list(range(10))


# ---- digits ---------------------------------------------------------------------------------
def test_digits_fixed_stratified_split():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = load_dataset("digits", seed=7)
    assert (len(data.train), len(data.test), data.in_channels) == (1437, 360, 1)
    levels = _raw(data.train, data) * 16
    assert levels.shape == (1437, 1, 8, 8)
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    counts = np.bincount(_labels(data.test), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 36 per class, ±1
    # the two splits together are exactly the 1,797 images (as sorted rows)
    both = torch.cat([levels, _raw(data.test, data) * 16]).round().reshape(1797, 64)
    rows = sorted(map(tuple, both.int().tolist()))
    assert rows == sorted(map(tuple, bunch.images.reshape(1797, 64).astype(int).tolist()))
    other = load_dataset("digits", seed=8)  # the test split does not depend on the seed
    torch.testing.assert_close(_raw(other.test, other), _raw(data.test, data))


# ---- CIFAR (python pickles) -----------------------------------------------------------------
def _cifar_row(image: np.ndarray) -> np.ndarray:
    """The official layout: 1024 red, then 1024 green, then 1024 blue values, row-major."""
    return np.concatenate([image[0].ravel(), image[1].ravel(), image[2].ravel()])


def _dump(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj))


def _write_cifar(root: Path, hundred: bool) -> tuple[np.ndarray, list, np.ndarray, list]:
    rng = np.random.default_rng(3)
    classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    batches = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    train_images, train_labels = [], []
    for name in [*batches, "test"]:
        images = rng.integers(0, 256, (2 if name != "test" else 3, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, classes, len(images)).tolist()
        batch = {b"batch_label": name.encode(), b"data": np.stack([_cifar_row(i) for i in images])}
        if hundred:
            batch |= {b"fine_labels": labels, b"coarse_labels": [v // 5 for v in labels]}
        else:
            batch[b"labels"] = labels
        file = name if hundred or name != "test" else "test_batch"
        _dump(folder / file, batch)
        if name == "test":
            test_images, test_labels = images, labels
        else:
            train_images.append(images)
            train_labels += labels
    names = [f"class{i}".encode() for i in range(classes)]
    if hundred:
        _dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": names[:20]})
    else:
        _dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 2})
    return np.concatenate(train_images), train_labels, test_images, test_labels


@pytest.mark.parametrize(("name", "hundred"), [("cifar10", False), ("cifar100", True)])
def test_cifar_pickles(tmp_path, name, hundred):
    train_x, train_y, test_x, test_y = _write_cifar(tmp_path, hundred)
    folder = tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    for where in (tmp_path, folder):  # the parent or the folder itself
        data = load_dataset(name, where, augment=False)
        assert data.num_classes == (100 if hundred else 10) and data.in_channels == 3
        assert data.classes[7] == "class7"
        torch.testing.assert_close(
            _raw(data.train, data), torch.from_numpy(train_x).float() / 255, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            _raw(data.test, data), torch.from_numpy(test_x).float() / 255, atol=1e-6, rtol=0
        )
        assert _labels(data.train) == train_y and _labels(data.test) == test_y


def test_cifar_augmentation_is_a_shifted_crop_and_flip(tmp_path):
    train_x, *_ = _write_cifar(tmp_path, hundred=False)
    data = load_dataset("cifar10", tmp_path, seed=0)
    torch.manual_seed(1)
    image = torch.from_numpy(train_x[4]).float() / 255
    seen = set()
    for _ in range(30):
        x = data.train[4][0] * data.std[:, None, None] + data.mean[:, None, None]
        seen.add(_is_shifted_copy(x, image, pad=4))
    assert len(seen) > 10


def test_corrupt_and_missing_cifar_files(tmp_path):
    _write_cifar(tmp_path, hundred=False)
    folder = tmp_path / "cifar-10-batches-py"
    good = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="data_batch_3: not a readable CIFAR pickle"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="data_batch_3: not a readable CIFAR pickle"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(good)
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch not found .* expected data_batch_1"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="path: cifar100 has no default location"):
        load_dataset("cifar100")


# ---- image folders --------------------------------------------------------------------------
def _save(path: Path, array: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(5)
    images = {}
    for split, count in (("train", 3), ("val", 1)):
        for cls in ("zebra", "ant"):  # created out of order: classes sort by name
            for i in range(count):
                images[split, cls, i] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                _save(tmp_path / split / cls / f"{i}.png", images[split, cls, i])
    return tmp_path, images


def test_image_folder_pixels_labels_and_statistics(folders):
    root, images = folders
    data = load_dataset("imagefolder", root, augment=False, image_size=8)
    assert data.classes == ("ant", "zebra") and (data.num_classes, data.in_channels) == (2, 3)
    assert len(data.train) == 6 and len(data.test) == 2
    expected = [images["train", c, i] for c in ("ant", "zebra") for i in range(3)]
    expected = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(_raw(data.train, data), expected, atol=1e-6, rtol=0)
    assert _labels(data.train) == [0, 0, 0, 1, 1, 1] and _labels(data.test) == [0, 1]
    x = torch.stack([data.train[i][0] for i in range(6)]).double()
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3).double())


def test_image_folder_crops_converts_and_decodes(tmp_path):
    rng = np.random.default_rng(6)
    wide = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)  # h 8, w 16
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    smooth = np.tile(np.linspace(0, 255, 8, dtype=np.uint8)[None, :, None], (8, 1, 3))
    _save(tmp_path / "train" / "a" / "wide.png", wide)
    _save(tmp_path / "train" / "b" / "grey.png", grey)
    _save(tmp_path / "test" / "b" / "smooth.jpg", smooth, "JPEG")
    data = load_dataset("imagefolder", tmp_path, augment=False, image_size=8)
    train = _raw(data.train, data)
    # shorter side 8 already: the central 8 columns
    expected = torch.from_numpy(wide[:, 4:12]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(train[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(train[1], torch.from_numpy(grey).float().expand(3, 8, 8) / 255)
    jpeg = _raw(data.test, data)[0]
    target = torch.from_numpy(smooth).permute(2, 0, 1).float() / 255
    assert float((jpeg - target).abs().mean()) < 0.03  # lossy, but the same picture
    small = load_dataset("imagefolder", tmp_path, augment=False, image_size=4)
    padded = load_dataset("imagefolder", tmp_path, augment=False, image_size=4, pad_to=6)
    x = _raw(padded.train, padded)
    expected = torch.nn.functional.pad(_raw(small.train, small), (1, 1, 1, 1))
    assert x.shape == (2, 3, 6, 6)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)  # black 1-pixel border


def test_image_folder_augmentation(tmp_path):
    red = np.zeros((12, 20, 3), np.uint8)
    red[..., 0] = 200
    _save(tmp_path / "train" / "a" / "red.png", red)
    _save(tmp_path / "val" / "a" / "red.png", red)
    data = load_dataset("imagefolder", tmp_path, image_size=6)
    torch.manual_seed(3)
    first = [data.train[0][0] for _ in range(3)]
    torch.manual_seed(3)
    again = [data.train[0][0] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    x = first[0] * data.std[:, None, None] + data.mean[:, None, None]
    expected = torch.tensor([200 / 255, 0, 0]).view(3, 1, 1).expand(3, 6, 6)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)  # any crop of one colour


def test_image_folder_errors(folders):
    root, _ = folders
    (root / "val" / "ant" / "bad.png").write_bytes(b"not an image at all")
    data = load_dataset("imagefolder", root, image_size=8)
    with pytest.raises(ValueError, match=r"bad.png: cannot decode the image"):
        data.test[1]  # val/ant/bad.png, after val/ant/0.png
    (root / "val" / "moth").mkdir()
    (root / "val" / "moth" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"class folders \['moth'\] do not exist"):
        load_dataset("imagefolder", root)
    with pytest.raises(FileNotFoundError, match="expected .*train/<class>/<image>"):
        load_dataset("imagefolder", root / "val")


# ---- loaders --------------------------------------------------------------------------------
def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)
    )


def test_loader_is_reproducible_from_generator_and_torch_state(fashion):
    folder, _ = fashion
    data = load_dataset("fashion-mnist", folder)  # augmented
    torch.manual_seed(0)
    loader = make_loader(data.train, 8, shuffle=True, seed=4)
    _epoch(loader)
    saved = (torch.get_rng_state(), loader.generator.get_state())
    second = _epoch(loader)
    torch.set_rng_state(saved[0])
    resumed = make_loader(data.train, 8, shuffle=True, seed=4)
    resumed.generator.set_state(saved[1])
    assert _same(second, _epoch(resumed))  # resume continues bit for bit
    torch.manual_seed(0)
    other = make_loader(data.train, 8, shuffle=True, seed=5)
    order = [int(y) for _, ys in _epoch(other) for y in ys]
    torch.manual_seed(0)
    order4 = [
        int(y) for _, ys in _epoch(make_loader(data.train, 8, shuffle=True, seed=4)) for y in ys
    ]
    assert order != order4 and sorted(order) == sorted(order4)


def test_loader_with_a_worker_is_seeded_by_the_generator(fashion):
    folder, _ = fashion
    data = load_dataset("fashion-mnist", folder)
    runs = []
    for global_seed in (0, 1):  # the worker's RNG comes from the loader's generator
        torch.manual_seed(global_seed)
        runs.append(_epoch(make_loader(data.train, 16, shuffle=True, seed=2, num_workers=1)))
    assert _same(*runs)


def test_loader_batches(fashion):
    folder, _ = fashion
    data = load_dataset("fashion-mnist", folder, augment=False)  # 40 training images
    sizes = [len(y) for _, y in make_loader(data.train, 16, shuffle=True, seed=0)]
    assert sizes == [16, 16, 8]  # the last, smaller batch is kept
    sizes = [len(y) for _, y in make_loader(data.train, 13, shuffle=True, seed=0)]
    assert sizes == [13, 13, 13]  # a last batch of one image is dropped in training
    sizes = [len(y) for _, y in make_loader(data.train, 13, shuffle=False, seed=0)]
    assert sizes == [13, 13, 13, 1]
    x, y = next(iter(make_loader(data.test, 4, shuffle=False, seed=0)))
    assert x.shape == (4, 1, 7, 5) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[2], data.test[2][0])  # unshuffled: in order
