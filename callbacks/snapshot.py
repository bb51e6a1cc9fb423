"""Ash's rollback: keep the model and training state from before a growth, to return to it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from autogrow.checkpoint import history_of, set_history

from .rebuild import TrainingState, rebuild

__all__ = ["Snapshot"]


@dataclass
class Snapshot:
    """Copies of the module's children with parameters, its growth history and the training state."""

    children: dict[str, nn.Module]
    history: list[dict[str, Any]]
    targets: list[str]
    training: TrainingState

    @staticmethod
    def take(trainer: Any, module: nn.Module, targets: list[str]) -> Snapshot:
        # Only children with parameters: metric modules keep their identity (Lightning logs them by it).
        children = {n: copy.deepcopy(c) for n, c in module.named_children() if any(True for _ in c.parameters())}
        return Snapshot(children, history_of(module), list(targets), TrainingState.capture(trainer, module, deep=True))

    def restore(self, trainer: Any, module: nn.Module) -> list[str]:
        """Put the model, optimizer and schedulers back; returns the targets as they were."""
        for name, child in self.children.items():
            setattr(module, name, child)
        set_history(module, self.history)
        rebuild(trainer, module, self.training, [], "carry")
        return list(self.targets)
