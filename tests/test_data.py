"""Data sets and prepare_dataset.py, on tiny data built in tmp_path."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fct.data import DATASETS, arrays, build_dataset, dataset_info, prepare
from fct.data.transforms import CIFAR100_MEAN, CIFAR100_STD
from fct.errors import ConfigError, UserError
from helpers import REPO


# --------------------------------------------------------------------------- helpers
def to_uint8(x: torch.Tensor, mean: tuple, std: tuple) -> np.ndarray:
    """Undo the normalisation: float (3, H, W) -> uint8 (3, H, W). In numpy: tiny broadcast ops in
    torch can take milliseconds when intra-op threads compete with a busy machine."""
    m = np.asarray(mean).reshape(3, 1, 1)
    s = np.asarray(std).reshape(3, 1, 1)
    return np.clip(np.rint((x.numpy() * s + m) * 255), 0, 255).astype(np.uint8)


def py2_pickle(obj: object) -> bytes:
    """Pickle the way Python 2's cPickle wrote the official CIFAR files: protocol 2, byte strings
    as BINSTRING, numpy arrays via numpy.core.multiarray._reconstruct."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b)

    def integer(i: int) -> None:
        out.extend(b"J" + struct.pack("<i", i))

    def emit(o: object) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                emit(v)
            out.extend(b"e")
        elif isinstance(o, int):
            integer(o)
        elif isinstance(o, str):
            string(o.encode("latin1"))
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(J\x00\x00\x00\x00tU\x01btR")
            out.extend(b"(J\x01\x00\x00\x00(")
            for n in o.shape:
                integer(n)
            out.extend(b"tcnumpy\ndtype\n(U\x02u1J\x00\x00\x00\x00J\x01\x00\x00\x00tR")
            out.extend(b"(J\x03\x00\x00\x00U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffJ\x00\x00\x00\x00tb")
            out.extend(b"\x89")
            string(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def fake_cifar(tmp_path: Path, per_class: int = 2, dumps=py2_pickle) -> tuple[Path, dict]:
    """A cifar-100-python.tar.gz in the official format with ``per_class`` train images per class
    and one test image per class. Returns the archive and the raw data it holds."""
    rng = np.random.default_rng(0)
    raw = {}
    for split, n in (("train", per_class), ("test", 1)):
        labels = [c for c in range(100) for _ in range(n)]
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        raw[split] = (data, labels)
    files = {
        f"cifar-100-python/{split}": dumps(
            {
                "filenames": ["x.png"] * len(lab),
                "fine_labels": lab,
                "coarse_labels": [c // 5 for c in lab],
                "data": data,
            }
        )
        for split, (data, lab) in raw.items()
    }
    files["cifar-100-python/meta"] = dumps(
        {
            "fine_label_names": [f"class{i}" for i in range(100)],
            "coarse_label_names": [f"super{i}" for i in range(20)],
        }
    )
    return make_tar(tmp_path / "cifar-100-python.tar.gz", files), raw


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def reference_layout(
    root: Path, classes=("0", "2", "10"), n_train: int = 2, n_val: int = 1
) -> dict[str, np.ndarray]:
    """training/<label>/<i>.png and validation/<label>/<i>.png with random 32x32 images."""
    rng = np.random.default_rng(1)
    images = {}
    i = 0
    for split, n in (("training", n_train), ("validation", n_val)):
        for c in classes:
            for _ in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                path = root / split / c / f"{i}.png"
                write_png(path, img)
                images[str(path)] = img
                i += 1
    return images


@pytest.fixture(autouse=True)
def stats_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test caches mean/std in a folder of its own (never ~/.cache) and starts with an empty
    in-process memo."""
    folder = tmp_path_factory.mktemp("fct-cache")
    monkeypatch.setenv("FCT_CACHE_DIR", str(folder))
    monkeypatch.setattr(arrays, "_MEMO", {})
    return folder


def write_npz(root: Path, n_train: int = 40, n_val: int = 10, size: int = 32, classes: int = 5) -> None:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        labels = np.arange(n, dtype=np.int64) % classes
        np.savez(root / f"{split}.npz", images=images, labels=labels)


# --------------------------------------------------------------------------- cifar100
def test_cifar_archive_round_trip(tmp_path: Path) -> None:
    archive, raw = fake_cifar(tmp_path)
    out = tmp_path / "prepared"
    counts = prepare.prepare_cifar100(out, archive, tmp_path / "downloads")
    assert counts == {"train": 200, "val": 100}

    # The file layout itself: NHWC uint8, pixel (r, c) of channel ch is data[ch * 1024 + r * 32 + c].
    with np.load(out / "train.npz") as z:
        images, labels = z["images"], z["labels"]
    assert images.dtype == np.uint8 and images.shape == (200, 32, 32, 3) and labels.dtype == np.int64
    data, lab = raw["train"]
    assert images[7, 5, 9, 2] == data[7, 2 * 1024 + 5 * 32 + 9]
    np.testing.assert_array_equal(labels, lab)
    assert (out / "classes.tsv").read_text().splitlines()[:2] == ["0\tclass0", "1\tclass1"]

    info = dataset_info("cifar100", str(out))
    assert (info.num_classes, info.image_size, info.mean, info.std) == (100, 32, CIFAR100_MEAN, CIFAR100_STD)
    for split, (data, lab) in (("train", raw["train"]), ("val", raw["test"])):
        ds = build_dataset("cifar100", str(out), split, augment=False)
        assert len(ds) == len(lab) and ds.num_classes_total == 100
        np.testing.assert_array_equal(ds.labels, lab)
        for i in (0, len(lab) - 1):
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == lab[i]
            np.testing.assert_array_equal(
                to_uint8(x, CIFAR100_MEAN, CIFAR100_STD), data[i].reshape(3, 32, 32)
            )


def test_cifar_archive_python3_pickles_and_extracted_folder(tmp_path: Path) -> None:
    archive, raw = fake_cifar(tmp_path, per_class=1, dumps=lambda o: pickle.dumps(o, protocol=2))
    splits, names = prepare.read_cifar100(archive)
    np.testing.assert_array_equal(splits["val"][0][3].transpose(2, 0, 1).reshape(-1), raw["test"][0][3])
    assert names[99] == "class99"
    extracted = tmp_path / "x"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            (extracted / member.name).parent.mkdir(parents=True, exist_ok=True)
            (extracted / member.name).write_bytes(tar.extractfile(member).read())
    splits2, _ = prepare.read_cifar100(extracted)
    np.testing.assert_array_equal(splits2["train"][0], splits["train"][0])


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    archive, _ = fake_cifar(tmp_path, per_class=1)
    evil = make_tar(
        tmp_path / "evil.tar.gz",
        {
            "cifar-100-python/train": pickle.dumps({"data": _Evil(marker)}),
            "cifar-100-python/test": pickle.dumps(_Evil(marker)),
            "cifar-100-python/meta": pickle.dumps({}),
        },
    )
    with pytest.raises(UserError, match="refusing to unpickle"):
        prepare.prepare_cifar100(tmp_path / "out", evil, tmp_path)
    assert not marker.exists()
    assert not (tmp_path / "out" / "train.npz").exists()


def test_cifar_archive_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        prepare.read_cifar100(tmp_path / "nope.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(UserError, match="not a readable tar"):
        prepare.read_cifar100(tmp_path / "junk.tar.gz")
    partial = make_tar(tmp_path / "partial.tar.gz", {"cifar-100-python/train": py2_pickle({"data": 1})})
    with pytest.raises(UserError, match="lacks cifar-100-python/test"):
        prepare.read_cifar100(partial)


def test_download_failure_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(UserError, match=r"could not download CIFAR-100 \(offline\?\).*--source"):
        prepare.prepare_cifar100(tmp_path / "out", None, tmp_path / "dl")


def test_reference_png_layout_labels(tmp_path: Path) -> None:
    images = reference_layout(tmp_path / "ref")
    root = str(tmp_path / "ref")
    info = dataset_info("cifar100", root)
    assert info.num_classes == 11  # folder '10' is label 10, so labels span 0..10
    ds = build_dataset("cifar100", root, "train", augment=False)
    assert ds.num_classes_total == 11
    assert sorted(set(ds.labels.tolist())) == [0, 2, 10]
    for i, (path, label) in enumerate(ds.samples):
        assert label == int(Path(path).parent.name)
        x, y = ds[i]
        assert y == label
        np.testing.assert_array_equal(
            to_uint8(x, CIFAR100_MEAN, CIFAR100_STD), images[path].transpose(2, 0, 1)
        )
    aug = build_dataset("cifar100", root, "train", augment=True)
    assert aug[0][0].shape == (3, 32, 32)
    val = build_dataset("cifar100", root, "val", augment=False, num_classes=3)
    assert val.labels.tolist() == [0, 2]  # label < 3: '10' is out although it sorts before '2'
    with pytest.raises(UserError, match=r"dataset_params.num_classes=12 .* 11 classes"):
        build_dataset("cifar100", root, "train", augment=False, num_classes=12)


def test_prepare_npz_from_reference_layout(tmp_path: Path) -> None:
    reference_layout(tmp_path / "ref")
    prepare.main(["npz", "--source", str(tmp_path / "ref"), "--out", str(tmp_path / "arr")])
    assert (tmp_path / "arr" / "classes.tsv").read_text() == "0\t0\n2\t2\n10\t10\n"
    for split in ("train", "val"):
        pngs = build_dataset("cifar100", str(tmp_path / "ref"), split, augment=False)
        arr = build_dataset("cifar100", str(tmp_path / "arr"), split, augment=False)
        np.testing.assert_array_equal(arr.labels, pngs.labels)
        for i in range(len(arr)):
            torch.testing.assert_close(arr[i][0], pngs[i][0], rtol=0, atol=0)
    npz = build_dataset("npz", str(tmp_path / "arr"), "train", augment=False)
    assert npz.num_classes_total == 11


@pytest.mark.slow
def test_prepare_script_exit_code(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "prepare_dataset.py"),
            "cifar100",
            "--source",
            str(tmp_path / "missing.tar.gz"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- image folders
def test_imagefolder_sorted_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for split, classes in (("train", ("dog", "cat", "ant")), ("val", ("cat", "ant"))):
        for c in classes:
            write_png(tmp_path / split / c / "a.png", rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
            # Nested folders and other extensions count; non-images do not.
            write_png(
                tmp_path / split / c / "sub" / "b.jpg", rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)
            )
            (tmp_path / split / c / "notes.txt").write_text("x")
    info = dataset_info("imagefolder", str(tmp_path))
    assert (info.num_classes, info.image_size) == (3, 224)
    train = build_dataset("imagefolder", str(tmp_path), "train", augment=True)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]  # ant, cat, dog: ImageFolder's sorted order
    assert train[5][0].shape == (3, 224, 224) and train[5][1] == 2
    val = build_dataset("imagenet", str(tmp_path), "val", augment=False)
    assert val.labels.tolist() == [0, 0, 1, 1]  # the training split's mapping, not val's own
    assert val.num_classes_total == 3
    a, b = val[1][0], val[1][0]
    assert a.shape == (3, 224, 224) and torch.equal(a, b)
    assert build_dataset(
        "imagefolder", str(tmp_path), "train", augment=False, num_classes=2
    ).labels.tolist() == [0, 0, 1, 1]


def test_imagefolder_integer_names_and_errors(tmp_path: Path) -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    for c in ("2", "10"):
        write_png(tmp_path / "training" / c / "0.png", img)  # the reference names are accepted too
        write_png(tmp_path / "validation" / c / "0.png", img)
    ds = build_dataset("imagefolder", str(tmp_path), "train", augment=False)
    assert ds.labels.tolist() == [10, 2] and ds.num_classes_total == 11
    write_png(tmp_path / "validation" / "7" / "0.png", img)
    with pytest.raises(UserError, match="do not exist in the training folder"):
        build_dataset("imagefolder", str(tmp_path), "val", augment=False)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no image files"):
        build_dataset("imagefolder", str(empty), "train", augment=False)


# --------------------------------------------------------------------------- npz
def test_npz_dataset_and_stats_cache(tmp_path: Path, stats_cache: Path) -> None:
    write_npz(tmp_path)
    info = dataset_info("npz", str(tmp_path))
    with np.load(tmp_path / "train.npz") as z:
        images = z["images"]
    expected_mean = images.reshape(-1, 3).mean(0) / 255
    expected_std = images.reshape(-1, 3).std(0) / 255
    np.testing.assert_allclose(info.mean, expected_mean, rtol=1e-10)
    np.testing.assert_allclose(info.std, expected_std, rtol=1e-10)
    assert (info.num_classes, info.image_size) == (5, 32)
    (cache_file,) = (stats_cache / "mean_std").iterdir()
    cache = json.loads(cache_file.read_text())
    np.testing.assert_allclose(cache["mean"], expected_mean, rtol=1e-10)
    assert cache["key"]["path"] == str((tmp_path / "train.npz").resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.npz", "val.npz"]  # data folder untouched

    val = build_dataset("npz", str(tmp_path), "val", augment=False, num_classes=2)
    assert val.labels.tolist() == [0, 1, 0, 1] and val.num_classes_total == 5
    x, y = val[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    with np.load(tmp_path / "val.npz") as z:
        np.testing.assert_array_equal(to_uint8(x, info.mean, info.std), z["images"][1].transpose(2, 0, 1))
    # The batched path (what the DataLoader calls) equals item-by-item access.
    batch = val.__getitems__([0, 2, 3])
    for (xb, yb), i in zip(batch, [0, 2, 3]):
        assert torch.equal(xb, val[i][0]) and yb == val[i][1]


def _listing(folder: Path) -> dict[str, int]:
    """name -> mtime_ns of everything under ``folder``, the folder itself included."""
    out = {".": folder.stat().st_mtime_ns}
    out.update({str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")})
    return out


def test_data_folder_is_never_written(tmp_path: Path, stats_cache: Path) -> None:
    """The mean/std cache lives under $FCT_CACHE_DIR: a data folder, writable or not, is only read."""
    for name, mode in (("rw", 0o755), ("ro", 0o555)):
        root = tmp_path / name
        write_npz(root, n_train=6, n_val=2)
        before = _listing(root)
        root.chmod(mode)
        try:
            dataset_info("npz", str(root))
            build_dataset("npz", str(root), "val", augment=False)
            build_dataset("npz", str(root), "train", augment=True)
        finally:
            root.chmod(0o755)
        assert _listing(root) == before, name
    assert len(list((stats_cache / "mean_std").iterdir())) == 2


def test_stats_cache_is_reused_and_refreshed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_npz(tmp_path, n_train=6, n_val=2)
    first = dataset_info("npz", str(tmp_path))
    arrays._MEMO.clear()  # as in a new process: the stats come from the cache file
    with monkeypatch.context() as m:
        m.setattr(arrays, "pixel_mean_std", lambda *a, **k: pytest.fail("measured again"))
        assert dataset_info("npz", str(tmp_path)) == first
    # A train.npz replaced by another file (same size and shape) is measured again.
    np.savez(tmp_path / "new.npz", images=np.full((6, 32, 32, 3), 7, np.uint8), labels=np.arange(6) % 5)
    os.replace(tmp_path / "new.npz", tmp_path / "train.npz")
    np.testing.assert_allclose(dataset_info("npz", str(tmp_path)).mean, [7 / 255] * 3)


@pytest.mark.parametrize("cache", ["read-only folder", "a file"])
def test_unwritable_stats_cache_still_computes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               cache: str) -> None:
    target = tmp_path / "cache"
    if cache == "a file":
        target.write_text("not a folder")
    else:
        target.mkdir(mode=0o555)
    monkeypatch.setenv("FCT_CACHE_DIR", str(target))
    write_npz(tmp_path / "d", n_train=6, n_val=2)
    try:
        info = dataset_info("npz", str(tmp_path / "d"))
    finally:
        target.chmod(0o755)
    assert len(info.mean) == 3
    assert target.is_file() or not any(target.iterdir())


def test_array_augmentation_is_crop_and_flip(tmp_path: Path) -> None:
    write_npz(tmp_path, n_train=4, n_val=2)
    info = dataset_info("npz", str(tmp_path))
    ds = build_dataset("npz", str(tmp_path), "train", augment=True)
    with np.load(tmp_path / "train.npz") as z:
        img = z["images"][0].transpose(2, 0, 1)
    padded = np.pad(img, ((0, 0), (4, 4), (4, 4)))
    # Every crop offset (y, x) in 0..8 of the zero-padded image, with and without the flip.
    candidates = {}
    for y in range(9):
        for x in range(9):
            crop = padded[:, y : y + 32, x : x + 32]
            candidates[crop.tobytes()] = (y, x, False)
            candidates[np.ascontiguousarray(crop[:, :, ::-1]).tobytes()] = (y, x, True)
    torch.manual_seed(0)
    batched = [x for x, _ in ds.__getitems__([0] * 400)]  # the DataLoader's path
    one_by_one = [ds[0][0] for _ in range(400)]  # the per-item path
    for draws in (batched, one_by_one):
        keys = [to_uint8(x, info.mean, info.std).tobytes() for x in draws]
        assert all(k in candidates for k in keys), "augmented image is not a crop (+ flip) of the original"
        ys, xs, flips = zip(*(candidates[k] for k in keys))
        # Uniform offsets over all 9 values per axis, flip about half the time.
        assert set(ys) == set(xs) == set(range(9))
        assert 0.4 < np.mean(flips) < 0.6
    # Both paths consume the same random numbers: one seed, one result.
    for seed in range(20):
        torch.manual_seed(seed)
        a = ds[2][0]
        torch.manual_seed(seed)
        assert torch.equal(a, ds.__getitems__([2])[0][0])
    torch.manual_seed(1)
    a = [x for x, _ in ds.__getitems__([0, 1, 2, 3])]
    torch.manual_seed(1)
    b = [x for x, _ in ds.__getitems__([0, 1, 2, 3])]
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_workers_get_different_random_streams() -> None:
    ds = build_dataset("digits", "", "train", augment=True)
    same = torch.utils.data.Subset(ds, [0] * 16)  # one image, 16 times
    torch.manual_seed(0)  # the workers' seeds derive from it: deterministic test
    loader = DataLoader(same, batch_size=4, num_workers=2)
    batches = [x for x, _ in loader]  # batches 0, 2 from worker 0; 1, 3 from worker 1
    assert not torch.equal(batches[0], batches[1])


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope is not a folder.*prepare_dataset.py"):
        build_dataset("npz", str(tmp_path / "nope"), "train", augment=False)
    write_npz(tmp_path / "d")
    (tmp_path / "d" / "val.npz").unlink()
    with pytest.raises(UserError, match=r"val.npz not found.*prepare_dataset.py"):
        build_dataset("npz", str(tmp_path / "d"), "val", augment=False)
    with pytest.raises(UserError, match=r"dataset_params.num_classes=6 but .* 5 classes"):
        build_dataset("npz", str(tmp_path / "d"), "train", augment=False, num_classes=6)
    with pytest.raises(UserError, match="positive integer"):
        build_dataset("npz", str(tmp_path / "d"), "train", augment=False, num_classes=0)
    np.savez(tmp_path / "d" / "val.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(UserError, match=r"'images' must be uint8 \(N, H, W, 3\)"):
        build_dataset("npz", str(tmp_path / "d"), "val", augment=False)
    (tmp_path / "c").mkdir()
    with pytest.raises(UserError, match=r"no CIFAR-100 data in .*prepare_dataset.py cifar100"):
        build_dataset("cifar100", str(tmp_path / "c"), "train", augment=False)
    with pytest.raises(UserError, match="no train folder"):
        dataset_info("imagenet", str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="valid: cifar100, digits, imagefolder, imagenet, npz"):
        dataset_info("cifar10", "")
    assert "npz" in DATASETS


def _message(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    return str(e.value)


def test_empty_npz_split_names_the_file(tmp_path: Path) -> None:
    write_npz(tmp_path, n_train=6, n_val=2)
    np.savez(tmp_path / "val.npz", images=np.zeros((0, 32, 32, 3), np.uint8), labels=np.zeros(0, np.int64))
    assert _message(lambda: build_dataset("npz", str(tmp_path), "val", augment=False)) == (
        f"{tmp_path}/val.npz holds no images (the val split is empty)")
    os.replace(tmp_path / "val.npz", tmp_path / "train.npz")
    for call in (lambda: dataset_info("npz", str(tmp_path)),
                 lambda: build_dataset("npz", str(tmp_path), "train", augment=True)):
        assert _message(call) == f"{tmp_path}/train.npz holds no images (the train split is empty)"


def test_num_classes_keeping_no_image_names_file_key_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=images, labels=1000 + np.arange(20))
    np.savez(tmp_path / "val.npz", images=images[:4], labels=np.array([3, 4, 1010, 1019]))
    assert _message(lambda: build_dataset("npz", str(tmp_path), "train", augment=True, num_classes=10)) == (
        f"dataset_params.num_classes=10 keeps no image of {tmp_path}/train.npz: "
        "its labels run from 1000 to 1019, none below 10")
    # A split that the selection empties while the other keeps images: the val file is named.
    assert len(build_dataset("npz", str(tmp_path), "val", augment=False, num_classes=5)) == 2
    assert _message(lambda: build_dataset("npz", str(tmp_path), "val", augment=False, num_classes=3)) == (
        f"dataset_params.num_classes=3 keeps no image of {tmp_path}/val.npz: its labels run from 3 to 1019, "
        "none below 3")


def test_image_folder_split_emptied_by_num_classes(tmp_path: Path) -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    for c in ("0", "1", "7"):
        write_png(tmp_path / "train" / c / "0.png", img)
    write_png(tmp_path / "val" / "7" / "0.png", img)
    assert len(build_dataset("imagefolder", str(tmp_path), "train", augment=False, num_classes=2)) == 2
    message = _message(lambda: build_dataset("imagefolder", str(tmp_path), "val", augment=False, num_classes=2))
    assert message == (f"dataset_params.num_classes=2 keeps no image of {tmp_path}/val: "
                       "its labels run from 7 to 7, none below 2")
    (tmp_path / "val" / "7" / "0.png").unlink()
    assert _message(lambda: build_dataset("imagefolder", str(tmp_path), "val", augment=False)).startswith(
        f"{tmp_path}/val holds no image files")


# --------------------------------------------------------------------------- digits
def test_digits() -> None:
    info = dataset_info("digits", "ignored")
    assert (info.num_classes, info.image_size) == (10, 8)
    train = build_dataset("digits", "", "train", augment=False)
    val = build_dataset("digits", "", "val", augment=False)
    assert (len(train), len(val)) == (1438, 359)
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert set(train.labels.tolist()) == set(val.labels.tolist()) == set(range(10))
    assert np.bincount(val.labels).min() >= 35  # stratified: ~20% of each class
    x, _ = val[0]
    assert x.shape == (3, 8, 8) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    again = build_dataset("digits", "", "val", augment=False)
    assert np.array_equal(again.labels, val.labels) and torch.equal(again[5][0], val[5][0])
    assert build_dataset("digits", "", "train", augment=True)[0][0].shape == (3, 8, 8)
    sub = build_dataset("digits", "", "train", augment=False, num_classes=3)
    assert set(sub.labels.tolist()) == {0, 1, 2} and sub.num_classes_total == 10


# --------------------------------------------------------------------------- shared data
@pytest.mark.slow
def test_shared_tinyimagenet(shared_data: Path) -> None:
    """The shared data (the conftest fixture skips when <repo>/../shared/data/tinyimagenet100-32
    is absent). The folder is read-only: nothing may be written into it."""
    before = sorted(p.name for p in shared_data.iterdir())
    info = dataset_info("npz", str(shared_data))
    assert (info.num_classes, info.image_size) == (100, 32)
    assert all(0.3 < m < 0.6 for m in info.mean) and all(0.2 < s < 0.35 for s in info.std)
    train = build_dataset("npz", str(shared_data), "train", augment=True, num_classes=50)
    val = build_dataset("npz", str(shared_data), "val", augment=False)
    assert (len(train), len(val)) == (25000, 5000)
    assert train.labels.max() == 49 and val.num_classes_total == 100
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 50
    assert sorted(p.name for p in shared_data.iterdir()) == before


def test_train_fraction_is_class_balanced_and_fixed():
    from fct.data.datasets import class_fraction_indices, take_fraction

    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    idx = class_fraction_indices(labels, 0.3, seed=0)
    # ceil(0.3 * n_c): 3 of class 0, 2 of class 1, 1 of class 2; sorted, within each class
    assert np.bincount(labels[idx]).tolist() == [3, 2, 1]
    assert idx.tolist() == sorted(idx.tolist())
    assert np.array_equal(idx, class_fraction_indices(labels, 0.3, seed=0))
    assert not np.array_equal(idx, class_fraction_indices(labels, 0.3, seed=1))
    # a larger fraction with the same seed keeps the smaller selection (prefixes of one permutation)
    assert set(idx) <= set(class_fraction_indices(labels, 0.6, seed=0))
    with pytest.raises(UserError, match="train_fraction"):
        class_fraction_indices(labels, 0.0, seed=0)
    ds = build_dataset("digits", "", "train", augment=False)
    sub = take_fraction(ds, 0.25)
    assert len(sub) < len(ds) and np.array_equal(sub.labels, ds.labels[sub.indices])
    x, y = sub[3]
    x0, y0 = ds[int(sub.indices[3])]
    assert y == y0 and torch.equal(x, x0)
    assert [b[1] for b in sub.__getitems__([0, 1])] == sub.labels[:2].tolist()
    assert take_fraction(ds, None) is ds and take_fraction(ds, 1.0) is ds
