"""Feature extraction: one process, and a real two-process gloo DDP run compared with it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from fct.retrieval import extract_features, retrieval_metrics
from helpers import free_port

N_ITEMS = 23  # not a multiple of world size x batch size: the sampler pads
BATCH = 4


class _Out(NamedTuple):
    embedding: torch.Tensor
    logits: torch.Tensor | None


class _Tiny(nn.Module):
    """Per-sample arithmetic only (no matmul), so the batch a sample lands in cannot change
    its features by a rounding: DDP and one process must agree bit for bit."""

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 3 * 4 * 4).reshape(3, 4, 4))
        self.bn = nn.BatchNorm1d(3)  # eval mode must be used: batch statistics would leak
        self.plain = plain

    def forward(self, x: torch.Tensor) -> _Out | torch.Tensor:
        e = self.bn((x * self.w).sum(dim=(2, 3)))
        if self.plain:  # like a TorchScript side-information model: (N, D, 1, 1)
            return e[:, :, None, None]
        return _Out(e, None)


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_ITEMS, 3, 4, 4, generator=gen)
    y = torch.randint(0, 3, (N_ITEMS,), generator=gen)
    return TensorDataset(x, y)


def _model(plain: bool = False) -> _Tiny:
    torch.manual_seed(0)
    m = _Tiny(plain)
    with torch.no_grad():
        m.bn.running_mean.fill_(0.5)
        m.bn.running_var.fill_(2.0)
    return m


def test_single_process_matches_direct_forward() -> None:
    data = _data()
    model = _model().train()
    feats, labels = extract_features(
        model, data, batch_size=BATCH, num_workers=0, device="cpu", progress=False
    )
    assert model.training  # mode restored
    with torch.no_grad():
        expect = _model().eval()(data.tensors[0]).embedding
    assert feats.dtype == torch.float32 and feats.shape == (N_ITEMS, 3)
    assert torch.allclose(feats, expect, atol=1e-6)
    assert torch.equal(labels, data.tensors[1])
    assert not feats.is_inference()  # usable as training inputs later
    plain, _ = extract_features(
        _model(plain=True), data, batch_size=BATCH, num_workers=0, device="cpu", progress=False
    )
    assert torch.equal(plain, feats)



def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        feats, labels = extract_features(
            _model(), _data(), batch_size=BATCH, num_workers=0, device="cpu", progress=True
        )
        metrics = retrieval_metrics(feats, labels, feats, labels, exclude_self=True)
        torch.save({"feats": feats, "labels": labels, "metrics": metrics}, Path(out_dir) / f"{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path: Path) -> None:
    if not tdist.is_available() or not tdist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    single_f, single_y = extract_features(
        _model(), _data(), batch_size=BATCH, num_workers=0, device="cpu", progress=False
    )
    single_m = retrieval_metrics(single_f, single_y, single_f, single_y, exclude_self=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert got["feats"].shape == (N_ITEMS, 3)
        assert torch.equal(got["feats"], single_f), rank
        assert torch.equal(got["labels"], single_y), rank
        assert got["metrics"] == single_m, rank


def test_padding_duplicates_are_dropped_by_index() -> None:
    from fct.retrieval.features import _place_by_index

    # Gathered rows in rank order; index 0 came twice (sampler padding): the first copy wins.
    feats = torch.tensor([[0.0], [2.0], [1.0], [9.0]])
    idx = torch.tensor([0, 2, 1, 0])
    f, y = _place_by_index(feats, idx * 10, idx, 3)
    assert f.flatten().tolist() == [0.0, 1.0, 2.0] and y.tolist() == [0, 10, 20]
    with pytest.raises(RuntimeError, match="lost items"):
        _place_by_index(feats, idx, idx, 4)
