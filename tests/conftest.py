import pytest

from benchmarks import datasets


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits: (x_train, y_train, x_test, y_test), pixels scaled to [0, 1]."""
    return datasets.digits(seed=0)
