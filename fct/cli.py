"""Shared command-line plumbing for the thin entry scripts."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from fct.errors import RunError, UserError


def config_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer_params.lr=0.1 (repeatable)",
    )
    return p


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a UserError prints one line and returns 2, a RunError returns 1."""
    from fct import dist

    try:
        main(argv)
    except (UserError, RunError) as e:
        if not _reported_elsewhere(e):
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()
    return 0


def _reported_elsewhere(e: Exception) -> bool:
    """Under torchrun, an error every rank meets alike (a config mistake, or rank 0's verdict on
    the run folder) is printed by rank 0 alone, so the user reads it once."""
    from fct import dist
    from fct.errors import ConfigError

    if getattr(e, "reported_by_main", False):
        return True
    return isinstance(e, ConfigError) and dist.planned_rank() != 0
