#!/usr/bin/env python
"""Compatibility matrix of a chain of embedding versions: ``python compat.py --config CHAIN.yaml``.

Builds the embedding registry of the chain (refusing unbacked compatibility claims), evaluates every
(query version, gallery version) pair through the chain's maps, and writes matrix.json, matrix.md,
heat maps and 2-D projections to the config's output_dir.
"""

import sys

from fct.cli import config_parser, run_main


def main(argv=None) -> None:
    args = config_parser(__doc__.splitlines()[0]).parse_args(argv)
    from fct.compat.chain import evaluate_chain
    from fct.config import load_config
    from fct.config.chain import ChainConfig

    evaluate_chain(load_config(ChainConfig, args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(run_main(main))
