#!/usr/bin/env python
"""Sweep backward-compatible weight interpolation (BCWI): ``python interpolate.py --config CONFIG``.

Builds alpha * old + (1 - alpha) * new for each method and alpha, measures accuracy, negative flips
and retrieval, and writes a table, results.json and an accuracy-vs-NFR plot to the run folder.
Running the same command again resumes: finished (method, alpha) points are skipped.
"""

import sys

from fct.cli import config_parser, run_main


def main(argv=None) -> None:
    args = config_parser(__doc__.splitlines()[0]).parse_args(argv)
    from fct.config import load_config
    from fct.config.interpolation import InterpolationConfig
    from fct.regression.sweep import run_sweep

    run_sweep(load_config(InterpolationConfig, args.config, args.overrides), config_path=args.config)


if __name__ == "__main__":
    sys.exit(run_main(main))
