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
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()
    return 0
