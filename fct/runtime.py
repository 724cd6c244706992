"""Device, precision and memory-format choices shared by training and evaluation."""

from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import dataclass
from typing import ContextManager, Optional

import numpy as np
import torch
from torch import nn

from fct import dist
from fct.config import RuntimeParams
from fct.errors import ConfigError


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None: full fp32
    channels_last: bool
    params: RuntimeParams

    @property
    def uses_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self) -> ContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch of images to the device in the model's memory format."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


def make_runtime(params: RuntimeParams) -> Runtime:
    """Initialise distributed training if launched by torchrun and resolve precision."""
    if params.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device is 'cuda' but no CUDA device is available")
    device = dist.init(params.device)
    precision = params.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("runtime.precision 'fp16' needs a CUDA device; use fp32 or bf16 on the CPU")
    if precision == "bf16" and device.type == "cpu":
        warnings.warn("bf16 autocast on the CPU is usually slower than fp32", stacklevel=2)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if params.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=device, amp_dtype=amp, channels_last=params.channels_last, params=params)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun (SyncBatchNorm on CUDA when asked),
    else ``model`` itself."""
    if not dist.is_dist():
        return model
    if rt.device.type == "cuda" and rt.params.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    # Parameters with requires_grad=False (the classifier frozen by SimCLRModel) are not tracked
    # by DDP, so every tracked parameter gets a gradient each step: no find_unused_parameters.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
