"""Backbones: fct's ResNets (below) and, by ``timm/<name>`` / ``torchvision/<name>``, foreign
networks (:mod:`fct.models.foreign`); all return ``BackboneOutput`` and have a ``classifier``.

ResNet backbones that output an embedding of a chosen width and bias-free classifier logits.

The embedding follows the FCT reference recipe (protocols.md §4): the *last* residual block of
the last stage outputs ``embedding_dim`` channels directly (its shortcut becomes a 1x1
projection when the width changes), a ReLU follows the residual sum of that block only when
``last_nonlin`` is true, then global average pooling gives the (N, embedding_dim) embedding. The
classifier is a bias-free linear layer on the embedding. ``embedding_dim=None`` keeps the usual
width of the architecture (512 for basic blocks, 2048 for bottlenecks, 64 for the small CIFAR
nets), which gives exactly the torchvision network (without the classifier bias).

Two details of the reference are kept because they change the architecture: in a basic block
that outputs the embedding, *both* 3x3 convs take the embedding width; in a bottleneck only the
final 1x1 conv does (the inner width stays). The reference's ResNet101 cannot be built (a typo in
a keyword); here it builds as intended.

Parameter names match torchvision's (``conv1``, ``bn1``, ``layer1.0.downsample.0``, ...), so
torchvision weights load with ``strict=False`` minus ``fc``.

Init: Kaiming-normal (fan_out, ReLU gain) for convs, BN gamma 1 / beta 0. The last BN of each
residual branch is *not* zero-initialised: the reference does not do it, and the embedding
block's output would otherwise start as its shortcut alone.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Type, Union

import torch
import torch.nn as nn

from fct.errors import ConfigError
from fct.models.backbone_output import BackboneOutput
from fct.registry import Registry


def _projection(in_ch: int, out_ch: int, stride: int) -> Optional[nn.Module]:
    """1x1 conv + BN shortcut when the residual's shape changes, else None (identity)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs. ``width`` is the inner width; in a plain block it equals ``out_ch``."""

    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int = 1, relu_out: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_ch, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_ch, out_ch, stride)
        self.relu_out = relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_ch, H, W) -> (N, out_ch, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out) if self.relu_out else out


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as torchvision's v1.5), 1x1 expand to ``out_ch``."""

    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int = 1, relu_out: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_ch, out_ch, stride)
        self.relu_out = relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_ch, H, W) -> (N, out_ch, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu(out) if self.relu_out else out


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """A ResNet with an ImageNet stem (7x7/2 conv + 3x3/2 max-pool) or a CIFAR stem (3x3/1 conv).

    Stage i has ``depths[i]`` blocks of nominal width ``planes[i]``; stage 0 keeps the
    resolution, later stages halve it in their first block.
    """

    def __init__(
        self,
        block: Block,
        depths: Sequence[int],
        planes: Sequence[int],
        *,
        num_classes: int,
        embedding_dim: Optional[int] = None,
        last_nonlin: bool = True,
        imagenet_stem: bool = True,
        width_factor: int = 1,
        arch: str = "ResNet",
    ) -> None:
        super().__init__()
        self.arch = arch  # the registry name, so arch_params can be recovered from the module
        if len(depths) != len(planes):
            raise ValueError("depths and planes must have the same length")
        expansion = 4 if block is Bottleneck else 1
        if block is BasicBlock and width_factor != 1:
            raise ValueError("wide basic blocks are not supported")
        default_dim = planes[-1] * expansion
        self.embedding_dim = default_dim if embedding_dim is None else int(embedding_dim)
        self.num_classes = int(num_classes)
        self.last_nonlin = bool(last_nonlin)

        stem_ch = planes[0]
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, stem_ch, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            # 32x32 inputs: keep the resolution, a stride-4 stem would leave 1x1 maps in stage 4.
            self.conv1 = nn.Conv2d(3, stem_ch, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)

        in_ch = stem_ch
        self._stage_names: list[str] = []
        n_stages = len(depths)
        for s, (depth, p) in enumerate(zip(depths, planes)):
            blocks: list[nn.Module] = []
            for b in range(depth):
                stride = 2 if (s > 0 and b == 0) else 1
                width, out_ch = p * width_factor, p * expansion
                is_last = s == n_stages - 1 and b == depth - 1
                if is_last:
                    out_ch = self.embedding_dim
                    if block is BasicBlock:
                        width = self.embedding_dim  # reference: the whole basic block takes the new width
                blocks.append(block(in_ch, width, out_ch, stride, relu_out=self.last_nonlin if is_last else True))
                in_ch = out_ch
            name = f"layer{s + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self._stage_names.append(name)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.embedding_dim, self.num_classes, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, embedding_dim); any H, W >= 1 works thanks to global pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self._stage_names:
            x = getattr(self, name)(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """(N, 3, H, W) -> BackboneOutput(embedding (N, D), logits (N, num_classes))."""
        embedding = self.features(x)
        return BackboneOutput(embedding=embedding, logits=self.classifier(embedding))

    def trunk_parameters(self) -> Iterator[nn.Parameter]:
        """Everything but the classifier (``optimizer_params.backbone_lr_mult`` scales its lr,
        e.g. when fine-tuning from ``init_from``)."""
        head = {id(p) for p in self.classifier.parameters()}
        return (p for p in self.parameters() if id(p) not in head)


BackboneFactory = Callable[..., ResNet]
BACKBONES: Registry[BackboneFactory] = Registry("backbone architecture")

_IMAGENET_PLANES = (64, 128, 256, 512)
_SMALL_CIFAR_PLANES = (16, 32, 64)


def _register_resnet(name: str, block: Block, depths: Sequence[int], planes: Sequence[int], *,
                     imagenet_stem: bool, width_factor: int = 1) -> None:
    def factory(*, num_classes: int, embedding_dim: Optional[int] = None, last_nonlin: bool = True) -> ResNet:
        return ResNet(block, depths, planes, num_classes=num_classes, embedding_dim=embedding_dim,
                      last_nonlin=last_nonlin, imagenet_stem=imagenet_stem, width_factor=width_factor,
                      arch=name)

    factory.__name__ = name
    factory.__doc__ = f"{name}: {block.__name__} x {list(depths)}, widths {list(planes)}."
    BACKBONES.register(name)(factory)


# The reference names (ImageNet stem).
_register_resnet("ResNet18", BasicBlock, (2, 2, 2, 2), _IMAGENET_PLANES, imagenet_stem=True)
_register_resnet("ResNet50", Bottleneck, (3, 4, 6, 3), _IMAGENET_PLANES, imagenet_stem=True)
_register_resnet("ResNet101", Bottleneck, (3, 4, 23, 3), _IMAGENET_PLANES, imagenet_stem=True)
_register_resnet("WideResNet50_2", Bottleneck, (3, 4, 6, 3), _IMAGENET_PLANES, imagenet_stem=True, width_factor=2)
_register_resnet("WideResNet101_2", Bottleneck, (3, 4, 23, 3), _IMAGENET_PLANES, imagenet_stem=True, width_factor=2)
# The same stages with a CIFAR stem, for 32x32 inputs.
_register_resnet("CifarResNet18", BasicBlock, (2, 2, 2, 2), _IMAGENET_PLANES, imagenet_stem=False)
_register_resnet("CifarResNet50", Bottleneck, (3, 4, 6, 3), _IMAGENET_PLANES, imagenet_stem=False)
# The classic small CIFAR nets: depth 6n+2, three stages of n basic blocks (16/32/64 channels);
# shortcuts that change shape are 1x1 projections.
for _depth in (20, 32, 56):
    _n = (_depth - 2) // 6
    _register_resnet(f"CifarResNet{_depth}", BasicBlock, (_n, _n, _n), _SMALL_CIFAR_PLANES, imagenet_stem=False)


_FOREIGN_ONLY = ("pretrained_path", "key_map", "embedding_layer", "arch_kwargs", "image_mean", "image_std",
                 "image_size")


def _check_arch_args(arch: str, num_classes: Any, embedding_dim: Any, last_nonlin: Any) -> None:
    if not isinstance(arch, str):
        raise ConfigError(f"arch_params.arch must be a string, got {arch!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"arch_params.num_classes must be a positive integer, got {num_classes!r}")
    if embedding_dim is not None and (
        isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1
    ):
        raise ConfigError(f"arch_params.embedding_dim must be a positive integer or null, got {embedding_dim!r}")
    if not isinstance(last_nonlin, bool):
        raise ConfigError(f"arch_params.last_nonlin must be true or false, got {last_nonlin!r}")


def _registry_error(arch: str) -> ConfigError:
    try:
        BACKBONES.get(arch)
    except ConfigError as e:
        return ConfigError(f"{e}; or timm/<name> (python -c \"import timm; print(timm.list_models())\") or "
                           "torchvision/<name> (torchvision.models.list_models())")
    raise AssertionError(arch)


def build_backbone(arch: str, *, num_classes: int, embedding_dim: Optional[int] = None,
                   last_nonlin: bool = True, pretrained_path: Optional[str] = None,
                   key_map: Optional[Mapping[str, str]] = None, embedding_layer: Optional[str] = None,
                   arch_kwargs: Optional[Mapping[str, Any]] = None, image_mean: Optional[Sequence[float]] = None,
                   image_std: Optional[Sequence[float]] = None, image_size: Optional[int] = None,
                   load_weights: bool = True) -> nn.Module:
    """Build a backbone by name: a registered fct ResNet, ``timm/<name>`` or ``torchvision/<name>``
    (:mod:`fct.models.foreign`). An unknown name raises ConfigError listing the valid ones.

    ``pretrained_path`` (foreign backbones) is read only when ``load_weights``; a model file's
    builder passes False, its own state dict holds the weights. ``image_*`` override the
    pretrained preprocessing the module reports in ``.preprocessing`` (its input adapter resizes and
    renormalises to it).
    """
    _check_arch_args(arch, num_classes, embedding_dim, last_nonlin)
    if "/" not in arch:
        if arch not in BACKBONES:
            raise _registry_error(arch)
        given = [k for k, v in (("pretrained_path", pretrained_path), ("key_map", key_map),
                                ("embedding_layer", embedding_layer), ("arch_kwargs", arch_kwargs),
                                ("image_mean", image_mean), ("image_std", image_std),
                                ("image_size", image_size)) if v]
        if given:
            raise ConfigError(f"arch_params.{given[0]} is for timm/ and torchvision/ backbones, not {arch} "
                              "(an fct model file initialises a run through init_from)")
        return BACKBONES.get(arch)(num_classes=num_classes, embedding_dim=embedding_dim, last_nonlin=last_nonlin)

    from fct.models.foreign import ForeignBackbone, build_trunk, load_pretrained

    if embedding_layer is not None and (not isinstance(embedding_layer, str) or not embedding_layer):
        raise ConfigError(f"arch_params.embedding_layer must be a module name or null, got {embedding_layer!r}")
    trunk = build_trunk(arch, arch_kwargs)
    model = ForeignBackbone(arch, trunk, num_classes=num_classes, embedding_dim=embedding_dim,
                            last_nonlin=last_nonlin, embedding_layer=embedding_layer,
                            arch_kwargs=arch_kwargs or {})
    model.set_preprocessing(image_mean, image_std, image_size)
    if pretrained_path is not None and load_weights:
        from pathlib import Path

        model.pretrained = load_pretrained(model, Path(pretrained_path), key_map)
    return model


def backbone_arch_params(model: nn.Module) -> dict:
    """The ``arch_params`` that rebuild ``model`` with :func:`build_backbone` (widths resolved;
    a foreign backbone's preprocessing resolved, its weight file left out: the weights are in
    the model file)."""
    params = {
        "arch": model.arch,
        "num_classes": model.num_classes,
        "embedding_dim": model.embedding_dim,
        "last_nonlin": model.last_nonlin,
    }
    if "/" in model.arch:
        pre = model.preprocessing
        params.update(embedding_layer=model.embedding_layer, arch_kwargs=dict(model.arch_kwargs),
                      image_mean=list(pre["mean"]), image_std=list(pre["std"]), image_size=pre["image_size"])
    return params
