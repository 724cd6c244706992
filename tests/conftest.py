import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data" / "tinyimagenet100-32"

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
