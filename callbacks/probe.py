"""A batch kept to check every growth: its shapes guide the surgery, its outputs verify it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from autogrow.plan import outputs, relative_error

__all__ = ["Probe"]


class Probe:
    """The first validation batch's inputs (up to ``size`` examples), else a training batch's."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.inputs: torch.Tensor | None = None
        self._from_validation = False

    def capture(self, batch: Any, validation: bool) -> None:
        """Keep ``batch[0]`` (a validation batch replaces a training one, not the other way round)."""
        if self._from_validation and not validation:
            return
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if isinstance(x, torch.Tensor):
            self.inputs, self._from_validation = x[: self.size].detach(), validation

    def outputs(self, module: nn.Module) -> list[torch.Tensor] | None:
        """The module's outputs on the probe (eval mode, no gradients), or ``None`` without one."""
        if self.inputs is None:
            return None
        try:
            return outputs(module, self.inputs)
        except Exception:  # a forward that does not take the batch's first element: no measurement
            return None

    @staticmethod
    def error(before: list[torch.Tensor] | None, after: list[torch.Tensor] | None) -> float | None:
        """Relative change of the outputs (``None`` when either is missing)."""
        return None if before is None or after is None else relative_error(before, after)
