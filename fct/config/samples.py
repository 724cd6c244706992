"""A small ``train_backbone.py`` config on the embedded digits data, written to a folder.

One writer for the checks that train a real model in seconds: ``make gpu-check``'s DDP section,
benchmarks/bench_multinode.py and the tests. The model file and the run folder go into the same
folder as the config."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml


def digits_backbone_config(folder: Path, *, epochs: int, num_classes: int = 10, batch: int = 64,
                           lr: float = 0.1, runtime: Optional[Mapping[str, Any]] = None, extra: str = "",
                           name: str = "backbone.yaml") -> Path:
    """Write ``folder/name``: a CifarResNet20 (16-d embedding) trained with SGD and a cosine policy
    on the first ``num_classes`` digits, seed 3; ``output_model_path`` ``folder/model.pt``,
    ``output_dir`` ``folder/run``. ``runtime`` defaults to no progress bar and no TensorBoard;
    ``extra`` (YAML text) is appended. Returns the config's path."""
    folder.mkdir(parents=True, exist_ok=True)
    runtime = {"progress": False, "tensorboard": False, **(runtime or {})}
    text = textwrap.dedent(f"""\
        arch_params: {{arch: CifarResNet20, num_classes: 10, embedding_dim: 16, last_nonlin: true}}
        optimizer_params: {{algorithm: sgd, lr: {lr}, weight_decay: 0.0005, momentum: 0.9}}
        dataset_params: {{name: digits, num_classes: {num_classes}, num_workers: 0, batch_size: {batch}}}
        lr_policy_params: {{algorithm: cosine_lr, warmup_length: 1}}
        epochs: {epochs}
        label_smoothing: 0.1
        seed: 3
        output_model_path: {folder}/model.pt
        output_dir: {folder}/run
        """)
    text += "runtime: " + yaml.safe_dump(runtime, default_flow_style=True, sort_keys=False, width=1000)
    path = folder / name
    path.write_text(text + extra)
    return path
