"""Small real datasets that install offline, for the demo, the examples, the tests and the benchmarks.

Each returns ``(x_train, y_train, x_test, y_test)``; the split depends only on ``seed``. The packages
they read (scikit-learn, mnist1d, vaderSentiment) are the ``data`` extra.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"this dataset needs the package {package!r}: pip install -e '.[data]'") from error


def digits(seed: int = 0, test_fraction: float = 0.3):
    """scikit-learn's bundled 8x8 digits: x (n, 64) float32 in [0, 1], y (n,) in 0..9; 1,797 images."""
    sk_datasets = _require("sklearn.datasets", "scikit-learn")
    split = _require("sklearn.model_selection", "scikit-learn").train_test_split
    data = sk_datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def mnist1d(num_samples: int = 4000, seed: int = 0):
    """MNIST-1D generated locally (no download): x (n, 1, 40) float32, y (n,) in 0..9."""
    data_module = _require("mnist1d.data", "mnist1d")
    args = data_module.get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    data = data_module.make_dataset(args)
    return (torch.tensor(data["x"], dtype=torch.float32)[:, None], torch.tensor(data["y"]),
            torch.tensor(data["x_test"], dtype=torch.float32)[:, None], torch.tensor(data["y_test"]))


def vader_sentiment(min_strength: float = 0.5, seed: int = 0, test_fraction: float = 0.2):
    """Words, emoticons and slang from the VADER sentiment lexicon (Hutto & Gilbert, 2014), each rated by
    ten people on -4..4, labelled 1 if the mean rating is positive, 0 if negative; entries with
    |mean| < ``min_strength`` are left out (about 6,650 remain). Returns lists of strings and LongTensors.

    Morphological variants (``foolish``, ``foolishly``) are separate entries, so the test split holds
    relatives of training words: it measures how well a model spreads sentiment across a vocabulary.
    """
    package = _require("vaderSentiment", "vaderSentiment")
    lines = (Path(package.__file__).parent / "vader_lexicon.txt").read_text(encoding="utf-8").splitlines()
    texts, labels = [], []
    for line in lines:
        fields = line.split("\t")
        if len(fields) >= 2 and abs(float(fields[1])) >= min_strength:
            texts.append(fields[0])
            labels.append(int(float(fields[1]) > 0))
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(len(order) * (1 - test_fraction))
    pick = lambda indices: ([texts[i] for i in indices], torch.tensor([labels[i] for i in indices]))  # noqa: E731
    (train_x, train_y), (test_x, test_y) = pick(order[:cut]), pick(order[cut:])
    return train_x, train_y, test_x, test_y
