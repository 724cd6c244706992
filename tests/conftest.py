import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, ContextManager, Iterator

# Threads, set before torch is first imported. A pytest-xdist worker gets its share of the cores:
# two workers of two threads each on 2 cores made the whole suite about 15% slower (1,290 s of
# test time against 1,132 s, in back-to-back runs here). A serial run keeps 2 unless told
# otherwise. The scripts the tests start get 1 thread anyway (helpers.run_script).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # a worker (it inherits the controller's setting below)
    share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, share))
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

from helpers import REPO  # noqa: E402

sys.path.insert(0, str(REPO))
from fct.experiments.recipe import TINY_IMAGENET as SHARED_DATA  # noqa: E402 (needs the path above)


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
