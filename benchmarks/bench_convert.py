"""Benchmark of the resumable embedding converter (fct.compat.convert) on a file of stored
embeddings: throughput, peak memory against the file size, an interruption and its resume.

A registry v0 -> v1 -> v2 of 128-d versions joined by two FCT maps (MLP_BN_SIDE_PROJECTION,
inner_dim 1024, the Tiny-ImageNet chain's shape; random weights: speed does not depend on them).
The input (N x 128 float32 .npy) is written chunk by chunk. Then, each in a fresh subprocess:
  1. a full conversion v0 -> v2 (timed, peak RSS);
  2. the same conversion to another file, killed after --kill-after seconds, then rerun: the rerun
     continues from the last finished chunk; the two outputs are compared row for row.
Run: python benchmarks/bench_convert.py [--rows 1000000] [--chunk-rows 8192] [--dir /tmp/bench_convert]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The child samples /proc/self/status: peak RSS counts the pages of the memory-mapped input and
# output files it has touched (page cache, given back under memory pressure); RssAnon is the
# process's own memory, what a file larger than RAM must not make grow.
CHILD = r"""
import json, resource, sys, threading, time
from fct.compat.convert import convert_embeddings
peak = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            k = line.split(":")[0]
            if k in peak:
                peak[k] = max(peak[k], int(line.split()[1]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
s = convert_embeddings(sys.argv[1], "v0", "v2", sys.argv[2], sys.argv[3], chunk_rows=int(sys.argv[4]),
                       progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "resumed_from_row": s["resumed_from_row"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_anon_mib": peak["RssAnon"] / 1024, "peak_file_mib": peak["RssFile"] / 1024}))
"""


def make_registry(root: Path) -> None:
    from fct.compat import Edge, VersionManifest, VersionRegistry
    from fct.models import save_transformation
    from fct.transformations import build_transformation

    reg = VersionRegistry.create(root)
    for name, seed in (("h01", 1), ("h12", 2)):
        torch.manual_seed(seed)
        h = build_transformation("MLP_BN_SIDE_PROJECTION", old_embedding_dim=128, new_embedding_dim=128,
                                 inner_dim=1024)
        save_transformation(root / f"{name}.pt", h, h.arch_params())
    reg.add_version(VersionManifest("v0", "major", 128, data="bench"))
    reg.add_version(VersionManifest("v1", "major", 128, parent="v0", compatible_with=["v0"]),
                    edges=[Edge("v0", "v1", "transformation", "h01.pt")])
    reg.add_version(VersionManifest("v2", "major", 128, parent="v1", compatible_with=["v1", "v0"]),
                    edges=[Edge("v1", "v2", "transformation", "h12.pt")])


def make_input(path: Path, rows: int, chunk: int = 262144) -> None:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, 128))
    g = np.random.default_rng(0)
    for s in range(0, rows, chunk):
        out[s:s + chunk] = g.standard_normal((min(chunk, rows - s), 128), dtype=np.float32)
    out.flush()
    del out


def child(args: list[str], kill_after: float | None = None) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--chunk-rows", type=int, default=8192)
    p.add_argument("--kill-after", type=float, default=None, help="seconds; default: 40%% of the full run")
    p.add_argument("--dir", default="/tmp/bench_convert")
    a = p.parse_args()

    work = Path(a.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    make_registry(work / "reg")
    src = work / "v0.npy"
    make_input(src, a.rows)
    size_mib = src.stat().st_size / 2**20
    reg, chunk = str(work / "reg"), str(a.chunk_rows)

    full = child([reg, str(src), str(work / "v2_full.npy"), chunk])
    kill_after = a.kill_after if a.kill_after is not None else 0.4 * full["seconds"]
    killed = child([reg, str(src), str(work / "v2_resumed.npy"), chunk], kill_after=kill_after)
    sidecar = work / ".v2_resumed.npy.progress.json"
    progress = json.loads(sidecar.read_text()) if killed is None and sidecar.exists() else None
    resumed = child([reg, str(src), str(work / "v2_resumed.npy"), chunk])
    a_full, a_res = np.load(work / "v2_full.npy", mmap_mode="r"), np.load(work / "v2_resumed.npy", mmap_mode="r")
    equal = all(np.array_equal(a_full[s:s + 262144], a_res[s:s + 262144]) for s in range(0, a.rows, 262144))

    print(f"input: {a.rows:,} x 128 float32 = {size_mib:,.0f} MiB; chunk {a.chunk_rows:,} rows; maps v0 -> v1 -> v2 "
          f"(2 x MLP_BN_SIDE_PROJECTION, inner 1024); torch threads {torch.get_num_threads()}")
    print("| run | wall s | rows/s | peak RSS MiB | peak anonymous MiB | peak file-backed MiB | resumed from row |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    mem = "{peak_rss_mib:.0f} | {peak_anon_mib:.0f} | {peak_file_mib:.0f}"
    print(f"| full conversion | {full['seconds']:.1f} | {a.rows / full['seconds']:,.0f} | {mem.format(**full)} | 0 |")
    print(f"| killed after {kill_after:.1f} s | - | - | - | - | - | {'(finished first)' if killed else '-'} |")
    print(f"| rerun | {resumed['seconds']:.1f} | {(a.rows - resumed['resumed_from_row']) / resumed['seconds']:,.0f} "
          f"| {mem.format(**resumed)} | {resumed['resumed_from_row']:,} |")
    print(f"progress record at the kill: {progress and progress.get('done_rows')}; "
          f"resumed output equals the uninterrupted one: {equal}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
