"""Image transforms: a few numpy/torch ops for small in-memory images, torchvision for photos.

All randomness comes from torch's CPU generator, which the DataLoader seeds differently in every
worker (numpy's global RNG would repeat the same augmentations in each forked worker). To make an
item's augmentation reproducible, seed it with ``torch.default_generator.manual_seed(s)``:
``torch.manual_seed`` also seeds every CUDA device, which makes it far slower per call.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

# The ImageNet training-set statistics every ImageNet-pretrained pipeline uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The commonly published CIFAR-100 training-set statistics (per-pixel mean and std in [0, 1]).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _draws_to_params(u: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniform draws (B, 3) in [0, 1) -> crop offsets y, x in 0..2*pad and flip flags, each (B,).

    One torch.rand call per batch (or image) gives all three; float64 so u * (2 pad + 1) stays
    below 2 pad + 1."""
    u = u.astype(np.float64)
    oy, ox = np.minimum((u[:, :2] * (2 * pad + 1)).astype(np.int64), 2 * pad).T
    return oy, ox, u[:, 2] < 0.5


def random_crop_flip(images: np.ndarray, pad: int, flip: bool) -> np.ndarray:
    """Per-sample random crop of the zero-padded images and optional horizontal flip, batched.

    images: (B, H, W, C) -> new array (B, H, W, C). Per sample, the same distribution as
    torchvision's ``RandomCrop(H, padding=pad)`` (fill 0) then ``RandomHorizontalFlip()``: offsets
    uniform in [0, 2 * pad], flip with probability 1/2, drawn from torch's RNG. Done as one numpy
    gather over a strided view of all crop windows, avoiding a torch call per sample (torch's
    advanced indexing is also slower than numpy's for this copy).
    """
    b, h, w, c = images.shape
    oy, ox, mirrored = _draws_to_params(torch.rand(b, 3).numpy(), pad)
    padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), dtype=images.dtype)
    padded[:, pad : pad + h, pad : pad + w] = images
    sb, sh, sw, sc = padded.strides
    # windows[i, y, x] is the (H, W, C) crop of sample i at offset (y, x); a view, no copy.
    windows = np.lib.stride_tricks.as_strided(
        padded, (b, 2 * pad + 1, 2 * pad + 1, h, w, c), (sb, sh, sw, sh, sw, sc), writeable=False
    )
    out = windows[np.arange(b), oy, ox]
    if flip:
        out[mirrored] = out[mirrored, :, ::-1]
    return out


def random_crop_flip_one(image: np.ndarray, pad: int, flip: bool) -> np.ndarray:
    """``random_crop_flip`` for one (H, W, C) image without the batch machinery (cheaper per
    image). It consumes the same random numbers, so under one seed both agree."""
    h, w, _ = image.shape
    uy, ux, uf = torch.rand(3).tolist()  # python floats are doubles: same values as the batch path
    n = 2 * pad + 1
    dy, dx = min(int(uy * n), n - 1) - pad, min(int(ux * n), n - 1) - pad
    # Output pixel (i, j) = image[i + dy, j + dx], zero outside the image.
    out = np.zeros_like(image)
    out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = image[
        max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
    ]
    if flip and uf < 0.5:
        out = out[:, ::-1]
    return out


class ArrayTransform:
    """uint8 images -> normalised float32 (3, H, W), with optional augmentation.

    ``pad > 0`` adds a random crop of the zero-padded image, ``flip`` a horizontal flip with
    probability 1/2. With neither it is the deterministic evaluation transform. ``batch`` works on
    (B, H, W, 3) numpy arrays (the in-memory data sets), ``single`` on one (H, W, 3) array, and
    calling it on one (3, H, W) uint8 tensor (the output of PILToTensor) does the same.
    """

    def __init__(
        self,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        pad: int = 0,
        flip: bool = False,
    ) -> None:
        mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.pad = pad
        self.flip = flip

    def batch(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float32 (B, 3, H, W)."""
        if self.pad > 0 or self.flip:
            images = random_crop_flip(images, self.pad, self.flip)
        chw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return torch.addcmul(self.shift, chw.float(), self.scale)

    def single(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 (3, H, W)."""
        if self.pad > 0 or self.flip:
            image = random_crop_flip_one(image, self.pad, self.flip)
        chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return torch.addcmul(self.shift, chw.float(), self.scale)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (3, H, W)."""
        return self.single(img.permute(1, 2, 0).numpy())

    def __repr__(self) -> str:
        return f"ArrayTransform(pad={self.pad}, flip={self.flip})"


def imagenet_transforms(
    augment: bool,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    size: int = 224,
) -> Callable:
    """PIL image -> float32 (3, size, size). Training: RandomResizedCrop + flip;
    evaluation: resize the short side to size*8/7 (256 for 224), then centre crop."""
    from torchvision import transforms as T

    if augment:
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def pil_array_transform(array_transform: ArrayTransform) -> Callable:
    """PIL image -> uint8 (3, H, W) tensor -> ``array_transform``: the same pipeline as the
    in-memory arrays, for small images stored as files (the reference CIFAR-100 layout)."""
    from torchvision import transforms as T

    return T.Compose([T.PILToTensor(), array_transform])
