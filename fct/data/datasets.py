"""Data sets by name: what each one is (`dataset_info`) and how to read a split (`build_dataset`).

- `digits`: scikit-learn's bundled 8x8 digits (no download; data_root ignored). Train: random crop
  with padding 1 (no flip). Mean/std measured on the training pixels.
- `npz`: data_root/train.npz and val.npz (uint8 (N, H, W, 3) images, int64 labels). Train: random
  crop with padding H//8 (4 for 32x32) + horizontal flip. Mean/std measured on the training
  pixels, cached under $FCT_CACHE_DIR (default ~/.cache/fct; see fct.data.arrays.stats_cache_dir),
  never in the data folder, which fct only reads.
- `cifar100`: the same array files (written by prepare_dataset.py), or the reference layout
  training/<class id>/*.png and validation/<class id>/*.png. 32x32; train: random crop with
  padding 4 + flip. The published CIFAR-100 mean/std.
- `imagenet`, `imagefolder`: data_root/train/<class>/ and val/<class>/ (or training/,
  validation/). Train: RandomResizedCrop 224 + flip. ImageNet mean/std.
- `webdataset`: tar shards and their index data_root/webdataset.json (fct/data/webdataset.py),
  written from any of the above by ``prepare_dataset.py --format webdataset``; read as a stream
  (an IterableDataset) with the augmentation and mean/std of the data set it was written from.

Evaluation transforms are deterministic: the array sets only normalise; the folder photo sets
resize to 256 and centre-crop 224. ``num_classes=K`` keeps the samples with label < K (label ids,
not folder order); see fct/data/folders.py for how folder names become labels. An empty split,
or one that ``num_classes`` leaves empty, is a UserError naming the file or folder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from fct.config.common import DatasetParams
from fct.data import arrays, folders, webdataset
from fct.data.arrays import Stats
from fct.data.transforms import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArrayTransform,
    imagenet_transforms,
    pil_array_transform,
)
from fct.errors import UserError
from fct.registry import Registry

SPLITS = ("train", "val")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set before reading it."""

    name: str
    num_classes: int  # classes in the whole data (largest label + 1)
    image_size: int  # training crop size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class DataSource(ABC):
    """One data set at one location. Registered classes are built as ``cls(name, data_root,
    options)``; ``options`` (the config's DatasetParams, or None for defaults) carries the keys
    that only some data sets read (webdataset's urls, num_samples, shuffle_buffer)."""

    def __init__(self, name: str, data_root: str, options: Any = None) -> None:
        self.name = name
        self.root = Path(data_root).expanduser()
        self.options = options

    @abstractmethod
    def info(self) -> DatasetInfo: ...

    @abstractmethod
    def build(self, split: str, augment: bool, num_classes: int | None) -> Dataset: ...


DATASETS: Registry[Callable[..., DataSource]] = Registry("dataset")


def check_not_empty(labels: np.ndarray, source: str | Path, split: str) -> None:
    """UserError naming ``source`` (the split's file or folder) when the split holds no image:
    every consumer (batching, probing ``dataset[0]``) would fail later with an obscure error."""
    if len(labels) == 0:
        raise UserError(f"{source} holds no images (the {split} split is empty)")


def kept_indices(
    labels: np.ndarray, num_classes: int | None, total: int, where: str, source: str | Path = ""
) -> np.ndarray | None:
    """Indices of the samples with label < num_classes; None keeps all.

    A request for more classes than the data holds is a UserError, not a silent "all"; so is a
    selection that keeps no sample (e.g. labels 1000..1099 with num_classes=10): ``source``
    names the split's file or folder in that message.
    """
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise UserError(f"dataset_params.num_classes must be a positive integer, got {num_classes!r}")
    if num_classes > total:
        raise UserError(f"dataset_params.num_classes={num_classes} but {where} has only {total} classes")
    keep = np.flatnonzero(labels < num_classes)
    if keep.size == 0 and len(labels) > 0:
        raise UserError(
            f"dataset_params.num_classes={num_classes} keeps no image of {source or where}: its labels run "
            f"from {int(labels.min())} to {int(labels.max())}, none below {num_classes}"
        )
    return keep


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# --------------------------------------------------------------------------- digits
# scikit-learn's 1797 8x8 digits. Split: per class, a seeded permutation (numpy PCG64, seed 0)
# sends round(20%) of the samples to 'val' and the rest to 'train': 1438 train / 359 val.
_DIGITS_SEED = 0
_DIGITS_VAL_FRACTION = 0.2


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """images uint8 (1797, 8, 8, 3), labels int64 (1797,), {'train'|'val': sorted indices}."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # Values 0..16 -> 0..255, replicated to 3 channels so the models see RGB-shaped input.
    gray = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(_DIGITS_SEED)
    val = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[: int(round(_DIGITS_VAL_FRACTION * len(idx)))])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return images, labels, {"train": train_idx, "val": val_idx}


@lru_cache(maxsize=1)
def _digits_stats() -> Stats:
    images, _, split = _digits()
    return arrays.pixel_mean_std(images[split["train"]])


@DATASETS.register("digits")
class DigitsSource(DataSource):
    """scikit-learn's bundled digits: no download, data_root ignored."""

    def info(self) -> DatasetInfo:
        mean, std = _digits_stats()
        return DatasetInfo(self.name, 10, 8, mean, std)

    def build(self, split: str, augment: bool, num_classes: int | None) -> Dataset:
        _check_split(split)
        images, labels, split_idx = _digits()
        idx = split_idx[split]
        keep = kept_indices(labels[idx], num_classes, 10, "the digits data set")
        if keep is not None:
            idx = idx[keep]
        mean, std = _digits_stats()
        # No flip: digits are not mirror-symmetric.
        transform = ArrayTransform(mean, std, pad=1 if augment else 0)
        return arrays.ArrayDataset(images, labels, transform, 10, indices=idx)


# --------------------------------------------------------------------------- array folders
def _array_num_classes(root: Path, hint: str) -> int:
    path = arrays.npz_path(root, "train", hint)
    labels = arrays.load_labels(path)
    check_not_empty(labels, path, "train")
    return int(labels.max()) + 1


def _array_info(name: str, root: Path, hint: str, stats: Stats | None) -> DatasetInfo:
    """``stats`` None: measured on the training images (cached under the fct cache folder)."""
    total = _array_num_classes(root, hint)
    train = arrays.npz_path(root, "train", hint)
    size = arrays.read_shapes(train)["images"][0][1]
    mean, std = stats if stats is not None else arrays.cached_mean_std(train)
    return DatasetInfo(name, total, size, mean, std)


def _array_build(
    root: Path, split: str, augment: bool, num_classes: int | None, hint: str, stats: Stats | None
) -> Dataset:
    path = arrays.npz_path(root, split, hint)
    images, labels = arrays.load_arrays(path)
    check_not_empty(labels, path, split)
    total = int(labels.max()) + 1 if split == "train" else _array_num_classes(root, hint)
    if labels.max() >= total:
        raise UserError(f"{path} has label {labels.max()} but train.npz only labels 0..{total - 1}")
    keep = kept_indices(labels, num_classes, total, str(root), path)
    if stats is None:
        stats = arrays.cached_mean_std(
            arrays.npz_path(root, "train", hint), images if split == "train" else None
        )
    size = images.shape[1]
    # Padding 4 for 32x32 (the usual CIFAR recipe), scaled with the image size.
    transform = (
        ArrayTransform(*stats, pad=max(1, size // 8), flip=True) if augment else ArrayTransform(*stats)
    )
    return arrays.ArrayDataset(images, labels, transform, total, indices=keep)


@DATASETS.register("npz")
class NpzSource(DataSource):
    """data_root/train.npz and data_root/val.npz (uint8 NHWC images, int64 labels)."""

    hint = "convert an image-folder layout with `python prepare_dataset.py npz --source DIR --out DIR`"

    def info(self) -> DatasetInfo:
        return _array_info(self.name, self.root, self.hint, None)

    def build(self, split: str, augment: bool, num_classes: int | None) -> Dataset:
        _check_split(split)
        return _array_build(self.root, split, augment, num_classes, self.hint, None)


# --------------------------------------------------------------------------- cifar100
_CIFAR_STATS: Stats = (CIFAR100_MEAN, CIFAR100_STD)


@DATASETS.register("cifar100")
class Cifar100Source(DataSource):
    """CIFAR-100 as arrays (train.npz/val.npz, preferred: fast) or the reference PNG layout
    (training/<class id>/*.png, validation/<class id>/*.png), detected from what data_root holds."""

    @property
    def hint(self) -> str:
        return f"run `python prepare_dataset.py cifar100 --out {self.root}`"

    def _is_arrays(self) -> bool:
        if (self.root / "train.npz").is_file():
            return True
        if (self.root / "training").is_dir():
            return False
        raise UserError(
            f"no CIFAR-100 data in {self.root} (expected train.npz and val.npz, or the folders "
            f"training/ and validation/); {self.hint}"
        )

    def info(self) -> DatasetInfo:
        if self._is_arrays():
            return _array_info(self.name, self.root, self.hint, _CIFAR_STATS)
        train_dir = folders.find_split_dir(self.root, "train", self.hint)
        mapping = folders.class_mapping(folders.class_folders(train_dir), train_dir)
        return DatasetInfo(self.name, folders.num_classes_of(mapping), 32, *_CIFAR_STATS)

    def build(self, split: str, augment: bool, num_classes: int | None) -> Dataset:
        _check_split(split)
        if self._is_arrays():
            return _array_build(self.root, split, augment, num_classes, self.hint, _CIFAR_STATS)
        transform = (
            ArrayTransform(*_CIFAR_STATS, pad=4, flip=True) if augment else ArrayTransform(*_CIFAR_STATS)
        )
        return _folder_build(
            self.root, split, num_classes, self.hint, pil_array_transform(transform), expected_size=(32, 32)
        )


# --------------------------------------------------------------------------- image folders
def _folder_build(
    root: Path,
    split: str,
    num_classes: int | None,
    hint: str,
    transform: Callable,
    expected_size: tuple[int, int] | None = None,
) -> Dataset:
    train_dir = folders.find_split_dir(root, "train", hint)
    mapping = folders.class_mapping(folders.class_folders(train_dir), train_dir)
    total = folders.num_classes_of(mapping)
    split_dir = train_dir if split == "train" else folders.find_split_dir(root, split, hint)
    samples = folders.scan_samples(split_dir, mapping)
    labels = np.array([s[1] for s in samples], dtype=np.int64)
    keep = kept_indices(labels, num_classes, total, str(root), split_dir)
    if keep is not None:
        samples = [samples[i] for i in keep]
    return folders.ImageFileDataset(samples, transform, total, expected_size=expected_size)


@DATASETS.register("imagenet")
@DATASETS.register("imagefolder")
class ImageFolderSource(DataSource):
    """Photos in class folders: data_root/train/<class>/* and data_root/val/<class>/*."""

    hint = "expected data_root/train/<class>/<images> and data_root/val/<class>/<images>"

    def info(self) -> DatasetInfo:
        train_dir = folders.find_split_dir(self.root, "train", self.hint)
        mapping = folders.class_mapping(folders.class_folders(train_dir), train_dir)
        return DatasetInfo(self.name, folders.num_classes_of(mapping), 224, IMAGENET_MEAN, IMAGENET_STD)

    def build(self, split: str, augment: bool, num_classes: int | None) -> Dataset:
        _check_split(split)
        return _folder_build(self.root, split, num_classes, self.hint, imagenet_transforms(augment))


# --------------------------------------------------------------------------- WebDataset shards
@DATASETS.register("webdataset")
class WebDatasetSource(DataSource):
    """Tar shards and their index (data_root/webdataset.json); ``options.urls`` may move the
    shards elsewhere (any URL WebDataset reads), ``options.num_samples`` checks the split sizes."""

    def _index(self) -> "webdataset.Index":
        index = webdataset.read_index(self.root)
        counts = getattr(self.options, "num_samples", None)
        for split in SPLITS:
            given = getattr(counts, split, None) if counts is not None else None
            if given is not None and given != index.split_total(split):
                raise UserError(
                    f"dataset_params.num_samples.{split}={given} but {index.path} counts "
                    f"{index.split_total(split)} {split} samples; correct the key or rewrite the shards"
                )
        return index

    def info(self) -> DatasetInfo:
        index = self._index()
        return DatasetInfo(self.name, index.num_classes, index.image_size, index.mean, index.std)

    def build(self, split: str, augment: bool, num_classes: int | None) -> Dataset:
        _check_split(split)
        urls = getattr(self.options, "urls", None)
        return webdataset.build_stream(
            self._index(), split, augment=augment, num_classes=num_classes,
            url_override=getattr(urls, split, None) if urls is not None else None,
            url_key=f"dataset_params.urls.{split}",
            shuffle_buffer=(self.options or DatasetParams(name=self.name)).shuffle_buffer,
        )


# --------------------------------------------------------------------------- entry points
def dataset_info(name: str, data_root: str, options: Any = None) -> DatasetInfo:
    """Classes, crop size and normalisation of a data set (cheap: no image is decoded, except
    that an `npz` set without its mean/std cache reads its training images once).
    options: the config's DatasetParams (only some data sets read it; None: defaults)."""
    return DATASETS.get(name)(name, data_root, options).info()


def build_dataset(
    name: str, data_root: str, split: str, *, augment: bool, num_classes: int | None = None,
    options: Any = None,
) -> Dataset:
    """A split as a Dataset of (float32 (3, H, W), int label).

    augment: training transforms, else the deterministic evaluation ones (feature extraction).
    num_classes: keep the samples with label < num_classes (None: all).
    options: the config's DatasetParams (only some data sets read it; None: defaults).
    Map-style sets have ``.labels`` (int64 (N,), the kept samples) and ``.num_classes_total``;
    ``webdataset`` gives a :class:`fct.data.webdataset.ShardStream` (an IterableDataset), which
    ``fct.training.loaders`` reads as a stream.
    """
    return DATASETS.get(name)(name, data_root, options).build(split, augment, num_classes)


# --------------------------------------------------------------------------- training subsets
class LabelledSubset(Dataset):
    """The items ``indices`` of a dataset that has ``.labels``; keeps batched fetching and the
    ``labels`` / ``num_classes_total`` attributes the rest of the code reads."""

    def __init__(self, base: Dataset, indices: np.ndarray) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels: np.ndarray = np.asarray(base.labels)[self.indices]  # type: ignore[attr-defined]
        self.num_classes_total = getattr(base, "num_classes_total", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def __getitems__(self, indices: list[int]) -> list:
        picked = [int(self.indices[i]) for i in indices]
        fetch = getattr(self.base, "__getitems__", None)
        return fetch(picked) if fetch is not None else [self.base[i] for i in picked]

    def __repr__(self) -> str:
        return f"LabelledSubset({len(self)} of {self.base!r})"


def class_fraction_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, class-balanced selection: ceil(fraction * n_c) samples of each class c, chosen
    independently of the run seed (so every model trained "on the first 50%" sees the same
    images), returned in ascending order."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"dataset_params.train_fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, int(c)])
        k = int(np.ceil(fraction * len(members)))
        keep.append(np.sort(rng.permutation(members)[:k]))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def take_fraction(dataset: Dataset, fraction: float | None, seed: int = 0) -> Dataset:
    """``dataset`` restricted to :func:`class_fraction_indices` (None or 1.0: unchanged)."""
    if fraction is None or fraction == 1.0:
        if fraction is not None:
            class_fraction_indices(np.zeros(0), fraction, seed)  # validates
        return dataset
    return LabelledSubset(dataset, class_fraction_indices(dataset.labels, fraction, seed))  # type: ignore[attr-defined]
