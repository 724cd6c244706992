"""Write data sets in the array format (train.npz / val.npz / classes.tsv) that fct reads fastest.

- ``cifar100``: from the official ``cifar-100-python.tar.gz`` (``--source``, or downloaded with
  torchvision's URL and checksum into ``--download-dir``). The official files are pickles; they are
  read with an unpickler that only accepts the few numpy names an array needs, so a tampered
  archive cannot run code.
- ``npz``: from a folder of images in class folders (the reference layout
  ``training/<label>/*.png`` and ``validation/<label>/*.png``, or ``train/`` and ``val/``); all
  images must have one size. Labels follow fct/data/folders.py (integer folder names are labels).
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
from fct.io import atomic_save_npz, atomic_write_text

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


def prepare_from_folders(out: Path, source: Path) -> dict[str, int]:
    """Convert class folders of equally sized images into the array format."""
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
    write_arrays(out, splits, {label: name for name, label in mapping.items()})
    return {split: len(labels) for split, (_, labels) in splits.items()}


def _progress(items: list, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, disable=None, leave=False)  # disable=None: only on a terminal


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="prepare_dataset.py",
        description="Write a data set as train.npz / val.npz / classes.tsv, the format fct reads fastest.",
    )
    parser.add_argument(
        "dataset",
        choices=["cifar100", "npz"],
        help="cifar100: the official archive; npz: convert class folders of images",
    )
    parser.add_argument(
        "--source",
        type=Path,
        help="cifar100: cifar-100-python.tar.gz (default: download it); "
        "npz: folder with training/ and validation/ (or train/ and val/) class folders",
    )
    parser.add_argument("--out", type=Path, help="output folder (default for cifar100: data_store/cifar100)")
    parser.add_argument(
        "--download-dir",
        type=Path,
        default=Path("data_store/downloads"),
        help="where the downloaded archive is kept (default: %(default)s)",
    )
    args = parser.parse_args(argv)

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
