"""Config sections shared by several config kinds: data set, optimiser, learning-rate schedule, runtime.

Field names follow the reference FCT/FastFill schema (protocols.md §9); fields marked *extension*
are ours and have defaults, so reference configs load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from fct.errors import ConfigError


@dataclass(frozen=True)
class OptimizerParams:
    """Optimiser of the trained weights."""

    algorithm: Literal["sgd", "adam", "adamw"]  # the optimiser
    lr: float  # base learning rate (the schedule scales it)
    weight_decay: float = 0.0  # weight decay (an L2 term for sgd and adam, decoupled for adamw)
    no_bn_decay: bool = False  # no weight decay on BatchNorm parameters and biases
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    # extension: the backbone trunk's lr is lr * this (fine-tuning pretrained weights); the classifier,
    # a foreign backbone's projection and any other head keep the full lr
    backbone_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer_params.lr must be > 0, got {self.lr}")
        if self.backbone_lr_mult < 0:
            raise ConfigError(f"optimizer_params.backbone_lr_mult must be >= 0, got {self.backbone_lr_mult}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer_params.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class SplitUrls:
    """Extension, ``webdataset`` only: where each split's shards are read from, in place of the
    paths listed by data_root/webdataset.json (e.g. the same shards on a web server or in object
    storage). Each is a WebDataset url pattern that expands to the index's shards, in its order."""

    # e.g. https://host/set/train-{000000..000049}.tar or pipe:aws s3 cp s3://b/train-{000000..000049}.tar -
    train: Optional[str] = None
    val: Optional[str] = None  # the validation shards, likewise (distinct from the training shards)


@dataclass(frozen=True)
class SplitCounts:
    """Extension, ``webdataset`` only: the expected number of samples of each split (all classes).
    The index already holds the counts, so these are optional; a value given must equal the
    index's count, a guard that ``urls`` name the shards the index describes."""

    train: Optional[int] = None  # training samples
    val: Optional[int] = None  # validation samples


@dataclass(frozen=True)
class DatasetParams:
    """The data set (a name registered in fct.data) and how it is batched.

    ``batch_size`` is the **global** batch: under ``torchrun`` with W processes each process takes
    ``batch_size / W`` samples per step, so a config means the same optimisation on one GPU or
    eight (the learning rate needs no rescaling when the process count changes).
    """

    name: str  # registered data set: digits, npz, cifar100, imagenet, imagefolder or webdataset
    data_root: str = ""  # its folder (ignored by digits; webdataset: the folder holding webdataset.json)
    num_classes: Optional[int] = None  # train on labels 0..num_classes-1 only; None: all
    num_workers: int = 4  # DataLoader worker processes per training process
    batch_size: int = 256  # global batch, split over processes
    # extension: train on this fraction of each class's training images (a class-balanced selection
    # fixed by train_fraction_seed, not by the run seed: "old data" for an added-data update)
    train_fraction: Optional[float] = None
    train_fraction_seed: int = 0  # extension: seed of the train_fraction selection
    urls: Optional[SplitUrls] = None  # extension, webdataset: shard url patterns per split; None: the index's shards
    num_samples: Optional[SplitCounts] = None  # extension, webdataset: expected samples per split (checked)
    # extension, webdataset: samples each loader worker holds to shuffle its stream (0 or 1: stored
    # order); the shard order is shuffled per epoch either way
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"dataset_params.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"dataset_params.num_workers must be >= 0, got {self.num_workers}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"dataset_params.num_classes must be >= 1, got {self.num_classes}")
        if self.train_fraction is not None and not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"dataset_params.train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"dataset_params.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        for split in ("train", "val"):
            n = None if self.num_samples is None else getattr(self.num_samples, split)
            if n is not None and n < 1:
                raise ConfigError(f"dataset_params.num_samples.{split} must be >= 1, got {n}")
        if self.name != "webdataset":
            for key in ("urls", "num_samples"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"dataset_params.{key} applies to name: webdataset only (name is {self.name!r})")
        elif self.train_fraction is not None:
            raise ConfigError(
                "dataset_params.train_fraction needs random access to every label, which a webdataset stream "
                "lacks: write the fraction's shards with `prepare_dataset.py ... --format webdataset "
                "--train-fraction F` instead"
            )
        if self.urls is not None and self.urls.train is not None and self.urls.train == self.urls.val:
            raise ConfigError("dataset_params.urls.train and urls.val are the same shards; the splits must differ")


@dataclass(frozen=True)
class LrPolicyParams:
    """Learning-rate schedule. ``epochs`` and ``lr`` repeat top-level values in reference
    configs: they may be omitted here, and when given they must agree."""

    algorithm: Literal["cosine_lr", "constant_lr", "multistep_lr"] = "cosine_lr"  # shape after the warm-up
    warmup_length: int = 0  # epochs of linear warm-up
    epochs: Optional[int] = None  # repeats the top-level epochs (reference configs); None: omitted
    lr: Optional[float] = None  # repeats optimizer_params.lr (reference configs); None: omitted
    lr_gamma: float = 0.1  # multistep: decay factor
    # multistep: an int decays every that many epochs (reference); a list gives the milestones
    lr_adjust: Union[int, list[int], None] = None
    per_step: bool = True  # extension: update the lr every step (fractional epoch), not per epoch

    def __post_init__(self) -> None:
        if self.warmup_length < 0:
            raise ConfigError(f"lr_policy_params.warmup_length must be >= 0, got {self.warmup_length}")
        if self.algorithm == "multistep_lr" and self.lr_adjust is None:
            raise ConfigError("lr_policy_params.lr_adjust is required for multistep_lr")


@dataclass(frozen=True)
class RuntimeParams:
    """Extension: how a run executes (none of it changes the maths)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else CPU
    # auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a gradient scaler
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True  # channels-last memory format for image batches and the model
    compile: bool = False  # torch.compile the model
    sync_batchnorm: bool = True  # under DDP on GPU only
    progress: bool = True  # progress bars (rank 0 only)
    tensorboard: bool = True  # TensorBoard event files in the run folder
    deterministic: bool = False  # deterministic algorithms (warn only), no cuDNN benchmarking


def check_repeated(section: str, name: str, nested: object, top: object) -> None:
    """Raise ConfigError when a value given both in ``section`` and at the top level disagrees.

    Reference configs repeat ``epochs`` and ``lr`` inside ``lr_policy_params``; either copy may be
    omitted (None), but two different values would leave the schedule ambiguous."""
    if nested is not None and top is not None and nested != top:
        raise ConfigError(
            f"{section}.{name}={nested!r} disagrees with {name}={top!r}; give it once or make them equal"
        )
