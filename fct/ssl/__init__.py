"""Label-free (SimCLR-style) training of side-information models.

- Data: ``build_two_view_dataset(name, data_root, split)`` -> items ((view1, view2), label);
  ``two_view_collate`` turns a batch into (images (2N, 3, H, W), labels (N,)).
- Model: ``SimCLRModel(backbone, ProjectionHead(D, hidden, out))`` -> SimCLROutput(embedding,
  projection); only ``model.backbone`` is kept afterwards.
- Loss: ``simclr_loss_fn(temperature)`` (loss_fn(output, labels) -> (loss, None)) on
  ``nt_xent_loss``, whose negatives come from every process under DDP.
- Monitor: ``evaluate_knn`` (weighted k-NN top-1 of the frozen embedding).
"""

from fct.ssl.augment import (
    ArrayViewTransform,
    PILViewTransform,
    RawArrayDataset,
    TwoViewDataset,
    build_two_view_dataset,
    default_view_params,
    two_view_collate,
)
from fct.ssl.simclr import (
    ProjectionHead,
    SimCLRModel,
    SimCLROutput,
    evaluate_knn,
    gather_with_grad,
    knn_predict,
    nt_xent_loss,
    simclr_loss_fn,
)

__all__ = [
    "ArrayViewTransform",
    "PILViewTransform",
    "ProjectionHead",
    "RawArrayDataset",
    "SimCLRModel",
    "SimCLROutput",
    "TwoViewDataset",
    "build_two_view_dataset",
    "default_view_params",
    "evaluate_knn",
    "gather_with_grad",
    "knn_predict",
    "nt_xent_loss",
    "simclr_loss_fn",
    "two_view_collate",
]
