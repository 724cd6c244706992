"""Augmentation config section: one view of label-free two-view training (``ssl_params.augmentation``).

The transforms that apply it live in fct.ssl.augment; this module holds only the typed values, so
fct.config does not depend on fct.ssl.
"""

from __future__ import annotations

from dataclasses import dataclass

from fct.errors import ConfigError


@dataclass(frozen=True)
class ViewAugParams:
    """One view's augmentation (SimCLR's, with strengths as torchvision's ColorJitter).

    crop_scale / crop_ratio: area fraction and aspect-ratio range of the random resized crop.
    brightness, contrast, saturation: factors drawn uniformly in [max(0, 1 - s), 1 + s];
    hue: shift drawn in [-hue, hue] (fraction of a full turn, <= 0.5). The four are applied
    together with probability jitter_prob, then grayscale with probability grayscale_prob.
    blur_prob applies to PILViewTransform only (blur erases most of a 32x32 image).
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction range of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range of the random resized crop
    flip: bool = True  # random horizontal flip
    jitter_prob: float = 0.8  # probability of the colour jitter (the four strengths below, together)
    brightness: float = 0.4  # factor drawn in [max(0, 1 - s), 1 + s]
    contrast: float = 0.4  # factor drawn in [max(0, 1 - s), 1 + s]
    saturation: float = 0.4  # factor drawn in [max(0, 1 - s), 1 + s]
    hue: float = 0.1  # shift drawn in [-hue, hue], a fraction of a full turn (<= 0.5)
    grayscale_prob: float = 0.2  # probability of converting the view to grayscale
    blur_prob: float = 0.0  # probability of a Gaussian blur (PILViewTransform, photos from files, only)

    def __post_init__(self) -> None:
        # ConfigError (a UserError): these values also come from YAML (ssl_params.augmentation).
        for name in ("crop_scale", "crop_ratio"):
            if len(getattr(self, name)) != 2:
                raise ConfigError(f"{name} must be two numbers [low, high], got {getattr(self, name)}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ConfigError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        for name in ("jitter_prob", "grayscale_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"hue must be in [0, 0.5], got {self.hue}")
