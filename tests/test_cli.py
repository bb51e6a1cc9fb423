"""The README's main job through the real console-script entry point (shortened)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import AutoGrow
from experiments.cli import main

CONFIG = Path(__file__).parent.parent / "experiments" / "configs" / "quickstart.yaml"


def test_quickstart_config_runs_and_grows(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the repository
    cli = main(["fit", "--config", str(CONFIG), "--trainer.max_epochs", "20",
                "--trainer.logger.init_args.save_dir", str(tmp_path)])
    grow = next(cb for cb in cli.trainer.callbacks if isinstance(cb, AutoGrow))
    out = capsys.readouterr().out
    assert len(grow.events) >= 1 and "== autogrow summary ==" in out and "test accuracy" in out
    assert f"parameters: 160 -> {sum(p.numel() for p in cli.model.parameters()):,}" in out
    acc = EventAccumulator(cli.trainer.logger.log_dir)
    acc.Reload()
    assert "autogrow/params" in acc.Tags()["scalars"]


def test_print_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert "class_path: callbacks.AutoGrow" in capsys.readouterr().out
