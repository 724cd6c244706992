"""Images stored as files, one folder per class (`<split dir>/<class>/**/<image>`).

Label rule, shared by every folder layout here: when every class folder name is a decimal
integer, the label is ``int(name)`` (the reference CIFAR-100 layout names folders by class id, and
lexicographic order would put '10' before '2'); otherwise labels follow the sorted folder names,
as torchvision's ImageFolder does. The mapping always comes from the training folder and is applied
to the validation folder, so both splits agree even when one lacks a class.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fct.errors import UserError

# The extensions torchvision's ImageFolder accepts.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Accepted names of the two split folders: ours first, then the reference implementation's.
SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "validation")}
_INT_NAME = re.compile(r"[0-9]+")


def find_split_dir(root: Path, split: str, hint: str) -> Path:
    """``root/train`` or ``root/training`` (``val`` / ``validation``); missing -> UserError."""
    if not root.is_dir():
        raise UserError(f"data_root {root} is not a folder; {hint}")
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    names = " or ".join(f"{root / n}/" for n in SPLIT_DIRS[split])
    raise UserError(f"no {split} folder: expected {names}; {hint}")


def class_folders(split_dir: Path) -> list[str]:
    """Names of the class sub-folders, sorted."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def class_mapping(names: list[str], where: Path) -> dict[str, int]:
    """Folder name -> label (see the module docstring for the rule)."""
    if not names:
        raise UserError(f"{where} holds no class folders (expected {where}/<class>/<image files>)")
    if all(_INT_NAME.fullmatch(n) for n in names):
        mapping = {n: int(n) for n in names}
        if len(set(mapping.values())) != len(names):
            raise UserError(f"{where}: class folders name the same integer twice (e.g. '1' and '01')")
        return mapping
    return {n: i for i, n in enumerate(sorted(names))}


def num_classes_of(mapping: dict[str, int]) -> int:
    """Classes in the data: the largest label + 1 (labels are class ids, possibly with gaps)."""
    return max(mapping.values()) + 1


def scan_samples(split_dir: Path, mapping: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of every image file under the class folders, in a fixed order.

    A class folder absent from ``mapping`` (a validation class the training split lacks) is a
    UserError; an empty split too.
    """
    names = class_folders(split_dir)
    unknown = [n for n in names if n not in mapping]
    if unknown:
        raise UserError(
            f"{split_dir}: class folders {unknown[:5]} do not exist in the training folder, "
            "so they have no label"
        )
    samples = []
    for name in names:
        for dirpath, dirnames, filenames in os.walk(split_dir / name, followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), mapping[name]))
    if not samples:
        raise UserError(f"{split_dir} holds no image files ({', '.join(IMG_EXTENSIONS)})")
    return samples


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ImageFileDataset(Dataset):
    """Items (float32 (3, H, W), label) decoded from image files on each access."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Callable[[Image.Image], torch.Tensor],
        num_classes_total: int,
        expected_size: tuple[int, int] | None = None,
    ) -> None:
        self.samples = samples
        self.labels: np.ndarray = np.array([s[1] for s in samples], dtype=np.int64)
        self.transform = transform
        self.num_classes_total = num_classes_total
        # (width, height) that every file must have, for layouts whose transform does not resize.
        self.expected_size = expected_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = load_rgb(path)
        if self.expected_size is not None and img.size != self.expected_size:
            w, h = self.expected_size
            raise UserError(f"{path} is {img.size[0]}x{img.size[1]}, expected {w}x{h}")
        return self.transform(img), label

    def __repr__(self) -> str:
        return f"ImageFileDataset({len(self)} files, {self.num_classes_total} classes)"
