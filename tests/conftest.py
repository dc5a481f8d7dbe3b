import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def shared_data():
    """Path to ../shared/data; the test is skipped on a fresh clone where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip('../shared/data is not present (fresh clone)')
    return SHARED_DATA
