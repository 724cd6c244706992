#!/usr/bin/env python
"""Evaluate retrieval: ``python eval.py --config CONFIG [--set KEY=VALUE ...]``.

Under ``torchrun`` feature extraction is shared by all processes; rank 0 computes the metrics.
"""

import sys

from fct.cli import config_parser, run_main


def main(argv=None) -> None:
    args = config_parser(__doc__.splitlines()[0]).parse_args(argv)
    from fct.config import EvalConfig, load_config
    from fct.evaluate import evaluate

    evaluate(load_config(EvalConfig, args.config, args.overrides), config_path=args.config)


if __name__ == "__main__":
    sys.exit(run_main(main))
