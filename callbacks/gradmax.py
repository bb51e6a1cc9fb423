"""GradMax in a fit (``Widen(gradmax=True)``): the training step right after a widening measures ``M`` (its
forward and backward, all-reduced across ranks); before the optimizer steps, the fresh rows are set from it and
their outgoing columns' gradients, computed with the drawn rows, are zeroed. Exact either way: the fresh units'
outgoing weights are still zero."""

from __future__ import annotations

from typing import Any

import torch

import autogrow
from autogrow.gradmax import GradMaxCapture, fresh_rows

from ._compat import warn

__all__ = ["PendingGradMax"]


class PendingGradMax:
    """The captures waiting for the next optimizer step."""

    def __init__(self) -> None:
        self.captures: list[tuple[GradMaxCapture, int]] = []
        self.applied = 0  # widenings whose fresh rows were set (in memory only: a diagnostic)

    def start(self, trainer: Any, module: torch.nn.Module, growths: list[autogrow.Growth], seed: int) -> None:
        for i, g in enumerate(growths):
            try:
                target = fresh_rows(module, g)
            except autogrow.AutogrowError as e:  # the growth stands (exact), its fresh rows stay as drawn
                warn(trainer, f"AutoGrow: {e}; its fresh units keep their drawn incoming weights")
                continue
            self.captures.append((GradMaxCapture(module, target).attach(), seed + i))

    def finish(self, trainer: Any, module: torch.nn.Module) -> None:
        """Set the fresh rows (every rank the same: ``M`` summed over ranks), zero their columns' gradients."""
        for capture, seed in self.captures:
            capture.detach()
            producer = module.get_submodule(capture.target.producer)
            consumers = [module.get_submodule(c) for c in capture.target.consumers]
            m = capture.stacked()
            if m is None:  # no backward reached the consumers on this rank: it adds nothing to the sum
                m = torch.zeros(sum(c.out_features for c in consumers), producer.in_features, dtype=torch.float64)
            m = trainer.strategy.reduce(m.to(producer.weight.device), reduce_op="sum")
            try:
                self.applied += capture.apply(m, generator=seed)
            except autogrow.AutogrowError as e:  # every rank saw the same shapes: all skip alike
                warn(trainer, f"AutoGrow: {e}; the fresh units keep their drawn incoming weights")
                continue
            for c in consumers:
                if c.weight.grad is not None:
                    c.weight.grad[:, capture.target.rows.to(c.weight.device)] = 0.0
        self.captures.clear()

    def cancel(self) -> None:
        for capture, _ in self.captures:
            capture.detach()
        self.captures.clear()
