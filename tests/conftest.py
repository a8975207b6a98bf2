import os

import pytest
import torch

from benchmarks import datasets

# Triton's kernels run in its interpreter, on the CPU, where there is no GPU to compile them for; set before
# cmd_optim.core.kernels.gpu is first imported (it is imported lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread unless CMD_TEST_THREADS says otherwise: the results do not depend on it (the suite
# passes with 2), and on a shared 2-core machine two OpenMP threads per process made it 6-9x slower.
torch.set_num_threads(int(os.environ.get("CMD_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits: (x_train, y_train, x_test, y_test), pixels scaled to [0, 1]."""
    return datasets.digits(seed=0)
