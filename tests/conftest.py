import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'



@pytest.fixture
def shared_data():
    """Path to ../shared/data; the test is skipped on a fresh clone where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip('../shared/data is not present (fresh clone)')
    return SHARED_DATA


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a module of tiny-model trainer runs: fastest for them, and immune to other processes
    on a shared 2-core machine. The session's thread count is restored afterwards."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
