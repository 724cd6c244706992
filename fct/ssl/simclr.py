"""SimCLR pieces: projection head, NT-Xent loss (negatives gathered across processes), the
training wrapper and a k-NN monitor of the frozen embedding.

Wiring with the project's loop: the loader yields (images (2N, 3, H, W), labels (N,)) through
``fct.ssl.two_view_collate`` (first views, then second views); :class:`SimCLRModel` embeds and
projects the 2N images as one batch (so BatchNorm sees both views); ``simclr_loss_fn`` splits the
projections in halves. Labels are never used for training.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fct import dist
from fct.errors import UserError


class ProjectionHead(nn.Module):
    """Linear - BatchNorm - ReLU - Linear: (N, embedding_dim) -> (N, out_dim).

    Used for the contrastive loss only; the side-information feature is the backbone's embedding
    before it (the representation the head sits on transfers better than the head's output)."""

    def __init__(self, embedding_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        for name, v in (("embedding_dim", embedding_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"projection head {name} must be a positive integer, got {v!r}")
        self.net = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim, bias=False),  # BN's shift makes a bias redundant
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, embedding_dim) -> (N, out_dim)."""
        return self.net(x)


class SimCLROutput(NamedTuple):
    embedding: torch.Tensor  # (2N, D): the backbone's embedding (what side-information uses)
    projection: torch.Tensor  # (2N, P): the head's output, fed to the loss


class SimCLRModel(nn.Module):
    """Backbone + projection head as one module (one DDP wrapper, one optimizer, one checkpoint).

    The backbone's classifier, if it has one, is frozen (``requires_grad=False``): label-free
    training never gives it a gradient, and DDP would otherwise wait for one forever. Save
    ``model.backbone`` as the side-information model; the head is discarded.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        classifier = getattr(backbone, "classifier", None)
        if isinstance(classifier, nn.Module):
            classifier.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> SimCLROutput:
        """(2N, 3, H, W) -> SimCLROutput(embedding (2N, D), projection (2N, P))."""
        out = self.backbone(x)
        emb = getattr(out, "embedding", out)
        emb = emb.flatten(1)
        return SimCLROutput(embedding=emb, projection=self.head(emb))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this process's slice of the summed gradient.

    Each process's loss uses every process's rows, so d(sum of all losses)/d(local rows) is the
    sum over processes of their gradients for these rows: an all_reduce, then a slice. (DDP then
    averages parameter gradients over processes, which makes the update the gradient of the mean
    loss over the global batch, the same as one process with the whole batch.)
    torch.distributed.nn.functional.all_gather does the same but its backward needs
    reduce_scatter, which gloo (CPU) lacks.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        start = tdist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, D) on each of W processes -> (W n, D) in rank order, differentiable; identity when not
    distributed. Every process must pass the same n (the training loader drops the last batch)."""
    if not dist.is_dist() or dist.world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """Normalised-temperature cross-entropy (SimCLR) of N positive pairs; a scalar.

    z1, z2: (N, D), row i of z1 and row i of z2 are two views of one image. Each of the 2N rows
    is an anchor whose positive is its pair and whose negatives are the other 2N - 2 rows;
    similarity is cosine / temperature; the loss is the mean over the 2N anchors.
    gather: under DDP, the candidates are the rows of *all* processes (2 W N - 2 negatives per
    anchor) while the anchors stay local, so with the DDP gradient average the run optimises the
    same objective as one process holding the whole global batch, whatever the process count.
    Computed in float32 outside autocast (exp of similarities / 0.1 overflows fp16).
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same (N, D) shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a1 = F.normalize(z1.float(), dim=1)
        a2 = F.normalize(z2.float(), dim=1)
        if gather and dist.is_dist() and dist.world_size() > 1:
            c1, c2 = gather_with_grad(a1), gather_with_grad(a2)
            offset = dist.rank() * n
        else:
            c1, c2, offset = a1, a2, 0
        m = c1.shape[0]
        anchors = torch.cat([a1, a2])  # (2n, D)
        candidates = torch.cat([c1, c2])  # (2m, D)
        logits = anchors @ candidates.T / temperature  # (2n, 2m)
        local = torch.arange(n, device=z1.device) + offset
        own = torch.cat([local, local + m])  # each anchor's own column
        positive = torch.cat([local + m, local])  # its pair's column
        rows = torch.arange(2 * n, device=z1.device)
        logits = logits.index_put((rows, own), torch.tensor(float("-inf"), device=z1.device))
        return F.cross_entropy(logits, positive)


LossFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]


def simclr_loss_fn(temperature: float, gather: bool = True) -> LossFn:
    """A loss_fn(model_output, labels) -> (loss, None) for the project's loop.

    model_output: a SimCLROutput of the (2N, ...) batch made by ``two_view_collate`` (first
    views in rows 0..N-1, second views in rows N..2N-1). labels (N,) are ignored (label-free);
    no logits are returned, so no training accuracy is reported."""
    if not temperature > 0:
        raise UserError(f"the SimCLR temperature must be > 0, got {temperature}")

    def loss_fn(out: Any, labels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        z = out.projection
        if z.shape[0] % 2:
            raise ValueError(f"expected an even number of rows (two views per image), got {z.shape[0]}")
        n = z.shape[0] // 2
        return nt_xent_loss(z[:n], z[n:], temperature, gather=gather), None

    return loss_fn


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN classifier on cosine similarity: predicted labels (Nq,).

    Each of the k nearest training items votes for its label with weight exp(cos / temperature)
    (the usual monitor of self-supervised embeddings)."""
    if train_feats.shape[0] == 0 or query_feats.shape[0] == 0:
        raise UserError("k-NN needs a non-empty training set and query set")
    k = min(k, train_feats.shape[0])
    classes = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    g = F.normalize(train_feats.float(), dim=1)
    q = F.normalize(query_feats.float(), dim=1)
    preds = []
    for start in range(0, q.shape[0], chunk):
        sim, idx = (q[start : start + chunk] @ g.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], classes, device=sim.device)
        votes.scatter_add_(1, train_labels.to(sim.device)[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def evaluate_knn(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    k: int = 20,
    temperature: float = 0.07,
    progress: bool = False,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """k-NN top-1 (%) of the frozen embedding: val queries against the training set, and
    leave-one-out top-1 within the val split (the retrieval protocol's CMC top-1, cosine).

    model: any module whose output has ``.embedding`` (a backbone or SimCLRModel) or is a tensor;
    train_set / val_set: evaluation datasets (``build_dataset(..., augment=False)``). Works under
    DDP (features are gathered); every process returns the same numbers. amp_dtype /
    channels_last: as in ``extract_features`` (autocast on CUDA, input memory format).
    """
    from fct.retrieval.features import extract_features

    kw = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
              amp_dtype=amp_dtype, channels_last=channels_last)
    train_f, train_y = extract_features(model, train_set, **kw)  # type: ignore[arg-type]
    val_f, val_y = extract_features(model, val_set, **kw)  # type: ignore[arg-type]
    classes = int(max(train_y.max().item(), val_y.max().item())) + 1
    pred = knn_predict(train_f, train_y, val_f, k=k, temperature=temperature, num_classes=classes)
    v = F.normalize(val_f, dim=1)
    loo_hits = 0
    for start in range(0, v.shape[0], 1024):
        sim = v[start : start + 1024] @ v.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = float("-inf")  # a query never retrieves itself
        loo_hits += int((val_y[sim.argmax(1)] == val_y[start : start + 1024]).sum())
    return {
        "knn_top1": 100.0 * float((pred == val_y).float().mean()),
        "val_loo_top1": 100.0 * loo_hits / v.shape[0],
    }
