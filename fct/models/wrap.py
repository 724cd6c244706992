"""Turn a pretrained or deployed timm / torchvision model into an fct model file, without training.

    python -m fct.models.wrap --arch timm/resnet50 --pretrained-path w.safetensors \\
        [--key-map module.= ...] [--embedding-layer L] [--embedding-dim D] [--num-classes C] \\
        [--arch-kwarg NAME=VALUE ...] --out old.pt
    python -m fct.models.wrap --config backbone.yaml --out old.pt   # its arch_params

The file is a ``backbone`` model file like a trained one (usable as old, new or side-information
model by every script); its classifier is fct's, freshly initialised (seed 0) and untrained, so
classification-based objectives (BCT against it) make no sense until it is trained. Its meta
records the weight file (path, SHA-256), the key map and ``wrapped: true``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import yaml

from fct.errors import UserError


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise UserError(f"{flag} {item!r}: give OLD=NEW (NEW may be empty, e.g. module.=)")
        out[old] = new
    return out


def _arch_kwargs(items: Sequence[str]) -> Optional[dict[str, Any]]:
    if not items:
        return None
    # Values are YAML scalars or flow lists: 0.1, true, [8, 16, 32, 64].
    return {k: yaml.safe_load(v) for k, v in _pairs(items, "--arch-kwarg").items()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fct.models.wrap", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="backbone YAML config whose arch_params describe the model (instead of --arch)")
    p.add_argument("--arch", help="timm/<name> or torchvision/<name>")
    p.add_argument("--pretrained-path", help="local weights: .safetensors, .pt or .pth")
    p.add_argument("--key-map", action="append", default=[], metavar="OLD=NEW",
                   help="rename weight-file keys by prefix (repeatable; first match wins)")
    p.add_argument("--embedding-layer", help="module whose pooled output is the embedding")
    p.add_argument("--embedding-dim", type=int, help="embedding width (a linear projection when it differs)")
    p.add_argument("--num-classes", type=int, default=1, help="classifier rows (untrained; default 1)")
    p.add_argument("--arch-kwarg", action="append", default=[], metavar="NAME=VALUE",
                   help="builder keyword argument, a YAML value (repeatable)")
    p.add_argument("--out", required=True, help="the fct model file to write")
    return p


def arch_params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``arch_params`` (dict) the command line or ``--config`` describes, checked as a config."""
    from fct.config import ArchParams, from_dict, load_yaml, to_dict

    if args.config:
        given = [f for f in ("arch", "pretrained_path", "embedding_layer", "embedding_dim")
                 if getattr(args, f) is not None] + (["key_map"] if args.key_map else [])
        if given:
            raise UserError(f"--config gives arch_params; drop --{given[0].replace('_', '-')}")
        data = load_yaml(args.config)
        if "arch_params" not in data:
            raise UserError(f"{args.config} has no arch_params")
        return to_dict(from_dict(ArchParams, data["arch_params"], source=args.config, prefix="arch_params"))
    if not args.arch:
        raise UserError("give --arch (timm/<name> or torchvision/<name>) or --config")
    raw = {"arch": args.arch, "num_classes": args.num_classes, "embedding_dim": args.embedding_dim,
           "pretrained_path": args.pretrained_path, "key_map": _pairs(args.key_map, "--key-map") or None,
           "embedding_layer": args.embedding_layer, "arch_kwargs": _arch_kwargs(args.arch_kwarg)}
    return to_dict(from_dict(ArchParams, {k: v for k, v in raw.items() if v is not None}, source="command line",
                             prefix="arch_params"))


def wrap(arch_params: dict[str, Any], out: str) -> dict[str, Any]:
    """Build the backbone (loading its weights), write it to ``out``; returns the meta written."""
    import torch

    import fct
    from fct.models.backbones import backbone_arch_params, build_backbone
    from fct.models.model_file import save_model_file

    if "/" not in arch_params["arch"]:
        raise UserError(f"wrap is for timm/<name> and torchvision/<name> backbones, not {arch_params['arch']}; "
                        "fct's own backbones are written by train_backbone.py")
    torch.manual_seed(0)  # the (untrained) classifier and projection
    model = build_backbone(**arch_params).eval()
    if arch_params.get("pretrained_path") is None:  # warned once the arch itself is known to be valid
        print("warning: no --pretrained-path: the model keeps its random weights", file=sys.stderr)
    meta = {"wrapped": True, "code_version": fct.__version__, "preprocessing": dict(model.preprocessing)}
    if model.pretrained is not None:
        meta["pretrained"] = model.pretrained
    save_model_file(out, model, kind="backbone", arch_params=backbone_arch_params(model), meta=meta)
    return meta


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    meta = wrap(arch_params_from_args(args), args.out)
    pre = meta["preprocessing"]
    print(f"model written to {args.out} (expects images normalised with mean {pre['mean']}, std {pre['std']}, "
          f"trained at {pre['image_size']}px)")


if __name__ == "__main__":
    from fct.cli import run_main

    sys.exit(run_main(main))
