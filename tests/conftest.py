"""Shared fixtures: a tiny Fashion-MNIST-shaped IDX data set written to disk (tests never download), float64 for
exactness checks, and an environment for subprocesses.

torchvision's only build for torch 2.13 here is a CUDA build whose import fails on the CPU torch
("operator torchvision::nms does not exist"); timm, transformers, torchmetrics and Lightning import it when
installed. The model definitions never need its compiled ops, so the tests import it without them, in this
process (below) and in the subprocesses they start (``subprocess_env``: a ``sitecustomize`` doing the same).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.torchvision_without_ops import SOURCE, import_torchvision_without_ops

import_torchvision_without_ops()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from autogrow.experiments.data import write_idx  # noqa: E402


@pytest.fixture
def float64():
    """Models and data in float64 for the test (exactness checks to 1e-9); the default dtype is restored after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def rmsnorm_registered():
    """tests.models' hand-written RMSNorm registered as what it computes (as a Llama user would), then forgotten."""
    import torch.nn as nn

    from autogrow import register_channelwise
    from autogrow.registry import _CHANNELWISE, channel_spec
    from tests.models import RMSNorm

    register_channelwise(RMSNorm, channel_spec(nn.RMSNorm(1)))
    yield
    _CHANNELWISE.pop(RMSNorm)


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory) -> dict[str, str]:
    """``os.environ`` plus a PYTHONPATH holding the repository and a sitecustomize that imports torchvision
    without its ops (for subprocesses: the console script, DDP ranks)."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SOURCE + "\nimport_torchvision_without_ops()\n")
    paths = [str(site), str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


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
