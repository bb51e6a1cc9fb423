"""Ash's rollback: keep the model and training state from before a growth, to return to it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from autogrow.checkpoint import history_of, set_history

from .rebuild import TrainingState, rebuild

__all__ = ["Skeleton", "Snapshot"]


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


class Skeleton:
    """The module's original architecture without its weights (meta tensors: no memory), to rebuild it
    when a checkpoint from before some growth is loaded into a grown module (``ckpt_path="best"``)."""

    def __init__(self, module: nn.Module) -> None:
        self.children: dict[str, nn.Module] = {}
        for name, child in module.named_children():
            tensors = list(child.parameters()) + list(child.buffers())
            if tensors:  # metric modules and the like keep their identity
                memo: dict[int, Any] = {id(t): _meta_like(t) for t in tensors}
                self.children[name] = copy.deepcopy(child, memo)

    def reset(self, module: nn.Module) -> None:
        """Give ``module`` fresh (zero-filled) copies of its original children, on its current device."""
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        for name, child in self.children.items():
            fresh = copy.deepcopy(child).to_empty(device=device)
            with torch.no_grad():
                for t in list(fresh.parameters()) + list(fresh.buffers()):
                    t.zero_()  # the checkpoint's weights load next; replay only needs finite values
            setattr(module, name, fresh)


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(t, device="meta")
    return nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
