"""An optional compiled kernel for the mAP pass on the CPU: the per-row histogram of "positives
strictly below each item" in one pass over the key block.

The torch path (``fct.retrieval.bucket_count``) needs about eight elementwise passes over each
(chunk, Ng) block (bucket map, look-up, mask, histogram); this kernel does them in one loop per
row, with the same bucketing idea (a monotone bucket map, a per-row table of "positives in lower
buckets", exact comparisons only against the positives that share the item's bucket), in blocks
of items whose bucket numbers are computed first (a vectorised loop). It is plain C (no Python
headers), compiled with the system's C compiler on first use into a per-user cache
(``$XDG_CACHE_HOME/fct`` or ``~/.cache/fct``) and loaded with ctypes. Built with ``-fopenmp``
its rows are split over the threads of the OpenMP pool torch already runs (the same
``libgomp.so.1``), so no idle torch thread spins beside them; a compiler without OpenMP gives a
kernel whose rows are split over Python threads instead (ctypes releases the GIL). Without a
compiler, or with ``FCT_NATIVE=0`` in the environment, ``available()`` is False and the torch path
runs instead; all give identical results (tests check it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

_SOURCE = r"""
#include <stdint.h>
#include <math.h>

#define BLOCK 1024

/* For rows r0..r1 of a (c, ng) float32 key block with sorted positives pos (c, p) (the first
   npos[r] of row r real, the rest +inf): hist[r, j] += 1 for every item whose key has exactly
   j real positives strictly below it. hist is (c, p + 1) int64, zeroed by the caller; ng < 2^31.
   scratch holds nb + 6 + 4 * (p + 1) int32. nb: buckets spanning [pos[r, 0], pos[r, npos - 1]].
   Items go by blocks in two stages: their bucket numbers (a loop the compiler vectorises), then
   the look-ups; four interleaved histograms keep repeated bins from waiting on each other. */
void fct_count_below(const float *keys, const float *pos, const int64_t *npos, int64_t *hist,
                     int64_t c, int64_t ng, int64_t p, int64_t nb, int64_t r0, int64_t r1,
                     int32_t *scratch) {
    int32_t bucket[BLOCK];
    int32_t *first = scratch;        /* nb + 6: first[b] = #{positives in buckets < b} */
    int32_t *h4 = scratch + nb + 6;  /* 4 * (p + 1) */
    for (int64_t r = r0; r < r1; ++r) {
        const float *k = keys + r * ng;
        const float *q = pos + r * p;
        int64_t *h = hist + r * (p + 1);
        int64_t n = npos[r];
        if (n <= 0) {
            h[0] += ng;
            continue;
        }
        float lo = q[0], hi = q[n - 1];
        float width = (hi - lo) / (float)nb;
        float floor_w = fabsf(lo) * 9.5367431640625e-07f; /* 2^-20 */
        if (!(width >= floor_w)) width = floor_w;
        if (!(width >= 1e-30f)) width = 1e-30f;
        float origin = lo - 2.0f * width, scale = 1.0f / width, top = (float)(nb + 4);
        for (int64_t b = 0; b <= nb + 5; ++b) first[b] = 0;
        for (int64_t i = 0; i < n; ++i) {
            float v = (q[i] - origin) * scale;
            if (!(v >= 0.0f)) v = 0.0f;
            if (v > top) v = top;
            first[(int64_t)v + 1] += 1;
        }
        for (int64_t b = 1; b <= nb + 5; ++b) first[b] += first[b - 1];
        for (int64_t b = 0; b < 4 * (p + 1); ++b) h4[b] = 0;
        for (int64_t j0 = 0; j0 < ng; j0 += BLOCK) {
            int64_t m = ng - j0 < BLOCK ? ng - j0 : BLOCK;
            const float *kb = k + j0;
            for (int64_t j = 0; j < m; ++j) {
                float v = (kb[j] - origin) * scale;
                v = v >= 0.0f ? v : 0.0f; /* NaN -> bucket 0 */
                v = v > top ? top : v;
                bucket[j] = (int32_t)v;
            }
            for (int64_t j = 0; j < m; ++j) {
                int32_t b = bucket[j];
                int32_t t = first[b], end = first[b + 1];
                if (t < end) {
                    float d = kb[j];
                    while (t < end && q[t] < d) ++t;
                }
                h4[(j & 3) * (p + 1) + t] += 1;
            }
        }
        for (int64_t t = 0; t <= p; ++t)
            h[t] += (int64_t)h4[t] + h4[(p + 1) + t] + h4[2 * (p + 1) + t] + h4[3 * (p + 1) + t];
    }
}

/* The rows cut into nt consecutive parts (bounds[t] .. bounds[t + 1]), one per thread of the
   OpenMP pool, each with its own scratch (stride int32). Built with -fopenmp the pool is torch's
   own (the same libgomp.so.1), whose threads would otherwise spin beside ours. Returns 0 when
   compiled without OpenMP (the caller then uses its own threads). */
int fct_count_below_parallel(const float *keys, const float *pos, const int64_t *npos, int64_t *hist,
                             int64_t c, int64_t ng, int64_t p, int64_t nb, int64_t nt,
                             const int64_t *bounds, int32_t *scratch, int64_t stride) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int64_t t = 0; t < nt; ++t)
        fct_count_below(keys, pos, npos, hist, c, ng, p, nb, bounds[t], bounds[t + 1], scratch + t * stride);
    return 1;
#else
    (void)keys; (void)pos; (void)npos; (void)hist; (void)c; (void)ng; (void)p; (void)nb; (void)nt;
    (void)bounds; (void)scratch; (void)stride;
    return 0;
#endif
}
"""

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fct"


def _compile() -> Optional[ctypes.CDLL]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None
    tag = hashlib.sha256((_SOURCE + cc + sys.platform).encode()).hexdigest()[:16]
    lib_path = _cache_dir() / f"fct_count_{tag}.so"
    if not lib_path.is_file():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            src = Path(tmp) / "count.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / "count.so"
            for openmp in (["-fopenmp"], []):  # without OpenMP when the compiler lacks it
                r = subprocess.run([cc, "-O3", "-ffp-contract=off", *openmp, "-shared", "-fPIC", "-o", str(out),
                                    str(src), "-lm"], capture_output=True, text=True)
                if r.returncode == 0 and out.is_file():
                    break
            else:
                return None
            os.replace(out, lib_path)  # atomic: concurrent processes see a whole file or none
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.fct_count_below
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
    par = lib.fct_count_below_parallel
    par.restype = ctypes.c_int
    par.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2 + [ctypes.c_int64]
    return lib


def available() -> bool:
    """True when the compiled kernel can be used (compiled now if needed; False without a C
    compiler, or when the environment sets FCT_NATIVE=0)."""
    global _lib, _tried
    if os.environ.get("FCT_NATIVE", "1") == "0":
        return False
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _compile()
            except OSError:
                _lib = None
    return _lib is not None


def count_below_histogram(keys: torch.Tensor, pos: torch.Tensor, npos: torch.Tensor, nb: int,
                          threads: Optional[int] = None) -> torch.Tensor:
    """(c, p + 1) int64: row r's histogram of j = #{real positives of r strictly below the item}
    over its ng items. keys (c, ng) float32, pos (c, p) float32 sorted (+inf past npos[r]),
    npos (c,) int64, all contiguous on the CPU; nb >= 1 buckets per row; ng < 2^31. Call
    ``available()`` first."""
    assert _lib is not None, "call available() first"
    c, ng = keys.shape
    assert ng < 2**31, "rows of 2^31 items or more: use the torch count"
    p = pos.shape[1]
    keys, pos, npos = keys.contiguous(), pos.contiguous(), npos.to(torch.int64).contiguous()
    hist = torch.zeros((c, p + 1), dtype=torch.int64)
    nt = max(1, min(threads or torch.get_num_threads(), c))
    bounds = [c * i // nt for i in range(nt + 1)]
    stride = nb + 6 + 4 * (p + 1)
    scratch = torch.empty(nt * stride, dtype=torch.int32)
    args = (keys.data_ptr(), pos.data_ptr(), npos.data_ptr(), hist.data_ptr(), c, ng, p, nb)
    if nt > 1:
        cut = torch.tensor(bounds, dtype=torch.int64)
        if _lib.fct_count_below_parallel(*args, nt, cut.data_ptr(), scratch.data_ptr(), stride):
            return hist

    def run(i: int) -> None:
        _lib.fct_count_below(*args, bounds[i], bounds[i + 1], scratch[i * stride:].data_ptr())

    if nt == 1:
        run(0)
    else:
        global _pool, _pool_size
        with _lock:
            if _pool is None or _pool_size < nt:
                _pool, _pool_size = ThreadPoolExecutor(max_workers=nt, thread_name_prefix="fct-count"), nt
            pool = _pool
        list(pool.map(run, range(nt)))
    return hist
