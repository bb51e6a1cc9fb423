"""Real DDP: 2 CPU processes (gloo) growing together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("mode", ["default", "gradmax", "ramp", "fade", "heads"])
def test_ddp_two_ranks_grow_together(tmp_path, subprocess_env, mode):
    """Both ranks grow the same way and end with identical parameters; with GradMax, whose fresh rows come from
    each rank's own batch, only because its matrix is summed over the ranks; with a LayerNorm over the widened
    units, through a ramp that both ranks advance alike; with readers fading the new units in, alike too; with heads
    counted in an attribute, which both ranks rewrite alike (2 -> 4 -> 8 heads)."""
    script = Path(__file__).with_name("ddp_run.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), mode],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["gradmax_applied"] == r1["gradmax_applied"] == (2 if mode == "gradmax" else 0)
    assert len(r0["events"]) == len(r1["events"]) == 2
    assert r0["events"][0]["changes"] == r1["events"][0]["changes"]
    assert r0["steps_after_growth"] >= 20
    assert r0["ddp_params"] and r1["ddp_params"]  # the DDP wrapper was rebuilt over the new parameters
    a, b = r0["state_dict"], r1["state_dict"]
    if mode == "ramp":  # both growths ramped in by the LayerNorm, the ramps over by the end (30 steps each)
        assert r0["inits"] == ["ramp", "ramp"] and r0["ramped_steps"] == r1["ramped_steps"] >= 30
        assert a["model.0.weight"].shape == (12, 64) and a["model.1.weight"].shape == (12,)
    elif mode == "fade":  # every growth faded in by its readers over 30 steps, over by the end
        assert r0["inits"] == ["fade", "fade"] and r0["ramped_steps"] == r1["ramped_steps"] >= 30
        assert a["model.fc1.weight"].shape == (6, 64) and a["model.fc2.weight"].shape == (6, 6)
    elif mode == "heads":
        assert a["model.qkv.weight"].shape == (96, 8) and r0["num_heads"] == r1["num_heads"] == 8
    else:
        assert a["model.fc1.weight"].shape == (6, 64) and a["model.fc2.weight"].shape == (6, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
