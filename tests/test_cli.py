"""The README's main job through the real console-script entry point (shortened)."""

from __future__ import annotations

from pathlib import Path

import pytest
from autogrow.callbacks import AutoGrow
from autogrow.experiments.cli import cli, main
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CONFIG = Path(__file__).parent.parent / "experiments" / "configs" / "quickstart.yaml"


def test_quickstart_config_runs_and_grows(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the repository
    run = cli(["fit", "--config", str(CONFIG), "--trainer.max_epochs", "10",
               "--trainer.logger.init_args.save_dir", str(tmp_path)])
    grow = next(cb for cb in run.trainer.callbacks if isinstance(cb, AutoGrow))
    out = capsys.readouterr().out
    assert len(grow.events) == 3 and "== autogrow summary ==" in out and "test accuracy" in out
    assert f"parameters: 610 -> {sum(p.numel() for p in run.model.parameters()):,}" in out
    assert "the same network trained at its final size from the start (4,810 parameters" in out
    acc = EventAccumulator(run.trainer.logger.log_dir)
    acc.Reload()
    assert "autogrow/params" in acc.Tags()["scalars"]


def test_print_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert "class_path: autogrow.callbacks.AutoGrow" in capsys.readouterr().out


def test_console_script_exits_zero(tmp_path, subprocess_env):
    """The installed ``autogrow`` command: exit status 0 and nothing printed after the summary."""
    import subprocess
    import sys

    script = Path(sys.executable).with_name("autogrow")
    proc = subprocess.run([str(script), "fit", "--config", str(CONFIG), "--trainer.max_epochs", "6", "--compare_fixed",
                           "false",
                           "--trainer.logger.init_args.save_dir", str(tmp_path)], cwd=tmp_path, env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== autogrow summary ==" in proc.stdout and "AutogrowCLI object" not in proc.stdout + proc.stderr
