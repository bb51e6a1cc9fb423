"""The run's clock for AutoGrow: where training is (progress), the LR multiplier, the growth deadline."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn as nn

from autogrow.checkpoint import history_of
from autogrow.growth import Growth
from autogrow.lr import GrowthLR
from autogrow.plateau import Deadline

__all__ = ["RunSchedule"]


class RunSchedule:
    """Ties a :class:`~autogrow.lr.GrowthLR` and a :class:`~autogrow.plateau.Deadline` to a Trainer."""

    def __init__(self, lr: GrowthLR | None, deadline: Deadline | None) -> None:
        self.lr, self.deadline = lr, deadline
        self.total_steps: int | None = None
        self._needed: int | None = None  # the deadline's events still to go (cached: counting them plans growths)
        self._seen = 0  # growth records of the module's history the multiplier has followed

    def start(self, trainer: Any, module: nn.Module) -> None:
        """At fit start: the run's length (optimizer steps), and the multiplier on the optimizer."""
        total = trainer.estimated_stepping_batches
        self.total_steps = int(total) if math.isfinite(total) and total > 0 else None
        self._seen = len(history_of(module))  # on a resume, the saved fan-ins already use today's names
        if self.lr is not None:
            self.lr.total_steps = self.total_steps
            self.lr.step_count = trainer.global_step
            self.lr.attach(trainer.optimizers[0], module)

    def sync(self, trainer: Any, module: nn.Module | None = None) -> None:
        """Before each batch: the multiplier follows the Trainer's optimizer-step count (resumes exactly) and, with
        ``module``, the Trainer's optimizer (another AutoGrow callback may have rebuilt it since this one grew)."""
        if self.lr is not None:
            self.lr.step_count = trainer.global_step
            if module is not None and trainer.optimizers and not self.lr.attached_to(trainer.optimizers[0]):
                self.lr.follow(self._others(module))  # another callback grew (stacks rename parameters)
                self.lr.attach(trainer.optimizers[0], module)

    def _others(self, module: nn.Module, own: Sequence[Growth] = ()) -> list[Growth]:
        """The growth records added to ``module``'s history since last asked, but for ``own`` (the last ones)."""
        records = history_of(module)
        others = records[self._seen:len(records) - len(own)]
        self._seen = len(records)
        return [Growth.from_dict(r) for r in others]

    def progress(self, trainer: Any) -> float | None:
        return trainer.global_step / self.total_steps if self.total_steps else None

    def due(self, trainer: Any, done: int, needed: Callable[[], int]) -> bool:
        """Whether the deadline calls for a growth now. ``needed()`` (the events still to go; it plans them) is
        asked only when it is not known: it is kept until :meth:`forget`, so that the check before every
        training batch costs no planning."""
        p = self.progress(trainer)
        if self.deadline is None or p is None:
            return False
        if self._needed is None:
            self._needed = needed()
        return self.deadline.due(p, done, self._needed)

    def forget(self) -> None:
        """The events still to go are stale (the model changed, or an evaluation may have changed what can grow)."""
        self._needed = None

    def rebuilt(self, trainer: Any, module: nn.Module, grew: bool, growths: Sequence[Growth] = ()) -> None:
        """After the optimizer was rebuilt (growth, shrink or rollback; ``growths``, this callback's, are the last
        records of the module's history): the multiplier moves to the new one."""
        if self.lr is not None:
            self.sync(trainer)  # growth at an epoch's end comes after its last step: count it
            self.lr.follow(self._others(module, growths))  # another callback's growths since (stacks rename)
            if grew:
                self.lr.grew(module, tuple(growths))
            self.lr.attach(trainer.optimizers[0], module)

    def multiplier(self) -> float:
        return self.lr.multiplier() if self.lr is not None else 1.0

    def state_dict(self) -> dict[str, Any]:
        return self.lr.state_dict() if self.lr is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.lr is not None:
            self.lr.load_state_dict(state)
