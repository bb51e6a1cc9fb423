"""After surgery: rebuild the DDP wrapper, the optimizer and the schedulers, and load their state.

What is in memory afterwards is exactly what a checkpoint resume rebuilds: ``configure_optimizers``
runs again on the grown model, the old optimizer state is translated onto it by parameter *name*
(``autogrow.translate_state_dict``) and each scheduler continues from its saved state.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

import autogrow

from ._compat import DDP_STRATEGIES

__all__ = ["TrainingState", "rebuild"]


@dataclass
class TrainingState:
    """The optimizer and scheduler state before a growth, keyed by parameter name."""

    optimizer: dict[str, Any]
    names: list[str]
    schedulers: list[dict[str, Any]]

    @staticmethod
    def capture(trainer: Any, module: nn.Module, deep: bool = False) -> TrainingState:
        """The trainer's current state; ``deep`` copies tensors (a snapshot to roll back to later)."""
        opt = trainer.optimizers[0]
        state = TrainingState(opt.state_dict(), autogrow.param_names(opt, module),
                              [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs])
        return copy.deepcopy(state) if deep else state


def rebuild(trainer: Any, module: nn.Module, saved: TrainingState, growths: Sequence[autogrow.Growth],
            state: str = "carry") -> None:
    """Rebuild DDP, optimizer and schedulers for the changed model and load ``saved`` into them.

    Raises:
        RuntimeError: ``configure_optimizers`` returned a different number of schedulers than before.
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDP_STRATEGIES):
        strategy.model = strategy.lightning_module  # the old wrapper's hooks only know the old parameters
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)  # runs configure_optimizers on the new parameters
    autogrow.translate_state_dict(saved.optimizer, saved.names, growths, strategy.optimizers[0], module, state=state)
    new_scheds = [c.scheduler for c in strategy.lr_scheduler_configs]
    if len(new_scheds) != len(saved.schedulers):
        raise RuntimeError(f"AutoGrow: configure_optimizers returned {len(new_scheds)} schedulers after growth, "
                           f"{len(saved.schedulers)} before")
    for new, st in zip(new_scheds, saved.schedulers):  # what autogrow.carry_scheduler does, from a saved state
        new.load_state_dict(st)
