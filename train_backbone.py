#!/usr/bin/env python
"""Train an embedding backbone: ``python train_backbone.py --config CONFIG [--set KEY=VALUE ...]``.

Multi-GPU: ``torchrun --nproc_per_node 8 train_backbone.py --config CONFIG``.
Running the same command again resumes from the run folder's checkpoint.
"""

import sys

from fct.cli import config_parser, run_main


def main(argv=None) -> None:
    args = config_parser(__doc__.splitlines()[0]).parse_args(argv)
    from fct.config import BackboneConfig, load_config
    from fct.training.backbone import train_backbone

    train_backbone(load_config(BackboneConfig, args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(run_main(main))
