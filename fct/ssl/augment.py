"""Two independently augmented views per image, for label-free (SimCLR-style) training.

Small images (the in-memory arrays, 8..64 px) use :class:`ArrayViewTransform`: a random resized
crop and flip done for both views at once by one ``grid_sample``, and the whole colour pipeline
(brightness, contrast, saturation, hue, random grayscale) folded into one 3x3 matrix plus offset
per view, applied by one batched matmul: much cheaper than the same recipe as a
torchvision.transforms.v2 pipeline, which matters when the augmentation shares a few CPU cores
with the model.
Differences from torchvision's ops, by design: crop boxes are continuous (no rounding to whole
pixels); the hue shift is a rotation in the YIQ chroma plane (linear, so it folds into the
matrix) rather than an HSV round trip; the colour ops are clamped to [0, 1] once at the end, not
after each op, which also makes their order immaterial (see ``colour_affine``).

Photos decoded from files (imagenet / imagefolder) use :class:`PILViewTransform`, the usual
SimCLR ImageNet recipe as a torchvision pipeline, Gaussian blur included.

Every random number comes from torch's default CPU generator, so the project's per-sample
seeding (fct/training/loaders.py reseeds it per (seed, epoch, index)) makes each pair of views
reproducible.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from fct.config import ViewAugParams
from fct.data import build_dataset, dataset_info
from fct.data.arrays import ArrayDataset
from fct.data.folders import ImageFileDataset
from fct.errors import UserError

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = np.array([0.299, 0.587, 0.114])
# RGB -> YIQ; hue rotation = rotating the (I, Q) chroma plane.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)
_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop

# Columns of the per-view uniform draws (one torch.rand call per item gives all of them).
_C_CROP = 0  # 4 per attempt: area, log-ratio, x, y
_C_FLIP = _C_CROP + 4 * _CROP_ATTEMPTS
_C_JITTER = _C_FLIP + 1  # apply the colour jitter?
_C_FACTORS = _C_JITTER + 1  # brightness, contrast, saturation, hue
_C_GRAY = _C_FACTORS + 4
_NUM_DRAWS = _C_GRAY + 1


def default_view_params(image_size: int, grey: bool = False) -> ViewAugParams:
    """The recipe for an image size.

    - <= 16 px (the 8x8 digits): milder crops (>= 50% of the area) and no flip, since a crop of
      a few pixels or a mirrored digit is another digit or none.
    - <= 64 px (CIFAR-like): SimCLR's CIFAR recipe (colour strength 0.5), no blur (it wipes out
      32x32 images); crop scale from 0.2 as is usual for short schedules.
    - larger photos: SimCLR's ImageNet recipe (colour strength 1.0, crop scale from 0.08, blur).
    grey images (three equal channels) keep only brightness and contrast: saturation, hue and
    grayscale do nothing to them but cost time.
    """
    if image_size <= 16:
        p = ViewAugParams(crop_scale=(0.5, 1.0), flip=False)
    elif image_size <= 64:
        p = ViewAugParams()
    else:
        p = ViewAugParams(crop_scale=(0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                          blur_prob=0.5)
    if grey:
        p = ViewAugParams(crop_scale=p.crop_scale, crop_ratio=p.crop_ratio, flip=p.flip,
                          jitter_prob=p.jitter_prob, brightness=p.brightness, contrast=p.contrast,
                          saturation=0.0, hue=0.0, grayscale_prob=0.0, blur_prob=p.blur_prob)
    return p


class ViewTransform(Protocol):
    """Makes ``n`` independent augmented views of one raw image."""

    def views(self, image: Any, n: int) -> torch.Tensor:
        """raw image -> float32 (n, 3, S, S), normalised."""
        ...


def _crop_box(d: list[float], height: int, width: int, p: ViewAugParams) -> tuple[float, float, float, float]:
    """Uniform draws (4 per attempt) -> crop box (x0, y0, w, h) in pixels.

    torchvision's RandomResizedCrop sampling (area fraction and log-ratio uniform, the first of
    10 attempts that fits, else the centre crop with the ratio clamped), but the box is not
    rounded to whole pixels."""
    lo, hi = p.crop_scale
    lr0, lr1 = math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1])
    for j in range(0, 4 * _CROP_ATTEMPTS, 4):
        area = height * width * (lo + (hi - lo) * d[j])
        ratio = math.exp(lr0 + (lr1 - lr0) * d[j + 1])
        w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if w <= width and h <= height:
            return d[j + 2] * (width - w), d[j + 3] * (height - h), w, h
    in_ratio = width / height
    if in_ratio < p.crop_ratio[0]:
        w, h = float(width), width / p.crop_ratio[0]
    elif in_ratio > p.crop_ratio[1]:
        w, h = height * p.crop_ratio[1], float(height)
    else:
        w, h = float(width), float(height)
    return (width - w) / 2, (height - h) / 2, w, h


def _jitter_factor(strength: float, u: np.ndarray) -> np.ndarray:
    """Uniform in [max(0, 1 - s), 1 + s], as torchvision's ColorJitter draws its factors."""
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


def colour_affine(u: np.ndarray, mean_rgb: np.ndarray, p: ViewAugParams) -> tuple[np.ndarray, np.ndarray]:
    """The colour pipeline of n views as y = A x + b on RGB in [0, 1]: A (n, 3, 3), b (n,).

    u: uniform draws (n, _NUM_DRAWS); mean_rgb (n, 3): each view's mean pixel before colour ops.
    In YIQ space (luma Y, chroma I, Q) brightness scales everything, contrast scales everything
    and moves Y towards its image mean, saturation scales (I, Q), hue rotates (I, Q) and
    grayscale zeroes (I, Q).
    Without clamping between them these maps commute (the grey axis is YIQ's Y axis, and none
    of them changes the mean luma except by the brightness factor, which commutes), so the
    random order torchvision draws for the four jitter ops would make no difference here.
    b is the same for the three channels (YIQ's Y axis maps back to (1, 1, 1)).
    """
    jit = u[:, _C_JITTER] < p.jitter_prob
    f = u[:, _C_FACTORS : _C_FACTORS + 4]
    one = np.ones(len(u))
    bright = np.where(jit, _jitter_factor(p.brightness, f[:, 0]), one)
    contrast = np.where(jit, _jitter_factor(p.contrast, f[:, 1]), one)
    sat = np.where(jit, _jitter_factor(p.saturation, f[:, 2]), one)
    angle = np.where(jit, 2.0 * math.pi * p.hue * (2.0 * f[:, 3] - 1.0), 0.0)
    chroma = bright * contrast * sat * (u[:, _C_GRAY] >= p.grayscale_prob)
    d = np.zeros((len(u), 3, 3))
    d[:, 0, 0] = bright * contrast
    d[:, 1, 1] = d[:, 2, 2] = chroma * np.cos(angle)
    d[:, 2, 1] = chroma * np.sin(angle)
    d[:, 1, 2] = -d[:, 2, 1]
    a = _YIQ_INV @ d @ _YIQ
    b = bright * (1.0 - contrast) * (mean_rgb @ _LUMA)
    return a, b


class ArrayViewTransform:
    """uint8 (3, H, W) tensor -> ``n`` views float32 (n, 3, H, W), normalised with mean/std.

    Output size = input size (the crop is resized back to the image's own size)."""

    def __init__(self, params: ViewAugParams, mean: Sequence[float], std: Sequence[float]) -> None:
        self.params = params
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x - mean) / std as one multiply-add.
        self.scale = 1.0 / std_t
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t
        self.colour = params.jitter_prob > 0 or params.grayscale_prob > 0

    def views(self, image: torch.Tensor, n: int) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (n, 3, H, W)."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
        _, h, w = image.shape
        p = self.params
        # All of this item's randomness in one draw from the default generator (float64 so the
        # crop offsets keep full precision).
        u = torch.rand(n, _NUM_DRAWS, dtype=torch.float64).numpy()
        # Sampling grid of each view, in [-1, 1] input coordinates (align_corners=False: -1 is the
        # outer edge of the first pixel, so the box maps exactly onto the output grid). The crop
        # is axis-aligned, so x depends on the column only and y on the row only.
        grid = np.empty((n, h, w, 2), dtype=np.float32)
        cx, cy = (np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h  # output pixel centres in [0, 1]
        for i, d in enumerate(u.tolist()):
            x0, y0, cw, ch = _crop_box(d, h, w, p)
            xs = cx[::-1] if p.flip and d[_C_FLIP] < 0.5 else cx
            grid[i, :, :, 0] = ((x0 + xs * cw) * (2.0 / w) - 1.0)[None, :]
            grid[i, :, :, 1] = ((y0 + cy * ch) * (2.0 / h) - 1.0)[:, None]
        src = image.to(torch.float32).mul_(1.0 / 255.0).unsqueeze(0).expand(n, 3, h, w)
        out = F.grid_sample(src, torch.from_numpy(grid), mode="bilinear", padding_mode="border",
                            align_corners=False)
        if self.colour:
            a, b = colour_affine(u, out.mean(dim=(2, 3)).double().numpy(), p)
            out = torch.baddbmm(torch.from_numpy(b).float().view(n, 1, 1), torch.from_numpy(a).float(),
                                out.view(n, 3, h * w)).view(n, 3, h, w).clamp_(0.0, 1.0)
        return torch.addcmul(self.shift, out, self.scale)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One view: uint8 (3, H, W) -> float32 (3, H, W)."""
        return self.views(image, 1)[0]

    def __repr__(self) -> str:
        return f"ArrayViewTransform({self.params})"


class PILViewTransform:
    """PIL image -> ``n`` views float32 (n, 3, size, size): SimCLR's ImageNet recipe via
    torchvision.transforms.v2 (its randomness also comes from torch's default generator)."""

    def __init__(self, params: ViewAugParams, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        from torchvision.transforms import v2

        p = params
        steps: list = [
            v2.RandomResizedCrop(size, scale=p.crop_scale, ratio=p.crop_ratio, antialias=True),
        ]
        if p.flip:
            steps.append(v2.RandomHorizontalFlip())
        if p.jitter_prob > 0:
            steps.append(v2.RandomApply([v2.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue)],
                                        p=p.jitter_prob))
        if p.grayscale_prob > 0:
            steps.append(v2.RandomGrayscale(p.grayscale_prob))
        if p.blur_prob > 0:
            kernel = 2 * (size // 20) + 1  # about a tenth of the image side, odd (23 for 224)
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p.blur_prob))
        steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                  v2.Normalize(list(mean), list(std))]
        self.params = params
        self.transform = v2.Compose(steps)

    def views(self, image: Image.Image, n: int) -> torch.Tensor:
        """PIL image -> float32 (n, 3, size, size)."""
        return torch.stack([self.transform(image) for _ in range(n)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def __repr__(self) -> str:
        return f"PILViewTransform({self.params})"


class RawArrayDataset(Dataset):
    """Items (uint8 (3, H, W) tensor, label) of in-memory uint8 (N, H, W, 3) images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray | None = None) -> None:
        self.images = images
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels: np.ndarray = np.asarray(labels)[self.indices].astype(np.int64)

    @classmethod
    def from_array_dataset(cls, ds: ArrayDataset) -> "RawArrayDataset":
        """The raw images of an fct.data ArrayDataset (shares its image array, no copy)."""
        out = cls.__new__(cls)
        out.images, out.indices, out.labels = ds.images, ds.indices, ds.labels
        return out

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # The transpose makes ascontiguousarray copy: the tensor never aliases the shared array.
        img = np.ascontiguousarray(self.images[self.indices[i]].transpose(2, 0, 1))
        return torch.from_numpy(img), int(self.labels[i])

    def is_grey(self) -> bool:
        """Whether every kept image has three equal channels."""
        imgs = self.images[self.indices]
        return bool((imgs[..., 0] == imgs[..., 1]).all() and (imgs[..., 1] == imgs[..., 2]).all())


class TwoViewDataset(Dataset):
    """Items ((view1, view2), label): two independent augmentations of one image.

    base: a dataset of (raw image, label), the raw image being what ``view_transform.views``
    takes (a uint8 (3, H, W) tensor for ArrayViewTransform, a PIL image for PILViewTransform).
    The label is passed through for bookkeeping (e.g. k-NN monitoring); training ignores it.
    """

    def __init__(self, base: Dataset, view_transform: ViewTransform) -> None:
        self.base = base
        self.view_transform = view_transform
        self.labels = getattr(base, "labels", None)
        self.num_classes_total = getattr(base, "num_classes_total", None)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        image, label = self.base[i]
        v = self.view_transform.views(image, 2)
        return (v[0], v[1]), label

    def __repr__(self) -> str:
        return f"TwoViewDataset({len(self)} images, {self.view_transform})"


def two_view_collate(
    batch: list[tuple[tuple[torch.Tensor, torch.Tensor], Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader collate_fn: N items ((v1, v2), label) -> (images (2N, 3, H, W), labels (N,)).

    Rows 0..N-1 are the first views, rows N..2N-1 the second, in the same order, so a model sees
    one ordinary image batch and the loss splits its output in halves."""
    first = [item[0][0] for item in batch]
    second = [item[0][1] for item in batch]
    labels = torch.as_tensor([int(item[1]) for item in batch], dtype=torch.int64)
    return torch.stack(first + second), labels


def _pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 (3, H, W) tensor (module level, so workers can pickle it)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


def _identity(img: Image.Image) -> Image.Image:
    return img


def build_two_view_dataset(
    name: str,
    data_root: str,
    split: str,
    num_classes: int | None = None,
    params: ViewAugParams | None = None,
) -> TwoViewDataset:
    """A split of a registered data set as items ((view1, view2), label).

    Reads the raw images through fct.data (same files, class subset and normalisation as
    ``build_dataset``), then augments them with :class:`ArrayViewTransform` (in-memory arrays
    and the 32x32 PNG layout) or :class:`PILViewTransform` (photos of any size).
    params: None picks ``default_view_params`` for the image size (and greyness, for arrays).
    """
    info = dataset_info(name, data_root)
    base = build_dataset(name, data_root, split, augment=False, num_classes=num_classes)
    raw: Dataset
    transform: ViewTransform
    if isinstance(base, ArrayDataset):
        arrays = RawArrayDataset.from_array_dataset(base)
        if params is None:
            params = default_view_params(int(base.images.shape[1]), grey=arrays.is_grey())
        raw, transform = arrays, ArrayViewTransform(params, info.mean, info.std)
    elif isinstance(base, ImageFileDataset):
        if base.expected_size is not None:  # small fixed-size files (reference CIFAR-100 layout)
            raw = ImageFileDataset(base.samples, _pil_to_uint8, base.num_classes_total, base.expected_size)
            if params is None:
                params = default_view_params(base.expected_size[0])
            transform = ArrayViewTransform(params, info.mean, info.std)
        else:
            raw = ImageFileDataset(base.samples, _identity, base.num_classes_total)
            if params is None:
                params = default_view_params(info.image_size)
            transform = PILViewTransform(params, info.image_size, info.mean, info.std)
    else:
        raise UserError(f"data set {name!r} gives {type(base).__name__} items; two-view training "
                        "supports in-memory arrays and image folders")
    return TwoViewDataset(raw, transform)
