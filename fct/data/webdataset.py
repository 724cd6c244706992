"""Data sets stored as WebDataset shards (tar files of samples), read as a stream.

A shard holds, per sample ``<key>``: the image (``<key>.png``, ``.jpg``/``.jpeg``, ``.webp`` or
``.npy``), its label (``<key>.cls``, a decimal integer) and its id (``<key>.id``, the sample's
row in the split it was written from, so features and resumes can name it). Beside the shards,
``webdataset.json`` (the *index*, written last by ``prepare_dataset.py --format webdataset``)
says what the data is, so nothing has to be measured from a stream::

    {"format": "fct-webdataset", "version": 1, "num_classes": 100, "image_size": 32,
     "mean": [...], "std": [...], "transform": {"kind": "array", "pad": 4, "flip": true},
     "source": {...}, "splits": {"train": {"num_samples": 50000, "shards": [
        {"url": "train-000000.tar", "num_samples": 1000, "class_counts": {"0": 12, ...}}, ...]},
        "val": {...}}}

``transform.kind`` is ``array`` (fixed-size images: random crop with ``pad`` and optional flip, as
the array data sets) or ``photo`` (RandomResizedCrop / resize + centre crop to ``image_size``, as
the image folders). Shard urls are relative to the index's folder unless absolute or a URL.

Reading (:class:`ShardStream`): for training, :func:`epoch_segments` deals an epoch's samples to
the processes in equal numbers (``N // world`` each, from a shard order shuffled by (seed,
epoch)); each process's shard segments go round-robin to its loader workers, and each worker
shuffles through a buffer seeded by (seed, epoch, rank, worker). Augmentation is seeded per
sample by (seed, epoch, id), as the map-style data sets are by (seed, epoch, index). For
evaluation, shard i goes to process i mod world and each sample is read once.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from fct.data.transforms import ArrayTransform, imagenet_transforms
from fct.errors import UserError
from fct.io import read_tagged_json

INDEX = "webdataset.json"
FORMAT = "fct-webdataset"
VERSION = 1
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "npy")
PREPARE_HINT = "write shards and index with `python prepare_dataset.py DATASET --format webdataset --out DIR`"


# --------------------------------------------------------------------------- the index
@dataclass(frozen=True)
class ShardEntry:
    url: str  # as given in the index or the urls override
    num_samples: int
    class_counts: dict[int, int]


@dataclass(frozen=True)
class Index:
    path: Path
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    transform: dict[str, Any]
    splits: dict[str, list[ShardEntry]]

    def split_total(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))

    def shards(self, split: str) -> list[ShardEntry]:
        if split not in self.splits:
            raise UserError(f"{self.path} has no {split!r} split (it has: {', '.join(sorted(self.splits))})")
        return self.splits[split]


def _triple(value: Any, key: str, path: Path) -> tuple[float, float, float]:
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise UserError(f"{path}: {key!r} must be a list of 3 numbers, got {value!r}")
    return float(value[0]), float(value[1]), float(value[2])


def read_index(root: Path) -> Index:
    """The index of the shards in ``root`` (a folder holding webdataset.json); UserError naming the
    file and the key on anything missing or malformed."""
    if not root.is_dir():
        raise UserError(f"dataset_params.data_root {root} is not a folder; {PREPARE_HINT}")
    path = root / INDEX
    if not path.is_file():
        raise UserError(f"{path} not found (the index of the shards); {PREPARE_HINT}")
    raw = read_tagged_json(path, FORMAT, VERSION, "an fct WebDataset index")
    for key in ("num_classes", "image_size", "mean", "std", "transform", "splits"):
        if key not in raw:
            raise UserError(f"{path} lacks the key {key!r}")
    transform = raw["transform"]
    if not isinstance(transform, dict) or transform.get("kind") not in ("array", "photo"):
        raise UserError(f"{path}: 'transform' must be {{\"kind\": \"array\" | \"photo\", ...}}, got {transform!r}")
    splits: dict[str, list[ShardEntry]] = {}
    if not isinstance(raw["splits"], dict):
        raise UserError(f"{path}: 'splits' must be a mapping of split name -> shards")
    for split, body in raw["splits"].items():
        try:
            entries = [ShardEntry(str(s["url"]), int(s["num_samples"]),
                                  {int(k): int(v) for k, v in s.get("class_counts", {}).items()})
                       for s in body["shards"]]
            stated = int(body.get("num_samples", sum(e.num_samples for e in entries)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}: splits.{split} is malformed ({type(e).__name__}: {e})") from None
        if stated != sum(e.num_samples for e in entries):
            raise UserError(f"{path}: splits.{split}.num_samples={stated} but its shards hold "
                            f"{sum(e.num_samples for e in entries)} samples")
        for e in entries:
            if e.class_counts and sum(e.class_counts.values()) != e.num_samples:
                raise UserError(f"{path}: shard {e.url}: class_counts add up to {sum(e.class_counts.values())}, "
                                f"not its num_samples={e.num_samples}")
        splits[str(split)] = entries
    return Index(path, int(raw["num_classes"]), int(raw["image_size"]), _triple(raw["mean"], "mean", path),
                 _triple(raw["std"], "std", path), dict(transform), splits)


def is_remote(url: str) -> bool:
    """True for anything WebDataset opens with a scheme (pipe:, http(s):, s3 via pipe, ...)."""
    scheme = urlparse(url).scheme
    return scheme not in ("", "file") and not (len(scheme) == 1 and os.name == "nt")


def expand_urls(pattern: str) -> list[str]:
    """Brace patterns as WebDataset writes them: ``a-{000000..000009}.tar``; ``::`` joins lists."""
    from braceexpand import braceexpand  # a dependency of webdataset

    return [u for part in pattern.split("::") for u in braceexpand(part)]


def resolve_urls(index: Index, split: str, override: Optional[str], key: str) -> list[str]:
    """The shard urls of ``split``: the index's (relative to its folder) or those of the
    ``override`` pattern, which must expand to as many shards, in the index's order."""
    entries = index.shards(split)
    if override is None:
        root = index.path.parent
        urls = [e.url if is_remote(e.url) or os.path.isabs(e.url) else str(root / e.url) for e in entries]
    else:
        urls = expand_urls(override)
        if len(urls) != len(entries):
            raise UserError(f"{key}={override!r} expands to {len(urls)} shards but {index.path} lists "
                            f"{len(entries)} for the {split} split")
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(urlparse(u).path if u.startswith("file:") else u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]} not found{more}; {split} shards listed by {index.path}"
                        + (f" via {key}" if override is not None else ""))
    return urls


# --------------------------------------------------------------------------- reading a shard
def open_url(url: str) -> Any:
    """A binary stream of a shard: local files directly, anything else through WebDataset's gopen."""
    if not is_remote(url):
        path = urlparse(url).path if url.startswith("file:") else url
        try:
            return open(path, "rb")
        except OSError as e:
            raise UserError(f"cannot read shard {url}: {e.strerror or e}") from None
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def _key_and_field(name: str) -> tuple[str, str]:
    """'dir/000123.png' -> ('dir/000123', 'png'): the key ends at the first dot of the file name."""
    head, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{head}/{stem}" if head else stem), field.lower()


def _octal(field: bytes) -> int:
    field = field.strip(b"\0 ")
    return int(field, 8) if field else 0


def _pax_path(data: bytes) -> Optional[str]:
    """The ``path`` record of a PAX extended header ("<len> path=<value>\n" records)."""
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[len("path="):]
    return None


def tar_members(stream: Any, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of an uncompressed tar stream, in order.

    A small reader of the tar layout (512-byte headers, data padded to 512) instead of
    ``tarfile``, whose per-member bookkeeping costs more than decoding a small image; it reads
    ustar, GNU long names and PAX ``path`` records, which covers what WebDataset writers produce.
    """
    long_name: Optional[str] = None
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == bytes(512):
            if 0 < len(header) < 512:
                raise UserError(f"shard {url} ends in the middle of a tar header (truncated?)")
            return
        if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise UserError(f"shard {url} is not a tar file (bad header checksum)")
        size = _octal(header[124:136])
        kind = header[156:157]
        data = stream.read(size)
        if len(data) < size:
            raise UserError(f"shard {url} is truncated")
        stream.read(-size % 512)  # padding
        if kind in (b"L", b"x"):  # the next member's long name
            long_name = data.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(data)
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers...
            long_name = None
            continue
        name = long_name
        if name is None:
            name = header[:100].rstrip(b"\0").decode("utf-8")
            prefix = header[345:500].rstrip(b"\0") if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8") + "/" + name
        long_name = None
        yield name, data


def iter_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) of every sample of one shard, in stored order (files of one sample
    are consecutive, as WebDataset writes them)."""
    stream = open_url(url)
    try:
        key: Optional[str] = None
        fields: dict[str, bytes] = {}
        for name, data in tar_members(stream, url):
            k, field = _key_and_field(name)
            if k.startswith("__") or not field:
                continue
            if k != key:
                if key is not None:
                    yield key, fields
                key, fields = k, {}
            fields[field] = data
        if key is not None:
            yield key, fields
    finally:
        stream.close()


@dataclass(frozen=True)
class RawSample:
    key: str
    label: int
    id: int
    field: str  # the image's extension
    data: bytes


def parse_sample(url: str, key: str, fields: dict[str, bytes]) -> RawSample:
    image = next((f for f in IMAGE_EXTENSIONS if f in fields), None)
    if image is None or "cls" not in fields or "id" not in fields:
        raise UserError(f"shard {url}: sample {key!r} has fields {sorted(fields)}; expected an image "
                        f"({'/'.join(IMAGE_EXTENSIONS)}), 'cls' and 'id'")
    try:
        label, sample_id = int(fields["cls"]), int(fields["id"])
    except ValueError:
        raise UserError(f"shard {url}: sample {key!r} has a 'cls' or 'id' that is not an integer") from None
    return RawSample(key, label, sample_id, image, fields[image])


def decode_array(sample: RawSample) -> np.ndarray:
    """uint8 (H, W, 3) of an image sample."""
    if sample.field == "npy":
        arr = np.load(io.BytesIO(sample.data), allow_pickle=False)
    else:
        from PIL import Image

        with Image.open(io.BytesIO(sample.data)) as img:
            arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise UserError(f"sample {sample.key!r}: expected a uint8 (H, W, 3) image, got {arr.dtype} {arr.shape}")
    return arr


def decode_pil(sample: RawSample) -> Any:
    from PIL import Image

    if sample.field == "npy":
        return Image.fromarray(decode_array(sample))
    with Image.open(io.BytesIO(sample.data)) as img:
        return img.convert("RGB")


# --------------------------------------------------------------------------- epoch plans
def epoch_segments(counts: Sequence[int], seed: int, epoch: int, world: int, rank: int) -> list[tuple[int, int, int]]:
    """This process's part of an epoch: [(shard, first, stop)] in kept-sample positions.

    The shards are ordered by a permutation drawn from (seed, epoch); their samples, end to end,
    are cut into ``world`` equal runs of ``N // world`` (the last ``N % world`` are left out of
    this epoch, others next epoch), so every process takes the same number of samples, none twice.
    """
    order = np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(len(counts))
    per_rank = sum(counts) // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    out, pos = [], 0
    for s in order:
        c = int(counts[s])
        a, b = max(lo, pos), min(hi, pos + c)
        if a < b:
            out.append((int(s), a - pos, b - pos))
        pos += c
    return out


def shuffled(items: Iterator[Any], buffer: int, rng: np.random.Generator) -> Iterator[Any]:
    """Items through a shuffle buffer of ``buffer`` slots (<= 1: unchanged order)."""
    if buffer <= 1:
        yield from items
        return
    pool: list[Any] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        j = int(rng.integers(buffer))
        pool[j], item = item, pool[j]
        yield item
    for j in rng.permutation(len(pool)):
        yield pool[j]


def worker_slot() -> tuple[int, int]:
    """(this loader worker, loader workers) - (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------- the data set
class ShardStream(IterableDataset):
    """One split as a stream of (float32 (3, H, W), int label) from shards.

    Iterated directly (evaluation), it yields every sample of this process's shards once (shard i
    goes to process i mod ``world``, then round-robin to the loader workers): set the process with
    :meth:`for_process`. Training goes through :meth:`train_batches` (called per worker by
    ``fct.training.loaders``). ``len()`` is the number of samples this process yields.
    A stream has no random access: ``[0]`` gives the first sample (a probe for shapes), other
    indices and ``.labels`` are a UserError.
    """

    def __init__(self, urls: list[str], counts: list[int], *, kind: str, transform: Callable[[Any], torch.Tensor],
                 keep_below: Optional[int], num_classes_total: int, shuffle_buffer: int, augment: bool,
                 rank: int = 0, world: int = 1) -> None:
        self.urls, self.counts = urls, counts
        self.kind, self.transform = kind, transform
        self.keep_below = keep_below
        self.num_classes_total = num_classes_total
        self.shuffle_buffer = shuffle_buffer
        self.augment = augment
        self.rank, self.world = rank, world

    # -- what the rest of fct reads
    def for_process(self, rank: int, world: int) -> "ShardStream":
        """This stream as read by process ``rank`` of ``world`` (evaluation sharding)."""
        return ShardStream(self.urls, self.counts, kind=self.kind, transform=self.transform,
                           keep_below=self.keep_below, num_classes_total=self.num_classes_total,
                           shuffle_buffer=self.shuffle_buffer, augment=self.augment, rank=rank, world=world)

    @property
    def total(self) -> int:
        """Samples in the whole split (after the class subset)."""
        return sum(self.counts)

    def __len__(self) -> int:
        return sum(self.counts[self.rank:: self.world])

    @property
    def labels(self) -> np.ndarray:
        raise UserError(NO_RANDOM_ACCESS)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i != 0:
            raise UserError(NO_RANDOM_ACCESS)
        for s in range(len(self.urls)):
            for raw in self._kept(s):
                return self._item(raw)
        raise UserError(f"the shards {self.urls[0]}... hold no sample")

    def __repr__(self) -> str:
        return f"ShardStream({len(self.urls)} shards, {self.total} samples, {self.num_classes_total} classes)"

    # -- reading
    def _kept(self, shard: int) -> Iterator[RawSample]:
        """The samples of one shard that the class subset keeps, in stored order."""
        url = self.urls[shard]
        for key, fields in iter_shard(url):
            raw = parse_sample(url, key, fields)
            if self.keep_below is None or raw.label < self.keep_below:
                yield raw

    def _segment(self, shard: int, first: int, stop: int) -> Iterator[RawSample]:
        """Kept samples first..stop-1 of a shard; fewer than the index promises is a UserError
        (every process must take the same number of steps)."""
        seen = 0
        for raw in self._kept(shard):
            if seen >= first:
                yield raw
            seen += 1
            if seen >= stop:
                return
        raise UserError(f"shard {self.urls[shard]} holds {seen} samples of the kept classes but the index "
                        f"promises {self.counts[shard]}; rewrite the shards and index with prepare_dataset.py")

    def _item(self, raw: RawSample) -> tuple[torch.Tensor, int]:
        image = decode_array(raw) if self.kind == "array" else decode_pil(raw)
        return self.transform(image), raw.label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        worker, workers = worker_slot()
        mine = list(range(self.rank, len(self.urls), self.world))[worker::workers]
        for s in mine:
            for raw in self._segment(s, 0, self.counts[s]):
                yield self._item(raw)

    def train_batches(self, *, seed: int, epoch: int, rank: int, world: int, batch: int,
                      seed_of: Callable[[int, int], int], collate: Callable[[list], Any]) -> Iterator[Any]:
        """This loader worker's collated training batches of ``batch`` samples (the last one may be
        smaller) for one epoch; each sample augmented under ``seed_of(epoch, id)``."""
        worker, workers = worker_slot()
        segments = epoch_segments(self.counts, seed, epoch, world, rank)[worker::workers]
        rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, rank, worker])
        raws = (raw for s, a, b in segments for raw in self._segment(s, a, b))
        items = []
        for raw in shuffled(raws, self.shuffle_buffer, rng):
            if self.augment:
                torch.default_generator.manual_seed(seed_of(epoch, raw.id))
            items.append(self._item(raw))
            if len(items) == batch:
                yield collate(items)
                items = []
        if items:
            yield collate(items)


NO_RANDOM_ACCESS = (
    "dataset_params.name=webdataset is a stream without random access; this step needs a map-style "
    "data set (npz, cifar100, imagefolder, ...): write one with prepare_dataset.py and point "
    "dataset_params at it"
)


class ShardSamples(Dataset):
    """The samples of one shard of a stream, in stored order, as a map-style data set: their
    encoded bytes are held in memory and decoded on access. ``fct.embed`` embeds a stream shard by
    shard through this (one output shard per input shard), keeping each sample's ``ids``."""

    def __init__(self, stream: ShardStream, shard: int) -> None:
        self.stream = stream
        self.raw = list(stream._segment(shard, 0, stream.counts[shard]))
        self.ids = np.array([r.id for r in self.raw], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.stream._item(self.raw[i])


def shard_parts(stream: ShardStream) -> list[tuple[int, Callable[[], tuple[ShardSamples, np.ndarray]]]]:
    """(row count, loader) of each non-empty shard of ``stream`` in the index's order; a loader
    reads its shard into memory when called and gives (ShardSamples, the samples' ids)."""
    def shard(k: int) -> Callable[[], tuple[ShardSamples, np.ndarray]]:
        def load() -> tuple[ShardSamples, np.ndarray]:
            part = ShardSamples(stream, k)
            return part, part.ids
        return load

    return [(c, shard(k)) for k, c in enumerate(stream.counts) if c > 0]


def build_stream(index: Index, split: str, *, augment: bool, num_classes: Optional[int],
                 url_override: Optional[str], url_key: str, shuffle_buffer: int) -> ShardStream:
    """The ShardStream of one split of ``index`` (class subset, transforms, urls resolved)."""
    entries = index.shards(split)
    urls = resolve_urls(index, split, url_override, url_key)
    total_classes = index.num_classes
    if num_classes is not None:
        if num_classes > total_classes:
            raise UserError(f"dataset_params.num_classes={num_classes} but {index.path} has only "
                            f"{total_classes} classes")
        if any(not e.class_counts for e in entries):
            raise UserError(f"{index.path}: the {split} shards lack class_counts, which "
                            "dataset_params.num_classes needs; rewrite the index with prepare_dataset.py")
        counts = [sum(c for label, c in e.class_counts.items() if label < num_classes) for e in entries]
    else:
        counts = [e.num_samples for e in entries]
    if sum(counts) == 0:
        what = f" of labels below {num_classes}" if num_classes is not None else ""
        raise UserError(f"the {split} shards listed by {index.path} hold no sample{what}")
    t = index.transform
    if t["kind"] == "array":
        transform: Callable[[Any], torch.Tensor] = (
            _ArraySingle(ArrayTransform(index.mean, index.std, pad=int(t.get("pad", 0)), flip=bool(t.get("flip"))))
            if augment else _ArraySingle(ArrayTransform(index.mean, index.std)))
    else:
        transform = imagenet_transforms(augment, index.mean, index.std, index.image_size)
    return ShardStream(urls, counts, kind=t["kind"], transform=transform, keep_below=num_classes,
                       num_classes_total=total_classes, shuffle_buffer=shuffle_buffer, augment=augment)


class _ArraySingle:
    """uint8 (H, W, 3) -> float32 (3, H, W) through ArrayTransform.single (picklable)."""

    def __init__(self, transform: ArrayTransform) -> None:
        self.t = transform

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.t.single(image)


# --------------------------------------------------------------------------- writing
def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def write_split(out: Path, split: str, samples: Iterator[tuple[int, int, str, bytes]], shard_size: int,
                progress: Callable[[int], None] = lambda n: None) -> list[dict[str, Any]]:
    """Write (id, label, image extension, image bytes) samples as ``out/<split>-NNNNNN.tar``,
    ``shard_size`` per shard, each written under a temporary name and renamed when complete.
    Returns the index entries of the shards."""
    from webdataset import TarWriter

    entries: list[dict[str, Any]] = []
    writer, tmp, counts, n, k = None, None, {}, 0, 0

    def close() -> None:
        nonlocal writer, k
        assert writer is not None and tmp is not None
        writer.close()
        os.replace(tmp, out / shard_name(split, k))
        entries.append({"url": shard_name(split, k), "num_samples": n,
                        "class_counts": {str(c): counts[c] for c in sorted(counts)}})
        writer, k = None, k + 1

    try:
        for sample_id, label, ext, data in samples:
            if writer is None:
                tmp = out / f".{shard_name(split, k)}.tmp-{os.getpid()}"
                # mtime an int: a float would cost a PAX header per file (slower to read)
                writer, counts, n = TarWriter(str(tmp), encoder=False, mtime=0), {}, 0
            writer.write({"__key__": f"{sample_id:09d}", ext: data, "cls": str(label).encode(),
                          "id": str(sample_id).encode()})
            counts[label] = counts.get(label, 0) + 1
            n += 1
            progress(1)
            if n == shard_size:
                close()
        if writer is not None:
            close()
    finally:
        if writer is not None:  # interrupted: leave no partial shard behind
            writer.close()
            if tmp is not None and tmp.exists():
                tmp.unlink()
    # Shards of an earlier, longer run with this naming would be listed by no index: remove them.
    stale = k
    while (out / shard_name(split, stale)).is_file():
        (out / shard_name(split, stale)).unlink()
        stale += 1
    return entries


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_npy(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    return buf.getvalue()
