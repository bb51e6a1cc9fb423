"""Experiment suites end to end in --quick mode on a tiny IDX data set, and the data modules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from autogrow.experiments import suite_ablations, suite_dnc, suite_grid, suite_net2net, suite_scratch
from autogrow.experiments.data import DigitsDataModule, FashionMNISTDataModule, MNISTDataModule, read_idx, write_idx


def outputs(out, name):
    assert {p.name for p in out.iterdir()} >= {f"{name}.{ext}" for ext in ("csv", "json", "md", "png")}
    return json.loads((out / f"{name}.json").read_text())


def test_net2net_suite(tiny_idx, tmp_path):
    rows = suite_net2net.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path)])
    data = outputs(tmp_path, "net2net")
    assert len(rows) == len(data) == 5
    by = {r["model"]: r for r in rows}
    last = f"e{max(int(k[1:]) for k in by['(0) teacher'] if k.startswith('e') and k[1:].isdigit())}"
    teacher = by["(0) teacher"][last]
    # Function-preserving students start exactly where the teacher ended; the baselines do not.
    assert abs(by["(2) net2wider"]["e0"] - teacher) < 1e-4 and abs(by["(4) net2deeper"]["e0"] - teacher) < 1e-4
    assert abs(by["(1) wider random-pad"]["e0"] - teacher) > 1e-3
    assert "| (2) net2wider |" in (tmp_path / "net2net.md").read_text()


def test_grid_suite(tiny_idx, tmp_path):
    rows = suite_grid.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path)])
    outputs(tmp_path, "grid")
    assert [r["kind"] for r in rows].count("grid") == 4 and [r["kind"] for r in rows].count("net2net") == 4
    assert all(r["train_flops"] > 0 for r in rows)


def test_scratch_ablation_dnc_suites(tiny_idx, tmp_path):
    for suite, name in ((suite_scratch, "scratch"), (suite_ablations, "ablations"), (suite_dnc, "dnc")):
        out = tmp_path / name
        suite.main(["--quick", "--data-dir", tiny_idx, "--out", str(out)])
        assert outputs(out, name)
    ablations = json.loads((tmp_path / "ablations" / "ablations.json").read_text())
    assert {r["variant"] for r in ablations} == set(suite_ablations.VARIANTS)
    scratch = json.loads((tmp_path / "scratch" / "scratch.json").read_text())
    assert {r["run"] for r in scratch} == {"grown", "scratch"}


def test_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


def test_idx_data_module_finds_files_and_says_where_to_put_them(tiny_idx, tmp_path):
    dm = FashionMNISTDataModule(data_dir=tiny_idx, val_size=0.25, batch_size=16, seed=1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 784) and y.dtype == torch.long
    assert len(dm._splits["train"]) == 300 and len(dm._splits["val"]) == 100 and len(dm._splits["test"]) == 100
    again = FashionMNISTDataModule(data_dir=tiny_idx, val_size=0.25, seed=1)
    again.setup()
    assert torch.equal(again._splits["val"].tensors[1], dm._splits["val"].tensors[1])  # seeded split
    cnn = FashionMNISTDataModule(data_dir=tiny_idx, val_size=0.25, flatten=False)
    assert cnn.input_shape == (1, 28, 28)
    missing = MNISTDataModule(data_dir=str(tmp_path))
    missing.debian_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="were not found in .*Put them in data_dir.*download=True"):
        missing.setup()


def test_digits_data_module():
    dm = DigitsDataModule(batch_size=32, val_size=0.2)
    dm.setup()
    assert dm.input_shape == (64,)
    assert len(dm._splits["test"]) == 1797 // 5
    assert len(dm._splits["train"]) + len(dm._splits["val"]) == 1797 - 1797 // 5
