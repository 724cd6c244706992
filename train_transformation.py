#!/usr/bin/env python
"""Train a compatibility transformation h (FCT / FastFill): ``python train_transformation.py --config CONFIG``.

Multi-GPU: ``torchrun --nproc_per_node 8 train_transformation.py --config CONFIG``.
Running the same command again resumes from the run folder's checkpoint.
"""

import sys

from fct.cli import config_parser, run_main


def main(argv=None) -> None:
    args = config_parser(__doc__.splitlines()[0]).parse_args(argv)
    from fct.config import load_config
    from fct.config.transformation import TransformationConfig
    from fct.training.transformation import train_transformation

    train_transformation(load_config(TransformationConfig, args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(run_main(main))
