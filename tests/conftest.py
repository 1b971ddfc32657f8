import os

import pytest
import torch

# the suite runs in one pytest-xdist process per core (pyproject's addopts): each takes its share of the cores,
# so that two workers do not both run two-thread kernels on two cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
