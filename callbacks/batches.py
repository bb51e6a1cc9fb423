"""What AutoGrow keeps of the training stream for its decisions: the last few batches, and the mean training loss
between two evaluations. Both are saved in checkpoints, so that a resumed run decides exactly as an
uninterrupted one."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch.utils._pytree import tree_map

__all__ = ["BatchCache", "TrainLoss", "inputs_of"]


def _to(batch: Any, device: torch.device | str | None) -> Any:
    return tree_map(lambda t: t.detach().to(device) if isinstance(t, torch.Tensor) else t, batch)


def inputs_of(batch: Any) -> Any:
    """A batch's inputs: its first element (``(x, y)`` batches), or the batch itself.

        >>> inputs_of((torch.zeros(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
    """
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch


class BatchCache:
    """The last ``size`` training batches, detached (a ring buffer; ``size=0`` keeps nothing).

        >>> c = BatchCache(2)
        >>> for i in range(3):
        ...     c.add((torch.full((1,), float(i)), torch.zeros(1)))
        >>> [float(b[0]) for b in c.get()]
        [1.0, 2.0]
    """

    def __init__(self, size: int = 0) -> None:
        self.size = size
        self.batches: deque[Any] = deque(maxlen=max(size, 1))

    @staticmethod
    def of(batches: list[Any]) -> BatchCache:
        """A cache holding ``batches`` (as they are).

            >>> len(BatchCache.of([(torch.zeros(1),), (torch.ones(1),)]).get())
            2
        """
        cache = BatchCache(len(batches))
        cache.batches.extend(batches)
        return cache

    def add(self, batch: Any) -> None:
        if self.size:
            self.batches.append(_to(batch, None))

    def get(self, device: torch.device | str | None = None) -> list[Any]:
        """The batches, oldest first, on ``device`` (``None``: where they are)."""
        return [_to(b, device) if device is not None else b for b in self.batches]

    def inputs(self, device: torch.device | str | None = None) -> tuple[Any, Any] | None:
        """``(fit, check)``: the inputs of all batches but the last, concatenated, and of the last one; ``None``
        with fewer than two batches or inputs that are not tensors."""
        xs = [inputs_of(b) for b in self.get(device)]
        if len(xs) < 2 or not all(isinstance(x, torch.Tensor) for x in xs):
            return None
        return torch.cat(xs[:-1]), xs[-1]

    def state_dict(self) -> list[Any]:
        return [_to(b, "cpu") for b in self.batches]

    def load_state_dict(self, batches: list[Any]) -> None:
        self.batches.clear()
        self.batches.extend(batches[-self.size:] if self.size else [])


class TrainLoss:
    """Mean training loss since the last :meth:`take` (``training_step``'s loss, or ``outputs["loss"]``).

        >>> m = TrainLoss(); m.add(torch.tensor(1.0)); m.add({"loss": torch.tensor(3.0)}); m.take(), m.take()
        (2.0, None)
    """

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            value = float(loss.detach())
            if math.isfinite(value):
                self.total, self.count = self.total + value, self.count + 1

    def take(self) -> float | None:
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.count = float(state.get("total", 0.0)), int(state.get("count", 0))
