import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO))
from fct.experiments.recipe import TINY_IMAGENET as SHARED_DATA  # noqa: E402 (needs the path above)

# Keep the suite deterministic and light on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "train.npz").exists():
        pytest.skip(f"shared data set not found at {SHARED_DATA}")
    return SHARED_DATA


@contextlib.contextmanager
def _killed_after_first_epoch() -> Iterator[None]:
    """Inside the block a training run (backbone or transformation) raises KeyboardInterrupt right
    after epoch 0's checkpoint and log line: a process killed between epochs."""
    from fct.training.runlog import RunLog

    original = RunLog.log_epoch

    def crash(self, record):
        original(self, record)
        raise KeyboardInterrupt

    RunLog.log_epoch = crash
    try:
        yield
    finally:
        RunLog.log_epoch = original


@pytest.fixture
def killed_after_first_epoch() -> Callable[[], ContextManager[None]]:
    return _killed_after_first_epoch
