"""Label-free (SimCLR) pieces: NT-Xent against a naive loop (also across two gloo processes),
the two-view augmentation (shapes, reproducibility under the project's seeding, colour algebra),
and a short end-to-end run that lowers the loss."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from fct.config import ViewAugParams
from fct.errors import UserError
from fct.models import build_backbone
from fct.ssl import (
    ArrayViewTransform,
    PILViewTransform,
    ProjectionHead,
    SimCLRModel,
    build_two_view_dataset,
    default_view_params,
    evaluate_knn,
    knn_predict,
    nt_xent_loss,
    simclr_loss_fn,
    two_view_collate,
)
from fct.ssl.augment import _C_FACTORS, _C_GRAY, _C_JITTER, _LUMA, _NUM_DRAWS, _YIQ, _crop_box, colour_affine
from fct.training.loaders import EpochTaggedSampler, SeededDataset
from helpers import free_port


# --------------------------------------------------------------------------- NT-Xent
def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """Loop over the 2N views: -log softmax of the positive among all other views."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = z.new_zeros(())
    for i in range(n2):
        pos = (i + n) % n2
        sims = [torch.dot(z[i], z[k]) / t for k in range(n2) if k != i]
        denom = torch.logsumexp(torch.stack(sims), 0)
        total = total - (torch.dot(z[i], z[pos]) / t - denom)
    return total / n2


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("t", [0.05, 0.2, 1.0])
def test_nt_xent_matches_naive_loop_value_and_gradient(n: int, t: float) -> None:
    g = torch.Generator().manual_seed(n * 100 + int(t * 100))
    z1 = torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    fast = nt_xent_loss(z1, z2, t)
    (g1, g2) = torch.autograd.grad(fast, (z1, z2))
    ref = naive_nt_xent(z1, z2, t)
    (r1, r2) = torch.autograd.grad(ref, (z1, z2))
    # The loss runs in float32 by design: compare at float32 precision.
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, r1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g2, r2, rtol=1e-4, atol=1e-5)


def test_nt_xent_single_pair_is_zero_and_symmetry_and_scale_invariance() -> None:
    # One pair: the positive is the only candidate, so the loss is exactly 0.
    assert nt_xent_loss(torch.randn(1, 4), torch.randn(1, 4), 0.1).item() == pytest.approx(0.0, abs=1e-6)
    z1, z2 = torch.randn(12, 16), torch.randn(12, 16)
    base = nt_xent_loss(z1, z2, 0.3)
    torch.testing.assert_close(nt_xent_loss(z2, z1, 0.3), base)  # swapping the views
    perm = torch.randperm(12)
    torch.testing.assert_close(nt_xent_loss(z1[perm], z2[perm], 0.3), base)  # reordering the pairs
    torch.testing.assert_close(nt_xent_loss(3.0 * z1, 0.5 * z2, 0.3), base)  # cosine: scale-free


def test_aligned_pairs_score_lower_than_random_pairs() -> None:
    z1 = torch.randn(32, 64)
    aligned = nt_xent_loss(z1, z1 + 0.01 * torch.randn(32, 64), 0.1)
    unrelated = nt_xent_loss(z1, torch.randn(32, 64), 0.1)
    assert aligned.item() < 0.1 < math.log(63) - 1 < unrelated.item()


def test_nt_xent_under_bf16_autocast_stays_float32() -> None:
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = nt_xent_loss(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, nt_xent_loss(z1.bfloat16().float(), z2.bfloat16().float(), 0.1))


def test_bad_inputs_fail_clearly() -> None:
    with pytest.raises(ValueError, match="same"):
        nt_xent_loss(torch.randn(3, 4), torch.randn(2, 4), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.randn(3, 4), torch.randn(3, 4), 0.0)
    with pytest.raises(UserError, match="temperature"):
        simclr_loss_fn(-1.0)
    with pytest.raises(UserError, match="hidden_dim"):
        ProjectionHead(128, 0, 128)
    with pytest.raises(UserError, match="crop_scale"):
        ViewAugParams(crop_scale=(0.5, 0.2))



def _pairs(world: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(world * n, 6, generator=g), torch.randn(world * n, 6, generator=g)


def _gather_worker(rank: int, world: int, port: int, n: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        z1, z2 = _pairs(world, n)
        a = z1[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        b = z2[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        loss = nt_xent_loss(a, b, 0.2)
        loss.backward()
        local = nt_xent_loss(a.detach(), b.detach(), 0.2, gather=False)
        torch.save({"loss": loss.detach(), "local": local, "ga": a.grad, "gb": b.grad},
                   Path(out_dir) / f"{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_with_gathered_negatives_equal_one_process(tmp_path: Path) -> None:
    """Mean of the per-process losses = the one-process loss on the whole batch, and each
    process's gradient / W (what DDP's average makes of it) = the one-process gradient."""
    if not tdist.is_available() or not tdist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world, n = 2, 5
    mp.spawn(_gather_worker, args=(world, free_port(), n, str(tmp_path)), nprocs=world, join=True)
    z1, z2 = _pairs(world, n)
    z1.requires_grad_(True), z2.requires_grad_(True)
    single = nt_xent_loss(z1, z2, 0.2)
    single.backward()
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    torch.testing.assert_close(sum(g["loss"] for g in got) / world, single.detach())
    for r, g in enumerate(got):
        torch.testing.assert_close(g["ga"] / world, z1.grad[r * n : (r + 1) * n])
        torch.testing.assert_close(g["gb"] / world, z2.grad[r * n : (r + 1) * n])
        # gather=False: only this process's 2n - 2 negatives.
        sl = slice(r * n, (r + 1) * n)
        torch.testing.assert_close(g["local"], nt_xent_loss(z1[sl].detach(), z2[sl].detach(), 0.2))


# --------------------------------------------------------------------------- model pieces
def test_head_and_model_shapes_and_frozen_classifier() -> None:
    backbone = build_backbone("CifarResNet20", num_classes=10, embedding_dim=32)
    model = SimCLRModel(backbone, ProjectionHead(32, 64, 16))
    out = model(torch.randn(6, 3, 16, 16))
    assert out.embedding.shape == (6, 32) and out.projection.shape == (6, 16)
    assert not any(p.requires_grad for p in backbone.classifier.parameters())
    loss, logits = simclr_loss_fn(0.5)(out, torch.zeros(3, dtype=torch.int64))
    assert logits is None
    torch.testing.assert_close(loss, nt_xent_loss(out.projection[:3], out.projection[3:], 0.5))
    loss.backward()
    assert backbone.classifier.weight.grad is None
    assert all(p.grad is not None for p in model.head.parameters())
    with pytest.raises(ValueError, match="even"):
        simclr_loss_fn(0.5)(model(torch.randn(3, 3, 16, 16)), torch.zeros(1))


def test_knn_predict_hand_checked() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.02, 1.0], [0.6, 0.4]])
    assert knn_predict(train, labels, queries, k=1).tolist() == [0, 1, 0]
    # k=4: all vote; weights exp(cos/0.07) favour the nearer class.
    assert knn_predict(train, labels, queries, k=4).tolist() == [0, 1, 0]


class _Points(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def test_evaluate_knn_on_separable_points() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    y_train, y_val = torch.arange(40) % 4, torch.arange(20) % 4
    x_train = centres[y_train] + torch.randn(40, 4, generator=g)
    x_val = centres[y_val] + torch.randn(20, 4, generator=g)
    m = evaluate_knn(nn.Identity(), _Points(x_train, y_train), _Points(x_val, y_val), batch_size=8,
                     num_workers=0, device="cpu")
    assert m == {"knn_top1": 100.0, "val_loo_top1": 100.0}


# --------------------------------------------------------------------------- augmentation
def _write_npz(root: Path, n: int = 24, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("val", n // 2)):
        # Smooth random images (a few blobs) so crops and colour changes are visible.
        yy, xx = np.mgrid[0:size, 0:size] / size
        imgs = np.empty((count, size, size, 3), dtype=np.uint8)
        for i in range(count):
            c = rng.uniform(0, 1, (3, 3))
            f = rng.uniform(1, 4, 3)
            phase = (xx[..., None] * c[0] + yy[..., None] * c[1]) * 6 * f[None, None] + c[2]
            imgs[i] = (255 * (0.5 + 0.5 * np.sin(phase))).astype(np.uint8)
        np.savez(root / f"{split}.npz", images=imgs, labels=(np.arange(count) % 4).astype(np.int64))
    return root


def test_two_view_dataset_items(tmp_path: Path) -> None:
    ds = build_two_view_dataset("npz", str(_write_npz(tmp_path / "d")), "train", num_classes=3)
    assert len(ds) == 18 and list(ds.labels) == [i % 4 for i in range(24) if i % 4 < 3]
    assert ds.view_transform.params == default_view_params(32)
    (v1, v2), label = ds[5]
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == v2.dtype == torch.float32
    assert isinstance(label, int) and label == ds.labels[5]
    assert (v1 - v2).abs().mean() > 0.05  # independent augmentations
    torch.default_generator.manual_seed(123)
    a = ds[5]
    torch.default_generator.manual_seed(123)
    b = ds[5]
    torch.default_generator.manual_seed(124)
    c = ds[5]
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
    assert not torch.equal(a[0][0], c[0][0])


def test_seeded_loader_batches_are_identical_with_and_without_workers(tmp_path: Path) -> None:
    ds = build_two_view_dataset("npz", str(_write_npz(tmp_path / "d")), "train")

    def make(workers: int) -> tuple[DataLoader, EpochTaggedSampler]:
        sampler = EpochTaggedSampler(DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3))
        sampler.set_epoch(2)
        loader = DataLoader(SeededDataset(ds, seed=3), batch_size=8, sampler=sampler, drop_last=True,
                            num_workers=workers, collate_fn=two_view_collate)
        return loader, sampler

    loader, sampler = make(0)
    plain, workers = list(loader), list(make(2)[0])
    assert len(plain) == 3
    for (x, y), (x2, y2) in zip(plain, workers):
        assert x.shape == (16, 3, 32, 32) and y.shape == (8,)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # Rows j and 8 + j are the two views of the j-th sampled item, as the seeded dataset gives it.
    x, y = plain[0]
    for j, key in enumerate(list(sampler)[:8]):
        (v1, v2), label = SeededDataset(ds, seed=3)[key]
        assert torch.equal(x[j], v1) and torch.equal(x[8 + j], v2) and y[j] == label


@pytest.mark.parametrize("shape,ratio", [((3, 12, 12), (1.0, 1.0)), ((3, 12, 10), (0.8, 0.9))])
def test_geometry_full_crop_is_the_image_or_its_mirror(shape: tuple, ratio: tuple) -> None:
    """Scale 1: a sampled full crop (square) or the fallback full crop (12x10: no sampled box of
    the whole area fits, and the image's ratio is in range) gives back the exact pixels."""
    img = torch.randint(0, 256, shape, dtype=torch.uint8)
    p = ViewAugParams(crop_scale=(1.0, 1.0), crop_ratio=ratio, flip=True, jitter_prob=0.0, grayscale_prob=0.0)
    t = ArrayViewTransform(p, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    seen = set()
    for s in range(16):
        torch.default_generator.manual_seed(s)
        for view in t.views(img, 2) * 255.0:
            if torch.allclose(view, img.float(), atol=1e-3):
                seen.add("same")
            elif torch.allclose(view, img.float().flip(-1), atol=1e-3):
                seen.add("mirrored")
            else:
                raise AssertionError("a full-image crop changed the pixels")
    assert seen == {"same", "mirrored"}


def test_crop_boxes_respect_scale_ratio_and_bounds() -> None:
    p = ViewAugParams(crop_scale=(0.2, 0.6), crop_ratio=(0.5, 2.0))
    g = torch.Generator().manual_seed(0)
    for d in torch.rand(500, _NUM_DRAWS, generator=g, dtype=torch.float64).tolist():
        x0, y0, w, h = _crop_box(d, 32, 24, p)
        assert 0 <= x0 and x0 + w <= 24 + 1e-9 and 0 <= y0 and y0 + h <= 32 + 1e-9
        assert 0.2 - 1e-9 <= w * h / (32 * 24) <= 0.6 + 1e-9 and 0.5 - 1e-9 <= w / h <= 2.0 + 1e-9


def _sequential_jitter(x: np.ndarray, f: np.ndarray, order: list[int], p: ViewAugParams) -> np.ndarray:
    """The four jitter ops one after another (no clamping): x (P, 3) pixels in [0, 1]."""
    lo = [max(0.0, 1 - s) for s in (p.brightness, p.contrast, p.saturation)]
    fac = [lo[j] + (1 + s - lo[j]) * f[j] for j, s in enumerate((p.brightness, p.contrast, p.saturation))]
    for op in order:
        luma = x @ _LUMA
        if op == 0:
            x = fac[0] * x
        elif op == 1:
            x = fac[1] * x + (1 - fac[1]) * luma.mean()
        elif op == 2:
            x = fac[2] * x + (1 - fac[2]) * luma[:, None]
        else:
            a = 2 * math.pi * p.hue * (2 * f[3] - 1)
            yiq = x @ _YIQ.T
            i, q = yiq[:, 1].copy(), yiq[:, 2].copy()
            yiq[:, 1], yiq[:, 2] = math.cos(a) * i - math.sin(a) * q, math.sin(a) * i + math.cos(a) * q
            x = yiq @ np.linalg.inv(_YIQ).T
    return x


def test_colour_affine_equals_the_ops_in_any_order() -> None:
    rng = np.random.default_rng(0)
    p = ViewAugParams(jitter_prob=1.0, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                      grayscale_prob=0.0)
    for _ in range(5):
        x = rng.uniform(0, 1, (50, 3))
        u = rng.uniform(0, 1, (1, _NUM_DRAWS))
        u[0, _C_GRAY] = 0.9  # no grayscale
        a, b = colour_affine(u, x.mean(0, keepdims=True), p)
        fused = x @ a[0].T + b[0]
        for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
            np.testing.assert_allclose(fused, _sequential_jitter(x, u[0, _C_FACTORS:], order, p), atol=1e-10)
    # Grayscale: three equal channels; no jitter and no grayscale: identity.
    u = rng.uniform(0, 1, (2, _NUM_DRAWS))
    u[0, _C_GRAY], u[1, _C_GRAY], u[1, _C_JITTER] = 0.0, 0.9, 0.95
    a, b = colour_affine(u, x[:2], ViewAugParams(jitter_prob=0.9, grayscale_prob=0.5))
    grey = x @ a[0].T + b[0]
    np.testing.assert_allclose(grey, grey[:, :1].repeat(3, 1), atol=1e-10)
    np.testing.assert_allclose(a[1], np.eye(3), atol=1e-12)
    assert b[1] == 0.0


def test_digits_views_are_mild_and_stay_grey() -> None:
    ds = build_two_view_dataset("digits", "", "train")
    p = ds.view_transform.params
    assert p.flip is False and p.crop_scale[0] >= 0.5
    assert p.saturation == p.hue == p.grayscale_prob == 0.0
    t = ds.view_transform
    torch.default_generator.manual_seed(0)
    (v1, v2), _ = ds[3]
    assert v1.shape == (3, 8, 8)
    pixels = (torch.stack([v1, v2]) - t.shift) / t.scale  # back to [0, 1]
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[:, 1], pixels[:, 2], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- end to end
def test_a_few_simclr_steps_lower_the_loss(tmp_path: Path) -> None:
    """CifarResNet20 + head, 24 Adam steps on 64 synthetic 16x16 images: the loss on the first
    epoch's (seeded, so fixed) views drops well below its starting value. One intra-op thread:
    many small ops on a shared 2-core machine are slower with threads that wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_a_few_steps(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _run_a_few_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ds = build_two_view_dataset("npz", str(_write_npz(tmp_path / "d", n=64, size=16)), "train")
    backbone = build_backbone("CifarResNet20", num_classes=4, embedding_dim=32)
    model = SimCLRModel(backbone, ProjectionHead(32, 64, 32))
    loss_fn = simclr_loss_fn(0.2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.002)
    sampler = EpochTaggedSampler(DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0))
    loader = DataLoader(SeededDataset(ds, seed=0), batch_size=16, sampler=sampler, drop_last=True,
                        collate_fn=two_view_collate)

    def epoch0_loss() -> float:
        sampler.set_epoch(0)
        with torch.no_grad():
            return sum(loss_fn(model(x), y)[0].item() for x, y in loader) / len(loader)

    before = epoch0_loss()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        for images, labels in loader:
            loss, _ = loss_fn(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = epoch0_loss()
    assert after < before - 0.3, (before, after)


def _write_png_folders(root: Path, split_dirs: tuple[str, str], classes: list[str],
                       size: tuple[int, int]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in split_dirs:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def test_png_layouts_use_the_matching_transform(tmp_path: Path) -> None:
    # The reference CIFAR-100 layout (32x32 files): the fast array transform.
    cifar = _write_png_folders(tmp_path / "cifar", ("training", "validation"), ["0", "1", "2"], (32, 32))
    ds = build_two_view_dataset("cifar100", str(cifar), "val", num_classes=2)
    assert isinstance(ds.view_transform, ArrayViewTransform) and len(ds) == 4
    (v1, v2), label = ds[3]
    assert v1.shape == v2.shape == (3, 32, 32) and label == 1
    # Photos of any size: torchvision's pipeline at the data set's crop size, seeded the same way.
    photos = _write_png_folders(tmp_path / "photos", ("train", "val"), ["cat", "dog"], (48, 40))
    ds = build_two_view_dataset("imagefolder", str(photos), "train")
    assert isinstance(ds.view_transform, PILViewTransform) and ds.view_transform.params.blur_prob > 0
    torch.default_generator.manual_seed(9)
    (a1, a2), label = ds[2]
    torch.default_generator.manual_seed(9)
    (b1, b2), _ = ds[2]
    assert a1.shape == (3, 224, 224) and a1.dtype == torch.float32 and label == 1
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
