"""Write data sets in the array format (train.npz / val.npz / classes.tsv) that fct reads fastest,
or as WebDataset shards (``--format webdataset``) to stream.

- ``cifar100``: from the official ``cifar-100-python.tar.gz`` (``--source``, or downloaded with
  torchvision's URL and checksum into ``--download-dir``). The official files are pickles; they are
  read with an unpickler that only accepts the few numpy names an array needs, so a tampered
  archive cannot run code.
- ``npz``: from a folder of images in class folders (the reference layout
  ``training/<label>/*.png`` and ``validation/<label>/*.png``, or ``train/`` and ``val/``); all
  images must have one size. Labels follow fct/data/folders.py (integer folder names are labels).
- ``--format webdataset``: any registered data set (``--source`` is its data_root; for
  ``cifar100`` also the official archive, for ``npz`` also class folders) as
  ``<split>-NNNNNN.tar`` shards of ``--shard-size`` samples plus the index ``webdataset.json``
  (fct/data/webdataset.py), written last. Fixed-size images are stored as PNG (or ``.npy``);
  photos keep their original file bytes. Each shard is written under a temporary name and renamed
  when complete; a rerun replaces the shards.
"""

from __future__ import annotations

import argparse
import io
import pickle
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fct.data import folders
from fct.errors import UserError
from fct.io import atomic_save_npz, atomic_write_json, atomic_write_text

CIFAR_DIR = "cifar-100-python"
_CIFAR_SPLITS = {"train": "train", "val": "test"}  # our split name -> official file name


# --------------------------------------------------------------------------- safe unpickling
def _allowed_globals() -> dict[tuple[str, str], Callable]:
    """The only globals a CIFAR pickle may name: what rebuilding a numpy array needs.

    The official files (Python 2 pickles) name ``numpy.core.multiarray._reconstruct``; newer
    numpy writes ``numpy._core...``. Python 3 protocol-2 pickles encode bytes via
    ``_codecs.encode``. All of them only build arrays / bytes from data.
    """
    import codecs

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Callable] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, where: str) -> None:
        # latin1 turns Python 2 byte strings into str without loss (numpy relies on it).
        super().__init__(file, encoding="latin1")
        self.where = where
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UserError(
                f"{self.where}: refusing to unpickle {module}.{name} (only plain data and numpy "
                "arrays are allowed; is this the official CIFAR-100 archive?)"
            ) from None


def safe_unpickle(data: bytes, where: str) -> Any:
    """Unpickle ``data`` allowing only builtin containers/scalars and numpy arrays."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), where).load()
    except UserError:
        raise
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise UserError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- CIFAR-100
def _read_members(source: Path) -> dict[str, bytes]:
    """{'train'|'test'|'meta': bytes} from the archive (or an extracted cifar-100-python folder)."""
    wanted = ("train", "test", "meta")
    if source.is_dir():
        base = source / CIFAR_DIR if (source / CIFAR_DIR).is_dir() else source
        missing = [n for n in wanted if not (base / n).is_file()]
        if missing:
            raise UserError(f"{base} lacks {', '.join(missing)} (expected an extracted {CIFAR_DIR} folder)")
        return {n: (base / n).read_bytes() for n in wanted}
    if not source.is_file():
        raise UserError(f"--source {source} does not exist")
    out: dict[str, bytes] = {}
    try:
        # Members are read in memory, never extracted, so paths inside the archive do not matter.
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and parts and parts[-1] in wanted and parts[-2:-1] in ((CIFAR_DIR,), ()):
                    f = tar.extractfile(member)
                    assert f is not None  # regular file
                    out[parts[-1]] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{source} is not a readable tar archive: {e}") from None
    missing = [f"{CIFAR_DIR}/{n}" for n in wanted if n not in out]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}; expected the official cifar-100-python.tar.gz")
    return out


def _str_keys(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a pickled dict, got {type(d).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _split_arrays(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 (N, 32, 32, 3) and fine labels int64 (N,) of one official split file."""
    d = _str_keys(safe_unpickle(raw, where), where)
    for key in ("data", "fine_labels"):
        if key not in d:
            raise UserError(f"{where}: missing key {key!r}")
    try:
        data = d["data"]
        data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.asarray(data)
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: 'data' / 'fine_labels' are not arrays of numbers ({e})") from None
    if data.dtype != np.uint8:
        raise UserError(f"{where}: 'data' must be uint8, got {data.dtype}")
    if data.size % 3072:
        raise UserError(f"{where}: 'data' has {data.size} values, not a multiple of 3x32x32")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue values, each row-major).
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    if labels.shape != (len(images),):
        raise UserError(f"{where}: {labels.size} fine_labels for {len(images)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= 100):
        raise UserError(f"{where}: fine labels must lie in 0..99, found {labels.min()}..{labels.max()}")
    return images, labels


def read_cifar100(source: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """({'train'|'val': (images uint8 (N, 32, 32, 3), labels int64 (N,))}, 100 class names)."""
    raw = _read_members(source)
    splits = {
        ours: _split_arrays(raw[theirs], f"{source}:{theirs}") for ours, theirs in _CIFAR_SPLITS.items()
    }
    meta = _str_keys(safe_unpickle(raw["meta"], f"{source}:meta"), f"{source}:meta")
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or len(names) != 100:
        raise UserError(f"{source}:meta: expected 100 fine_label_names")
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return splits, names


def download_cifar100(download_dir: Path) -> Path:
    """The official archive, fetched (once, checksum verified) with torchvision's URL and MD5."""
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import check_integrity, download_url

    path = download_dir / CIFAR100.filename
    if check_integrity(str(path), CIFAR100.tgz_md5):
        return path
    try:
        download_url(CIFAR100.url, str(download_dir), CIFAR100.filename, CIFAR100.tgz_md5)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise UserError(
            f"could not download CIFAR-100 (offline?): {e}; pass --source path/to/cifar-100-python.tar.gz"
        ) from None
    if not check_integrity(str(path), CIFAR100.tgz_md5):
        raise UserError(f"{path}: download failed its checksum; delete it and retry, or pass --source")
    return path


# --------------------------------------------------------------------------- writing
def write_arrays(
    out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: dict[int, str]
) -> None:
    """train.npz, val.npz (uncompressed: loads fast) and classes.tsv, each written atomically."""
    for split, (images, labels) in splits.items():
        atomic_save_npz(out / f"{split}.npz", images=images, labels=labels.astype(np.int64))
    atomic_write_text("".join(f"{k}\t{v}\n" for k, v in sorted(class_names.items())), out / "classes.tsv")


def prepare_cifar100(out: Path, source: Path | None, download_dir: Path) -> dict[str, int]:
    """Write CIFAR-100 (train: 50,000 images, val: the 10,000 test images) into ``out``."""
    if source is None:
        source = download_cifar100(download_dir)
    splits, names = read_cifar100(source)
    write_arrays(out, splits, dict(enumerate(names)))
    return {split: len(labels) for split, (_, labels) in splits.items()}


def read_folder_arrays(source: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[int, str]]:
    """Class folders of equally sized images as ({'train'|'val': (images, labels)}, label -> name)."""
    hint = "expected SOURCE/training/<label>/*.png and SOURCE/validation/<label>/*.png"
    train_dir = folders.find_split_dir(source, "train", hint)
    mapping = folders.class_mapping(folders.class_folders(train_dir), train_dir)
    splits = {}
    for split in ("train", "val"):
        split_dir = train_dir if split == "train" else folders.find_split_dir(source, split, hint)
        samples = folders.scan_samples(split_dir, mapping)
        images = np.empty((len(samples),) + np.asarray(folders.load_rgb(samples[0][0])).shape, np.uint8)
        for i, (path, _) in enumerate(_progress(samples, f"reading {split_dir}")):
            img = np.asarray(folders.load_rgb(path))
            if img.shape != images.shape[1:]:
                raise UserError(
                    f"{path} is {img.shape[1]}x{img.shape[0]}, but {samples[0][0]} is "
                    f"{images.shape[2]}x{images.shape[1]}; all images must have one size"
                )
            images[i] = img
        splits[split] = (images, np.array([label for _, label in samples], dtype=np.int64))
    return splits, {label: name for name, label in mapping.items()}


def prepare_from_folders(out: Path, source: Path) -> dict[str, int]:
    """Convert class folders of equally sized images into the array format."""
    splits, names = read_folder_arrays(source)
    write_arrays(out, splits, names)
    return {split: len(labels) for split, (_, labels) in splits.items()}


# --------------------------------------------------------------------------- WebDataset shards
# A split to write: (samples, count, index fields); a sample is (id, label, image extension, bytes).
_Sample = tuple[int, int, str, bytes]


def _array_samples(images: np.ndarray, labels: np.ndarray, ids: np.ndarray, image_format: str) -> Any:
    from fct.data.webdataset import encode_npy, encode_png

    encode = encode_png if image_format == "png" else encode_npy
    for row, label, sample_id in zip(images, labels, ids):
        yield int(sample_id), int(label), image_format, encode(row)


def _file_samples(samples: list[tuple[str, int]], ids: np.ndarray) -> Any:
    from fct.data.webdataset import IMAGE_EXTENSIONS, encode_png

    for (path, label), sample_id in zip(samples, ids):
        ext = Path(path).suffix.lower().lstrip(".")
        if ext in IMAGE_EXTENSIONS:
            data = Path(path).read_bytes()  # the original file: no re-encoding
        else:  # e.g. .tif: stored as PNG, which every WebDataset reader decodes
            ext, data = "png", encode_png(np.asarray(folders.load_rgb(path)))
        yield int(sample_id), int(label), ext, data


def _registered_splits(name: str, root: Path, image_format: str, fraction: Any) -> tuple[dict, dict]:
    """Samples of both splits of a registered data set and the index fields it implies."""
    from fct.data.arrays import ArrayDataset
    from fct.data.datasets import DATASETS, LabelledSubset, take_fraction
    from fct.data.folders import ImageFileDataset

    source = DATASETS.get(name)(name, str(root))
    info = source.info()
    splits: dict[str, tuple[Any, int]] = {}
    for split in ("train", "val"):
        ds: Any = source.build(split, False, None)
        if split == "train" and fraction is not None:
            ds = take_fraction(ds, *fraction)
        picked = np.arange(len(ds))
        if isinstance(ds, LabelledSubset):
            picked, ds = ds.indices, ds.base
        if isinstance(ds, ArrayDataset):
            rows = ds.indices[picked]
            splits[split] = (_array_samples(ds.images[rows], ds.labels[picked], rows, image_format), len(rows))
        elif isinstance(ds, ImageFileDataset):
            splits[split] = (_file_samples([ds.samples[i] for i in picked], picked), len(picked))
        else:
            raise UserError(f"data set {name!r} gives {type(ds).__name__} items, which prepare_dataset cannot "
                            "write as shards")
    train = source.build("train", True, None)
    transform = getattr(train, "transform", None)
    array_t = getattr(transform, "transforms", [transform])[-1]  # PNG class folders: PILToTensor, then arrays
    if isinstance(train, ArrayDataset) or getattr(train, "expected_size", None) is not None:
        recipe = {"kind": "array", "pad": int(array_t.pad), "flip": bool(array_t.flip)}
    else:
        recipe = {"kind": "photo"}
    fields = {"num_classes": info.num_classes, "image_size": info.image_size, "mean": list(info.mean),
              "std": list(info.std), "transform": recipe}
    return splits, fields


def _in_memory_splits(arrays: dict[str, tuple[np.ndarray, np.ndarray]], image_format: str, fraction: Any,
                      stats: Any) -> tuple[dict, dict]:
    """Samples of array splits held in memory (the CIFAR archive, class folders read as arrays)."""
    from fct.data.arrays import pixel_mean_std
    from fct.data.datasets import class_fraction_indices

    images, labels = arrays["train"]
    mean, std = stats if stats is not None else pixel_mean_std(images)
    splits = {}
    for split, (images, labels) in arrays.items():
        rows = np.arange(len(labels))
        if split == "train" and fraction is not None:
            rows = class_fraction_indices(labels, *fraction)
        splits[split] = (_array_samples(images[rows], labels[rows], rows, image_format), len(rows))
    size = int(arrays["train"][0].shape[1])
    fields = {"num_classes": int(arrays["train"][1].max()) + 1, "image_size": size, "mean": list(mean),
              "std": list(std), "transform": {"kind": "array", "pad": max(1, size // 8), "flip": True}}
    return splits, fields


def prepare_webdataset(name: str, source: Path | None, out: Path, *, shard_size: int, image_format: str = "png",
                       train_fraction: float | None = None, train_fraction_seed: int = 0,
                       download_dir: Path = Path("data_store/downloads")) -> dict[str, int]:
    """Write data set ``name`` (read from ``source``) as WebDataset shards and index in ``out``.

    Returns {split: samples}. ``train_fraction``: only that class-balanced fraction of the
    training split (the selection of ``dataset_params.train_fraction``, ids kept)."""
    from fct.data import webdataset
    from fct.data.transforms import CIFAR100_MEAN, CIFAR100_STD

    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if image_format not in ("png", "npy"):
        raise UserError(f"--image-format must be png or npy, got {image_format!r}")
    fraction = None if train_fraction is None else (train_fraction, train_fraction_seed)
    if name == "cifar100" and (source is None or source.is_file()):
        arrays, _ = read_cifar100(source if source is not None else download_cifar100(download_dir))
        splits, fields = _in_memory_splits(arrays, image_format, fraction, (CIFAR100_MEAN, CIFAR100_STD))
        origin = str(source) if source is not None else "the official CIFAR-100 archive"
    elif name == "npz" and source is not None and source.is_dir() and not (source / "train.npz").is_file():
        arrays, _ = read_folder_arrays(source)
        splits, fields = _in_memory_splits(arrays, image_format, fraction, None)
        origin = str(source.resolve())
    else:
        if source is None and name != "digits":
            raise UserError(f"--format webdataset needs --source (the data set's data_root) for {name}")
        splits, fields = _registered_splits(name, source or Path("."), image_format, fraction)
        origin = "" if name == "digits" else str(Path(source).resolve())  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for split, (samples, count) in splits.items():
        bar = _progress_bar(count, f"writing {split} shards")
        entries[split] = webdataset.write_split(out, split, samples, shard_size, bar.update)
        bar.close()
    index = {"format": webdataset.FORMAT, "version": webdataset.VERSION, **fields,
             "source": {"dataset": name, "data_root": origin, "image_format": image_format,
                        "train_fraction": list(fraction) if fraction is not None else None},
             "splits": {split: {"num_samples": sum(e["num_samples"] for e in shards), "shards": shards}
                        for split, shards in entries.items()}}
    atomic_write_json(index, out / webdataset.INDEX)  # last: the shards are complete
    return {split: index["splits"][split]["num_samples"] for split in entries}


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=None, leave=False)


def _progress(items: list, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, disable=None, leave=False)  # disable=None: only on a terminal


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    from fct.data.datasets import DATASETS

    parser = argparse.ArgumentParser(
        prog="prepare_dataset.py",
        description="Write a data set as train.npz / val.npz / classes.tsv, the format fct reads fastest, "
        "or as WebDataset shards (--format webdataset) to stream.",
    )
    parser.add_argument(
        "dataset",
        choices=[n for n in DATASETS.names() if n != "webdataset"],
        help="npz format: cifar100 (the official archive) or npz (convert class folders of images); "
        "webdataset format: any of these data sets",
    )
    parser.add_argument(
        "--source",
        type=Path,
        help="cifar100: cifar-100-python.tar.gz (default: download it); "
        "npz: folder with training/ and validation/ (or train/ and val/) class folders; "
        "--format webdataset: also the data_root of any data set",
    )
    parser.add_argument("--out", type=Path, help="output folder (default for cifar100: data_store/cifar100)")
    parser.add_argument(
        "--download-dir",
        type=Path,
        default=Path("data_store/downloads"),
        help="where the downloaded archive is kept (default: %(default)s)",
    )
    parser.add_argument("--format", choices=["npz", "webdataset"], default="npz",
                        help="npz: array files (default); webdataset: tar shards and their index webdataset.json")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="webdataset: samples per shard (default: %(default)s); aim for shards of "
                        "100 MB or more and at least processes x loader workers shards per split")
    parser.add_argument("--image-format", choices=["png", "npy"], default="png",
                        help="webdataset, fixed-size images: how each image is stored (default: %(default)s; "
                        "photos keep their files)")
    parser.add_argument("--train-fraction", type=float,
                        help="webdataset: write only this class-balanced fraction of the training split")
    parser.add_argument("--train-fraction-seed", type=int, default=0,
                        help="seed of the --train-fraction selection (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.format == "webdataset":
        if args.out is None:
            raise UserError("--format webdataset needs --out (the folder for the shards and webdataset.json)")
        counts = prepare_webdataset(args.dataset, args.source, args.out, shard_size=args.shard_size,
                                    image_format=args.image_format, train_fraction=args.train_fraction,
                                    train_fraction_seed=args.train_fraction_seed, download_dir=args.download_dir)
        print(f"wrote {args.out}/train-*.tar ({counts['train']} samples), {args.out}/val-*.tar "
              f"({counts['val']} samples), {args.out}/webdataset.json")
        print(f"use it with dataset_params: {{name: webdataset, data_root: {args.out}}}")
        return
    if args.dataset not in ("cifar100", "npz"):
        raise UserError(f"{args.dataset} has no npz conversion; use --format webdataset, or read it directly")
    if args.train_fraction is not None:
        raise UserError("--train-fraction applies to --format webdataset only")
    if args.dataset == "cifar100":
        out = args.out or Path("data_store/cifar100")
        counts = prepare_cifar100(out, args.source, args.download_dir)
    else:
        if args.source is None or args.out is None:
            raise UserError("npz needs --source (a folder of class folders) and --out")
        out = args.out
        counts = prepare_from_folders(out, args.source)
    print(
        f"wrote {out}/train.npz ({counts['train']} images), {out}/val.npz ({counts['val']} images), "
        f"{out}/classes.tsv"
    )
    print(f"use it with dataset_params: {{name: {args.dataset}, data_root: {out}}}")
