"""Shared fixtures: a tiny Fashion-MNIST-shaped IDX data set written to disk (tests never download)."""

from __future__ import annotations

import numpy as np
import pytest
from autogrow.experiments.data import write_idx


@pytest.fixture(scope="session")
def tiny_idx(tmp_path_factory) -> str:
    """400 train / 100 test 28x28 images whose class shows as a bright band: learnable, fast."""
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 400), ("t10k", 100)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 * y: 2 * y + 3] += 180
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(d)
