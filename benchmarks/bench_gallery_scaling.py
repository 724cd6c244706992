"""Gallery work split over processes: ``python -m fct.embed`` (sharded folder output) and
``python -m fct.compat.convert`` run by 1 process and by torchrun with 2 processes, launch to
exit, on this machine.

- embed: a CifarResNet20 backbone, the stand-in studies' (random weights: speed does not depend
  on them) over the training split of the Tiny-ImageNet stand-in (50,000 images at 32 px;
  ``--images`` takes a class-balanced part of it), shards of 5,000 rows; falls back to the
  embedded digits set when the stand-in is absent.
- convert: N x 128 float32 stored embeddings through two FCT maps v0 -> v1 -> v2
  (MLP_BN_SIDE_PROJECTION, inner_dim 1024), chunks of 8,192 rows.

With P processes each gets ``cores // P`` torch threads (``OMP_NUM_THREADS``), so every row uses
the whole machine; the outputs of 1 and 2 processes are compared (embeddings to 1e-5, conversions
bit for bit). Run::

    python benchmarks/bench_gallery_scaling.py [--images 20000] [--rows 1000000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
STAND_IN = REPO.parent / "shared" / "data" / "tinyimagenet100-32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module_args: list[str], procs: int) -> float:
    """Wall seconds of ``python -m ...`` (1 process) or ``torchrun --nproc_per_node procs``."""
    threads = max(1, (os.cpu_count() or 1) // procs)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    prefix = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
        str(free_port())]
    t = time.perf_counter()
    r = subprocess.run([*prefix, *module_args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(module_args[:2])} with {procs} process(es) failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def embed_setup(work: Path, images: int) -> tuple[Path, int]:
    import torch

    from fct.models import build_backbone, save_model_file

    torch.manual_seed(0)
    arch = {"arch": "CifarResNet20", "num_classes": 100, "embedding_dim": 128}
    model = work / "backbone.pt"
    save_model_file(model, build_backbone(**arch).eval(), kind="backbone", arch_params=arch)
    if (STAND_IN / "train.npz").is_file():
        data = f"{{name: npz, data_root: {STAND_IN}, num_workers: 0, batch_size: 256, train_fraction: {images / 50000}}}"
        split, n = "train", images
    else:
        data, split, n = "{name: digits, num_workers: 0, batch_size: 256}", "train", -1
    (work / "embed.yaml").write_text(f"model_path: {model}\nsplit: {split}\noutput_path: OUT\nshard_size: 5000\n"
                                     f"dataset_params: {data}\nruntime: {{progress: false, tensorboard: false}}\n")
    return work / "embed.yaml", n


def run_embed(cfg: Path, out: Path, procs: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    return launch(["-m", "fct.embed", "--config", str(cfg), "--set", f"output_path={out}"], procs)


def convert_setup(work: Path, rows: int) -> tuple[Path, Path]:
    from bench_convert import make_input, make_registry

    make_registry(work / "reg")
    make_input(work / "v0.npy", rows)
    return work / "reg", work / "v0.npy"


def run_convert(reg: Path, src: Path, out: Path, procs: int) -> float:
    out.unlink(missing_ok=True)
    return launch(["-m", "fct.compat.convert", "--registry", str(reg), "--from", "v0", "--to", "v2", "--input",
                   str(src), "--output", str(out), "--no-progress"], procs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000, help="images of the stand-in's training split to embed")
    p.add_argument("--rows", type=int, default=1_000_000, help="stored embeddings to convert")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default="/tmp/bench_gallery_scaling")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    a = p.parse_args()

    from fct.retrieval.embeddings import read_feature_file

    work = Path(a.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg, n_img = embed_setup(work, a.images)
    reg, src = convert_setup(work, a.rows)
    times: dict[str, dict[int, list[float]]] = {"embed": {1: [], 2: []}, "convert": {1: [], 2: []}}
    for _ in range(a.repeats):
        for procs in (1, 2):  # alternated: both see the same machine state
            times["embed"][procs].append(run_embed(cfg, work / f"emb{procs}", procs))
            times["convert"][procs].append(run_convert(reg, src, work / f"conv{procs}.npy", procs))
    e1, e2 = read_feature_file(str(work / "emb1")), read_feature_file(str(work / "emb2"))
    embed_equal = bool(np.allclose(e1.features, e2.features, rtol=1e-5, atol=1e-5) and np.array_equal(e1.ids, e2.ids))
    c1, c2 = np.load(work / "conv1.npy", mmap_mode="r"), np.load(work / "conv2.npy", mmap_mode="r")
    convert_equal = all(np.array_equal(c1[s:s + 262144], c2[s:s + 262144]) for s in range(0, a.rows, 262144))
    n_img = len(e1.ids)

    med = {k: {p_: statistics.median(v) for p_, v in d.items()} for k, d in times.items()}
    print(f"{os.cpu_count()} CPUs; each of P processes has cpus // P torch threads; median of {a.repeats}, "
          "launch to exit, alternated")
    print("| work | 1 process s | 2 processes s | 2 / 1 | items/s (1 / 2) | outputs equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, n, unit, equal in (("embed", n_img, "images", embed_equal), ("convert", a.rows, "rows", convert_equal)):
        one, two = med[key][1], med[key][2]
        print(f"| {key} {n:,} {unit} | {one:.1f} | {two:.1f} | {two / one:.2f} | {n / one:,.0f} / {n / two:,.0f} "
              f"| {equal} |")
    if a.json:
        a.json.write_text(json.dumps({"times": times, "median": med, "images": n_img, "rows": a.rows,
                                      "embed_equal": embed_equal, "convert_equal": convert_equal}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
