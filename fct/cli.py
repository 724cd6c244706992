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
    """Run ``main``; a UserError (or an OSError naming a file) prints one line and returns 2, a
    RunError (or a collective that failed because another rank or node is gone,
    ``fct.dist.peer_failure``) returns 1, Ctrl-C returns 130."""
    from fct import dist

    try:
        main(argv)
    except (UserError, RunError) as e:
        if not _reported_elsewhere(e):
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.filename is None:
            raise  # not about a file the user named: a bug to see in full
        # The last resort for a file system refusal no check foresaw (a folder made read-only
        # mid-run, a full disk): one line naming the file instead of a traceback.
        print(f"error: {e.filename}: {e.strerror or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only a collective failed by a lost peer is turned into a line
        lost = dist.peer_failure(e)
        if lost is None:
            raise
        # Printed by every surviving rank: each may be the only one whose log the user reads.
        print(f"error: {lost}", file=sys.stderr, flush=True)
        return lost.exit_code
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
