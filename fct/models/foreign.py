"""Foreign backbones: timm and torchvision networks behind fct's backbone interface.

``arch: timm/<name>`` builds ``timm.create_model(name, pretrained=False, num_classes=0, **arch_kwargs)``;
``arch: torchvision/<name>`` builds ``torchvision.models.get_model(name, weights=None, **arch_kwargs)``
(classification models only). Nothing is ever downloaded: pretrained weights come from a local
state-dict file (``pretrained_path``, ``.safetensors`` / ``.pt`` / ``.pth``) whose keys may be renamed
by prefix (``key_map``), or paired with the network's by position (``key_map: {"@positional": ""}``).

The module (:class:`ForeignBackbone`) is::

    x -> [input adapter] -> trunk -> features (N, F) -> [projection: Linear F -> D, bias-free, then ReLU if last_nonlin]
      -> embedding (N, D) -> classifier (Linear D -> num_classes, bias-free, fct's own)

``features`` is by default the input of the network's own classifier (timm's pooled pre-logits;
torchvision's input of the last ``Linear`` of ``fc`` / ``classifier`` / ``heads`` / ``head``), which
is removed; the weights of that classifier in a pretrained file are dropped. ``embedding_layer``
names another module instead: its output is globally average-pooled ((N, C, H, W) over H, W;
(N, L, C) tokens over L), the forward stops there, and the modules after it are frozen (they never
run, so they get no gradient and DDP needs no unused-parameter search). The truncated network is an
FX graph of the trunk that ends at that module (timm's or torchvision's feature extractor, sharing
the trunk's modules), so it compiles and exports like any module; a network FX cannot trace falls
back to stopping the eager forward from a hook there (not exportable).

The input adapter makes any image batch of the data pipeline what the pretrained weights expect:
batches of another height or width are resized (bilinear, antialiased when shrinking) to
``preprocessing["image_size"]``, and batches normalised with a data set's mean/std (declared with
:func:`expect_inputs`, which every script calls with its data set's statistics) are renormalised
to the model's own ``preprocessing`` mean/std. Undeclared, inputs are taken to be normalised the
model's way already (what exported models and foreign runtimes feed it). The data set's statistics
are not saved: the model file stays independent of the data it is used on.

Model files record only the builder name and its plain arguments (``arch_params``); building one
imports timm or torchvision only when the file names it, and an unknown family or model name is
refused before anything is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fct.errors import ConfigError, UserError
from fct.models.backbone_output import BackboneOutput
from fct.models.state_dicts import first_names, state_dict_mismatch
from fct.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Builder arguments that would download, read files or change what fct controls.
_REFUSED_KWARGS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path",
    "cache_dir", "num_classes", "features_only", "weights", "weights_backbone", "progress",
})
# Keys of a checkpoint dict that hold the state dict (a training checkpoint rather than weights).
_NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict", "module")


class Trunk:
    """A built foreign network with its classifier removed."""

    def __init__(self, module: nn.Module, feature_dim: int, head_prefixes: tuple[str, ...],
                 mean: tuple[float, ...], std: tuple[float, ...], image_size: int) -> None:
        self.module = module
        self.feature_dim = feature_dim  # width of the classifier's input
        self.head_prefixes = head_prefixes  # state-dict prefixes of the removed classifier
        self.mean, self.std, self.image_size = mean, std, image_size  # the pretrained preprocessing


TrunkFactory = Callable[[str, dict], Trunk]
BACKBONE_FAMILIES: Registry[TrunkFactory] = Registry("backbone family")


def _check_kwargs(arch: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    refused = sorted(set(kwargs) & _REFUSED_KWARGS)
    if refused:
        raise ConfigError(f"arch_params.arch_kwargs may not set {', '.join(refused)} for {arch} "
                          "(fct sets it; weights come from pretrained_path)")
    # YAML lists arrive as lists or tuples; builders expect tuples for shapes (e.g. timm's channels).
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _call_builder(arch: str, fn: Callable[..., nn.Module], kwargs: dict) -> nn.Module:
    try:
        return fn(**kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())[:200]
        raise ConfigError(f"{arch} cannot be built with arch_kwargs {kwargs}: {type(e).__name__}: {detail}") from None


@BACKBONE_FAMILIES.register("timm")
def _timm_trunk(name: str, kwargs: dict) -> Trunk:
    import timm  # only when a config or model file names timm

    arch = f"timm/{name}"
    # is_model refuses hub names ('hf-hub:...'), so create_model can never reach the network.
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r} (arch {arch}); list them with "
                          "python -c \"import timm; print(timm.list_models('*resnet*'))\"")
    kwargs = _check_kwargs(arch, kwargs)
    model = _call_builder(arch, lambda **kw: timm.create_model(name, pretrained=False, num_classes=0, **kw), kwargs)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    head = cfg.get("classifier") or ()
    head_prefixes = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))
    # With num_classes=0, timm's forward returns the pre-logits: head_hidden_size when a model has
    # layers after the pooling (e.g. MobileNetV3's conv_head), else num_features.
    width = getattr(model, "head_hidden_size", None) or model.num_features
    size = cfg.get("input_size") or (3, 224, 224)
    return Trunk(model, int(width), head_prefixes, tuple(cfg.get("mean") or IMAGENET_MEAN),
                 tuple(cfg.get("std") or IMAGENET_STD), int(size[-1]))


def _last_linear(module: nn.Module) -> Optional[tuple[str, nn.Linear]]:
    """(dotted name relative to ``module``, layer) of the last nn.Linear in ``module`` (itself included)."""
    found = None
    for n, m in module.named_modules():
        if isinstance(m, nn.Linear):
            found = (n, m)
    return found


@BACKBONE_FAMILIES.register("torchvision")
def _torchvision_trunk(name: str, kwargs: dict) -> Trunk:
    import torchvision  # only when a config or model file names torchvision

    arch = f"torchvision/{name}"
    valid = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in valid:
        raise ConfigError(f"unknown torchvision model {name!r} (arch {arch}); valid: {', '.join(valid)}")
    kwargs = _check_kwargs(arch, kwargs)
    builder = torchvision.models.get_model_builder(name)
    model = _call_builder(arch, lambda **kw: builder(weights=None, **kw), kwargs)
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        found = _last_linear(head) if isinstance(head, nn.Module) else None
        if found is not None:
            break
    else:
        raise ConfigError(f"{arch}: no classifier (fc, classifier, heads or head ending in a Linear) to remove")
    rel, linear = found
    full = attr if not rel else f"{attr}.{rel}"
    _set(model, full)
    return Trunk(model, int(linear.in_features), (f"{full}.",), IMAGENET_MEAN, IMAGENET_STD, 224)


def _set(root: nn.Module, dotted: str) -> None:
    """Replace the submodule at ``dotted`` by an Identity."""
    parent_name, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, nn.Identity())


def build_trunk(arch: str, arch_kwargs: Optional[Mapping[str, Any]]) -> Trunk:
    """Build ``family/name`` (e.g. timm/resnet18); an unknown family or name raises ConfigError."""
    family, _, name = arch.partition("/")
    factory = BACKBONE_FAMILIES.get(family)
    if not name:
        raise ConfigError(f"arch {arch!r} names no model after '{family}/'")
    return factory(name, dict(arch_kwargs or {}))


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


def _truncated(arch: str, trunk: nn.Module, layer: str) -> Optional[nn.Module]:
    """An FX graph of ``trunk`` returning ``{"embedding": output of layer}`` (the output of the
    module's last operation), built by timm's feature extractor (which knows timm's untraceable
    modules) or torchvision's; None when the network cannot be traced."""
    try:
        if arch.startswith("timm/"):
            from timm.models import create_feature_extractor
        else:
            from torchvision.models.feature_extraction import create_feature_extractor
        # traced in train and in eval mode (code that reads self.training differs): the graph
        # follows the extractor's mode, which ForeignBackbone.train() sets
        extractor = create_feature_extractor(trunk, return_nodes={layer: "embedding"})
        return extractor.train(trunk.training)
    except Exception:  # noqa: BLE001 - FX fails in many ways on dynamic code; the hook path remains
        return None


class _StopForward(Exception):
    """Raised by the embedding-layer hook: the rest of the network is not needed."""


def _pool(out: Any, layer: str) -> torch.Tensor:
    """A layer's output -> (N, C): spatial mean of (N, C, H, W), token mean of (N, L, C)."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise UserError(f"embedding_layer {layer!r} returns a {type(out).__name__}, not a tensor")
    if out.dim() == 4:
        return out.mean(dim=(2, 3))
    if out.dim() == 3:
        return out.mean(dim=1)
    if out.dim() == 2:
        return out
    raise UserError(f"embedding_layer {layer!r} returns shape {tuple(out.shape)}; expected 2, 3 or 4 dims")


class ForeignBackbone(nn.Module):
    """A timm / torchvision trunk + optional projection + fct's bias-free classifier.

    forward: (N, 3, H, W) -> BackboneOutput(embedding (N, embedding_dim), logits (N, num_classes)).
    """

    def __init__(self, arch: str, trunk: Trunk, *, num_classes: int, embedding_dim: Optional[int],
                 last_nonlin: bool, embedding_layer: Optional[str], arch_kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs)
        self.trunk = trunk.module
        self.head_prefixes = trunk.head_prefixes
        self.preprocessing = {"mean": list(trunk.mean), "std": list(trunk.std), "image_size": trunk.image_size}
        # inputs' normalisation (None: the model's own); in_scale/in_shift map it to the model's
        self.input_stats: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None
        self.register_buffer("in_scale", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", torch.zeros(1, 3, 1, 1), persistent=False)
        self._renormalise = False
        self.num_classes = int(num_classes)
        self.last_nonlin = bool(last_nonlin)
        self.embedding_layer = embedding_layer
        self._captured: Optional[torch.Tensor] = None
        # The trunk truncated at embedding_layer (an FX graph over the trunk's own modules); kept out
        # of the module tree so that the state dict, DDP and optimisers see each parameter once.
        self._extractor: Optional[nn.Module] = None
        self.pretrained: Optional[dict[str, Any]] = None  # what load_pretrained read, for the model file's meta
        self.feature_dim = trunk.feature_dim
        if embedding_layer is not None:
            self.feature_dim = self._attach_layer(embedding_layer, trunk.image_size)
        self.embedding_dim = self.feature_dim if embedding_dim is None else int(embedding_dim)
        self.projection: Optional[nn.Linear] = None
        if self.embedding_dim != self.feature_dim:
            self.projection = nn.Linear(self.feature_dim, self.embedding_dim, bias=False)
        self.classifier = nn.Linear(self.embedding_dim, self.num_classes, bias=False)

    def set_preprocessing(self, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                          image_size: Optional[int] = None) -> None:
        """Override the pretrained preprocessing (what the weights expect); None keeps a value."""
        for key, value in (("mean", mean), ("std", std)):
            if value is not None:
                if len(value) != 3 or (key == "std" and min(value) <= 0):
                    raise ConfigError(f"arch_params.image_{key} must be 3 numbers{' > 0' if key == 'std' else ''}, "
                                      f"got {list(value)}")
                self.preprocessing[key] = [float(v) for v in value]
        if image_size is not None:
            self.preprocessing["image_size"] = int(image_size)
        self.expect_inputs(*(self.input_stats or (None, None)))

    def expect_inputs(self, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> None:
        """Declare how the images fed to ``forward`` are normalised, ``(x - mean) / std`` per channel
        (a data set's statistics); None, None: the model's own ``preprocessing`` (no conversion)."""
        own_mean = torch.tensor(self.preprocessing["mean"], dtype=torch.float64)
        own_std = torch.tensor(self.preprocessing["std"], dtype=torch.float64)
        if mean is None or std is None:
            self.input_stats = None
            in_mean, in_std = own_mean, own_std
        else:
            self.input_stats = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
            in_mean = torch.tensor(self.input_stats[0], dtype=torch.float64)
            in_std = torch.tensor(self.input_stats[1], dtype=torch.float64)
        # raw = x * in_std + in_mean; model input = (raw - own_mean) / own_std = x * scale + shift
        scale, shift = in_std / own_std, (in_mean - own_mean) / own_std
        self._renormalise = bool((scale - 1).abs().max() > 1e-7 or shift.abs().max() > 1e-7)
        self.in_scale.copy_(scale.view(1, 3, 1, 1).to(self.in_scale))
        self.in_shift.copy_(shift.view(1, 3, 1, 1).to(self.in_shift))

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to the model's image size, renormalise to its mean/std (see the module doc)."""
        size = int(self.preprocessing["image_size"])
        if x.shape[-2:] != (size, size):
            shrink = x.shape[-2] > size or x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        if self._renormalise:
            x = torch.addcmul(self.in_shift.to(x.dtype), x, self.in_scale.to(x.dtype))
        return x

    def _attach_layer(self, layer: str, image_size: int) -> int:
        """Truncate the trunk at ``layer``, freeze what runs after it, return its pooled width
        (one probe forward)."""
        try:
            target = self.trunk.get_submodule(layer)
        except AttributeError:
            top = [n for n, _ in self.trunk.named_children()]
            raise ConfigError(f"arch_params.embedding_layer {layer!r} is not a module of {self.arch}; its top-level "
                              f"modules: {', '.join(top)} (dotted names reach deeper ones)") from None
        object.__setattr__(self, "_extractor", _truncated(self.arch, self.trunk, layer))
        ran: set[int] = set()
        probes = [m.register_forward_pre_hook(lambda m, _i: ran.add(id(m))) for m in self.trunk.modules()]
        if self._extractor is None:
            target.register_forward_hook(self._capture)
        was_training = self.trunk.training
        self.trunk.eval()
        try:
            with torch.no_grad():
                width = self._trunk_features(torch.zeros(1, 3, image_size, image_size)).shape[1]
        finally:
            for h in probes:
                h.remove()
            self.trunk.train(was_training)
        for m in self.trunk.modules():
            if id(m) not in ran:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
        return int(width)

    def _capture(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self._captured = output
        raise _StopForward

    def train(self, mode: bool = True) -> "ForeignBackbone":
        super().train(mode)
        if self._extractor is not None:
            self._extractor.train(mode)
        return self

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Device / dtype moves also reach the extractor's own constants (its modules are the trunk's)."""
        super()._apply(fn, recurse)
        if self._extractor is not None:
            self._extractor._apply(fn, recurse)
        return self

    def _trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding_layer is None:
            return self.trunk(x)
        if self._extractor is not None:
            return _pool(self._extractor(x)["embedding"], self.embedding_layer)
        try:
            self.trunk(x)
        except _StopForward:
            pass
        out, self._captured = self._captured, None
        if out is None:
            raise UserError(f"embedding_layer {self.embedding_layer!r} did not run in {self.arch}'s forward")
        return _pool(out, self.embedding_layer)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, embedding_dim)."""
        f = self._trunk_features(self.adapt_input(x))
        if self.projection is not None:
            f = self.projection(f)
            if self.last_nonlin:
                f = torch.relu(f)
        return f

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """(N, 3, H, W) -> BackboneOutput(embedding (N, D), logits (N, num_classes))."""
        embedding = self.features(x)
        return BackboneOutput(embedding=embedding, logits=self.classifier(embedding))

    def trunk_parameters(self) -> Iterator[nn.Parameter]:
        """The pretrained part (``optimizer_params.backbone_lr_mult`` scales its learning rate)."""
        return self.trunk.parameters()


def expect_inputs(model: nn.Module, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> int:
    """Declare the normalisation of the images fed to ``model`` (a data set's mean/std) to every
    foreign backbone inside it (a transformed old model holds up to two); returns how many."""
    found = [m for m in model.modules() if isinstance(m, ForeignBackbone)]
    for m in found:
        m.expect_inputs(mean, std)
    return len(found)


# --------------------------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A local state dict: ``.safetensors`` (safetensors), ``.pt``/``.pth``/``.bin`` (weights_only).

    A checkpoint dict that holds it under 'state_dict' / 'model' / 'model_state_dict' / 'module' is
    unwrapped. UserError on anything else."""
    if not path.is_file():
        raise UserError(f"pretrained_path {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        elif suffix in (".pt", ".pth", ".bin"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"pretrained_path {path}: unknown extension {suffix!r}; give .safetensors, .pt or .pth")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt or unsafe files fail in many ways
        detail = " ".join(str(e).split())[:160]
        raise UserError(f"pretrained_path {path} cannot be read as a state dict "
                        f"({type(e).__name__}: {detail})") from None
    if isinstance(data, Mapping) and not all(isinstance(v, torch.Tensor) for v in data.values()):
        for key in _NESTED_STATE_KEYS:
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not (isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) for v in data.values())):
        raise UserError(f"pretrained_path {path} is not a state dict (a mapping of names to tensors)")
    return dict(data)


def apply_key_map(state: Mapping[str, torch.Tensor], key_map: Mapping[str, str],
                  path: Path) -> dict[str, torch.Tensor]:
    """Rename keys by prefix: the first rule (in the map's order) whose OLD prefix a key starts
    with replaces that prefix by NEW. A rule that matches no key, or two keys renamed to one, is a
    UserError (a typo would otherwise load nothing silently)."""
    used = {old: 0 for old in key_map}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = key
        for old, new in key_map.items():
            if key.startswith(old):
                new_key, used[old] = new + key[len(old):], used[old] + 1
                break
        if new_key in out:
            raise UserError(f"pretrained_path {path}: key_map renames two keys to {new_key!r}")
        out[new_key] = value
    unused = [old for old, n in used.items() if n == 0]
    if unused:
        raise UserError(f"pretrained_path {path}: key_map prefix {unused[0]!r} matches no key "
                        f"(keys look like {next(iter(state))!r})")
    return out


POSITIONAL = "@positional"  # the key_map entry that pairs the file's keys with the network's by order


def is_positional(key_map: Optional[Mapping[str, str]]) -> bool:
    """Whether ``key_map`` asks for the by-position pairing (UserError if mixed with prefix rules)."""
    if not key_map or POSITIONAL not in key_map:
        return False
    if len(key_map) != 1 or key_map[POSITIONAL] != "":
        raise UserError(f"key_map {dict(key_map)!r}: {POSITIONAL!r} must be the only entry, "
                        f"with an empty value ({{{POSITIONAL!r}: ''}})")
    return True


def apply_positional(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                     path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pair the file's keys with the network's (``expected``, its state dict) in order: the i-th
    tensor of the file gets the i-th name of the network, and every pair must have the same shape.

    For a file saved by a network with the same layers in the same order (only the names differ,
    e.g. flat ``_blocks.N`` against staged ``blocks.S.I``). The file may end with a removed
    classifier that the network no longer has: at most a Linear's weight (2-D) and bias (1-D of its
    rows), returned as the dropped keys. UserError on the first shape mismatch (naming both keys and
    shapes), on a file with fewer tensors than the network, and on any other trailing tensors."""
    keys, names = list(state), list(expected)
    for i, (key, name) in enumerate(zip(keys, names)):
        if state[key].shape != expected[name].shape:
            raise UserError(f"pretrained_path {path}: key_map {POSITIONAL}: tensor {i} of the file, {key} "
                            f"{tuple(state[key].shape)}, does not fit tensor {i} of the network, {name} "
                            f"{tuple(expected[name].shape)} (the layers differ or are in another order)")
    if len(keys) < len(names):
        raise UserError(f"pretrained_path {path}: key_map {POSITIONAL}: the file has {len(keys)} tensors, "
                        f"the network {len(names)}; nothing in the file for {first_names(names[len(keys):])}")
    rest = keys[len(names):]
    shapes = [tuple(state[k].shape) for k in rest]
    linear = (len(rest) <= 2 and (not rest or len(shapes[0]) == 2)
              and (len(rest) < 2 or shapes[1] == shapes[0][:1]))
    if not linear:
        raise UserError(f"pretrained_path {path}: key_map {POSITIONAL}: the file has {len(rest)} tensors more "
                        f"than the network ({first_names(rest)}); only a removed classifier (a Linear's weight "
                        f"and bias) may be left over")
    return {name: state[key] for key, name in zip(keys, names)}, rest


def load_pretrained(model: ForeignBackbone, path: Path, key_map: Optional[Mapping[str, str]]) -> dict[str, Any]:
    """Load a local state dict into ``model.trunk`` (strict except the removed classifier's keys).

    ``key_map`` renames the file's keys by prefix (:func:`apply_key_map`), or, as
    ``{"@positional": ""}``, pairs them with the trunk's by order (:func:`apply_positional`).

    Returns a record for the model file's meta: path, SHA-256, dropped classifier keys.
    UserError naming the first missing / unexpected keys and shape mismatches otherwise."""
    from fct.io import file_sha256

    state = read_state_dict(path)
    expected = model.trunk.state_dict()
    if is_positional(key_map):
        state, dropped = apply_positional(state, expected, path)
    else:
        if key_map:
            state = apply_key_map(state, key_map, path)
        dropped = [k for k in state if k.startswith(model.head_prefixes)]
        state = {k: v for k, v in state.items() if k not in dropped}
    mismatch = state_dict_mismatch(expected, state)
    if mismatch:
        hint = ""
        unexpected = [k for k in state if k not in expected]
        prefixes = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
        if unexpected and len(prefixes) == 1 and len(unexpected) == len(state):
            hint = f"; every key starts with {next(iter(prefixes))!r}: try key_map {{{next(iter(prefixes))!r}: ''}}"
        raise UserError(f"pretrained_path {path} does not fit {model.arch}: {mismatch}{hint}")
    model.trunk.load_state_dict(state, strict=True)
    return {"path": str(path), "sha256": file_sha256(path), "key_map": dict(key_map or {}),
            "dropped_classifier_keys": len(dropped)}
