"""Shrinking while training: when, how much, and what keeps growth and shrinking from undoing each other
(framework-free; the Lightning side is ``autogrow.callbacks.AutoGrow(shrink=Shrink(...))``).

* :class:`Shrink`: the options, validated when built.
* :func:`shrink_layer`: one layer made smaller, exactly (duplicate units merged) or approximately (the
  least important units pruned with a least-squares correction fitted on one batch), kept only if the
  output measured on *another* batch moved by at most a tolerance; otherwise undone exactly.
* :class:`OverfitCheck`: validation no better than its best while the training loss makes new bests.
* :class:`Blocks`: no oscillation: a layer that shrank sits out the next growth event, and after it grows
  again only once the monitored metric beats its best at the shrink; a layer that grew may not shrink for
  ``cooldown`` evaluations.

    >>> import torch, torch.nn as nn, autogrow
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    >>> _ = autogrow.widen(net, "0", 6, init="net2wider", split=0.3, generator=0)
    >>> x = torch.randn(32, 4, dtype=torch.float64)
    >>> growth, err, _ = shrink_layer(net, "0", "merge", fit=x, check=x, tol=1e-12)
    >>> net[0].out_features, err < 1e-12
    (3, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from autogrow.errors import AutogrowError, check, check_bool, check_choice, check_float, check_int
from autogrow.growth import Growth
from autogrow.plan import Undo, outputs, relative_error
from autogrow.plateau import MODES
from autogrow.shrink import SELECTS, plan_shrink

__all__ = ["Blocks", "OverfitCheck", "Shrink", "prune_widths", "shrink_layer"]


@dataclass
class Shrink:
    """When and how far AutoGrow shrinks (opt-in: ``AutoGrow(shrink=Shrink())``).

    Args:
        merge: merge units that compute the same thing (exact; copies left by widening), at each check.
        prune: at each check, remove the least important units of a layer (least-squares corrected) when the
            output on a held-out training batch (and AutoGrow's validation probe) moves by at most ``tol`` (relative,
            ``max|f - g| / max|f|``).
        tol: that tolerance. Measured (``suite_resize``, one hidden layer of 1024 units, Fashion-MNIST, these
            defaults, 9 seeds): 0.05 ends with 2.7x fewer parameters 0.14 pp below the unshrunk net; 0.03 with
            1.6-1.7x fewer at 0.00-0.16 pp below (experiments/results/resize/history.md).
        fraction: the largest fraction of a layer's units one check removes; halved (``attempts`` tries in all)
            until the change is within ``tol``.
        attempts: how many fractions are tried per layer.
        every, warmup: a redundancy check every ``every`` evaluations, none in the first ``warmup``. Checking at
            every evaluation pruned twice as far and lost 0.38 pp there (vs 0.13 pp every 2).
        overfit_patience: prune when, this many evaluations in a row, the monitored metric is no better than
            its best while the mean training loss makes a new best (over capacity); ``None``: never.
        overfit_fraction: the fraction of the widest allowed layer's units an over-capacity prune removes.
        overfit_tol: the largest output change an over-capacity prune may make (``None``: no limit).
        cooldown: evaluations after a layer grew during which it may not shrink. A layer that shrank sits out the
            next growth event and then grows only once the metric beats its best at the shrink (a growth decided
            while every layer is so blocked waits for that).
        until: no shrink is decided from this fraction of the run on (the run's length must be known:
            ``max_epochs`` or ``max_steps``), so that the network trains at its final size before the end and the
            last prune's change is trained out; ``None``: shrinks at any time. Measured (``suite_resize``, from
            1024 units, 10 epochs): with ``None`` the last prune came after the last epoch, never trained out.
        min_params, min_width: nothing shrinks below these.
        batches: training batches kept for the decisions: the last one measures the change, the others fit
            the correction (and :class:`~autogrow.policy.TryCandidates` trains on all of them).
        select: which units a prune keeps: ``"span"`` (those that best span the removed ones; pivoted QR) or
            ``"magnitude"`` (see :func:`~autogrow.plan_shrink`).
        correct: least-squares correction of the pruned layers' consumers.
        ridge: that correction's ridge penalty (relative; see :func:`~autogrow.plan_shrink`). The fit has a few
            batches of samples for up to as many features: plain least squares (``0``) then fits them exactly and
            is far off elsewhere (measured: 1024 -> 896 units on Fashion-MNIST, 896 samples, -2.1 pp test
            accuracy plain, -0.04 pp with ``1e-2``).

    Example::

        AutoGrow(monitor="val_loss", shrink=Shrink(tol=0.05, overfit_patience=2, min_params=10_000))
    """

    merge: bool = True
    prune: bool = True
    tol: float = 0.05
    fraction: float = 0.5
    attempts: int = 3
    every: int = 2
    warmup: int = 2
    overfit_patience: int | None = 2
    overfit_fraction: float = 0.25
    overfit_tol: float | None = None
    cooldown: int = 2
    until: float | None = 0.8
    min_params: int | None = None
    min_width: int = 1
    batches: int = 4
    select: str = "span"
    correct: bool = True
    ridge: float = 1e-2

    def __post_init__(self) -> None:
        check_bool("merge", self.merge)
        check_bool("prune", self.prune)
        check_bool("correct", self.correct)
        check_float("ridge", self.ridge, 0.0)
        check_choice("select", self.select, SELECTS)
        check_float("tol", self.tol, 0.0)
        check_float("fraction", self.fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_float("overfit_fraction", self.overfit_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_float("overfit_tol", self.overfit_tol, 0.0, optional=True)
        check_float("until", self.until, 0.0, 1.0, low_open=True, optional=True)
        check_int("attempts", self.attempts, 1)
        check_int("every", self.every, 1)
        check_int("warmup", self.warmup, 0)
        check_int("overfit_patience", self.overfit_patience, 1, optional=True)
        check_int("cooldown", self.cooldown, 0)
        check_int("min_params", self.min_params, 1, optional=True)
        check_int("min_width", self.min_width, 1)
        check_int("batches", self.batches, 2)
        check("merge/prune/overfit_patience", (self.merge, self.prune, self.overfit_patience),
              self.merge or self.prune or self.overfit_patience is not None,
              "at least one way to shrink (merge, prune or overfit_patience)")

    def due(self, evaluation: int) -> bool:
        """Whether evaluation number ``evaluation`` (1-based) brings a redundancy check."""
        return (self.merge or self.prune) and evaluation > self.warmup and (evaluation - self.warmup) % self.every == 0

    def open(self, progress: float | None) -> bool:
        """Whether a shrink may still be decided at ``progress`` (the fraction of the run done; ``None``: unknown).

            >>> Shrink().open(0.5), Shrink().open(0.8), Shrink(until=None).open(0.99), Shrink().open(None)
            (True, False, True, True)
        """
        return self.until is None or progress is None or progress < self.until


def prune_widths(width: int, fraction: float, attempts: int, min_width: int = 1) -> list[int]:
    """The widths a prune tries, largest removal first: ``fraction`` of the units, then half as many, ...

        >>> prune_widths(1024, 0.5, 3), prune_widths(4, 0.5, 3), prune_widths(2, 0.5, 3, min_width=2)
        ([512, 768, 896], [2, 3], [])
    """
    out: list[int] = []
    for i in range(attempts):
        new = max(min_width, width - max(1, math.floor(width * fraction / 2**i)))
        if new < width and new not in out:
            out.append(new)
    return out


def shrink_layer(model: nn.Module, target: str, mode: str, *, fit: Any, check: Any, tol: float | None,
                 widths: Sequence[int | None] = (None,), correct: bool = True, ridge: float = 0.0, select: str = "span",
                 fits: Callable[[int], bool] = lambda delta: True, before: list[Any] | None = None
                 ) -> tuple[Growth, float, Undo] | None:
    """Shrink ``target`` to the first of ``widths`` whose output change on ``check`` is at most ``tol``.

    ``mode="merge"`` merges duplicates (``widths=(None,)``: all of them); ``"prune"`` removes the least important
    units, the consumers corrected by least squares on ``fit``. ``fits(param_delta)`` vetoes a width (a budget).
    Returns the record, the measured change and an :class:`~autogrow.plan.Undo` that puts the layer back
    exactly, or ``None`` (nothing to merge, every width refused or too far off: the model is as before).
    ``before``: the outputs on ``check`` to measure against (default: now); several layers shrunk in turn against
    the same ``before`` keep their *total* change within ``tol``.
    """
    check_choice("mode", mode, ("merge", "prune"))
    before = outputs(model, check) if before is None else before
    for width in widths:
        try:
            plan = plan_shrink(model, target, width, mode=mode, correct=correct, ridge=ridge, select=select,
                               example_inputs=fit if mode == "prune" else check)
            if not fits(plan.param_delta):
                continue
            undo = Undo()
            growth = plan.apply(record=undo)  # a merge is verified on ``check`` (undone if it is not exact)
        except AutogrowError:
            continue
        err = relative_error(before, outputs(model, check))
        if err is not None and (tol is None or err <= tol):
            return growth, err, undo
        undo.restore()
    return None


@dataclass
class OverfitCheck:
    """Over capacity: ``patience`` evaluations in a row where the metric is no better than its best while the
    training loss makes a new best.

        >>> c = OverfitCheck(mode="min", patience=2)
        >>> [c.update(val, train) for val, train in [(1.0, 2.0), (0.9, 1.5), (0.95, 1.2), (0.97, 1.1)]]
        [False, False, False, True]
    """

    mode: str = "min"
    patience: int = 2
    best_val: float | None = None
    best_train: float | None = None
    count: int = 0

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_int("patience", self.patience, 1)

    def update(self, value: float, train_loss: float | None) -> bool:
        """Feed one evaluation (and the mean training loss since the last one); ``True``: over capacity."""
        val_better = self.best_val is None or (value < self.best_val if self.mode == "min" else value > self.best_val)
        if val_better:
            self.best_val = value
        if train_loss is None or not math.isfinite(train_loss):
            return False
        train_better = self.best_train is None or train_loss < self.best_train
        if train_better:
            self.best_train = train_loss
        self.count = self.count + 1 if train_better and not val_better else 0
        return self.count >= self.patience

    def reset(self) -> None:
        """After a shrink: count afresh (the training loss must beat its old best again)."""
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("best_val", "best_train", "count"):
            if k in state:
                setattr(self, k, state[k])


@dataclass
class Blocks:
    """Which layers may grow or shrink now (no oscillation).

        >>> b = Blocks(cooldown=1); b.shrank("fc1", best=0.5)
        >>> b.may_grow("fc1"), b.update(0.4, lambda a, c: a < c), b.may_grow("fc1")
        (False, None, False)
        >>> b.growth_event(); b.may_grow("fc1")
        True
        >>> b.grew("fc1"); b.may_shrink("fc1"), b.update(0.4, lambda a, c: a < c), b.may_shrink("fc1")
        (False, None, True)
    """

    cooldown: int = 2
    no_grow: dict[str, float | None] = field(default_factory=dict)  # layer -> best metric when it shrank
    no_shrink: dict[str, int] = field(default_factory=dict)  # layer -> evaluations left
    held: set[str] = field(default_factory=set)  # shrunk since the last growth event: sit the next one out

    def shrank(self, name: str, best: float | None) -> None:
        self.no_grow[name] = best
        self.held.add(name)
        self.no_shrink.pop(name, None)

    def growth_event(self) -> None:
        """A growth event happened (or was skipped because every layer was blocked): the holds end."""
        self.held.clear()

    def grew(self, name: str) -> None:
        if self.cooldown > 0:
            self.no_shrink[name] = self.cooldown

    def may_grow(self, name: str) -> bool:
        return name not in self.no_grow and name not in self.held

    def may_shrink(self, name: str) -> bool:
        return name not in self.no_shrink

    def update(self, value: float, better: Callable[[float, float], bool]) -> None:
        """One evaluation: shrunk layers whose bar ``value`` beats may grow again (after their hold); cooldowns
        tick."""
        self.no_grow = {n: b for n, b in self.no_grow.items() if b is not None and not better(value, b)}
        self.no_shrink = {n: k - 1 for n, k in self.no_shrink.items() if k > 1}

    def rename(self, fn: Callable[[str], str]) -> None:
        """Follow layers renamed by a growth (deepening wraps ``fc1`` into ``fc1.0``)."""
        self.no_grow = {fn(n): b for n, b in self.no_grow.items()}
        self.no_shrink = {fn(n): k for n, k in self.no_shrink.items()}
        self.held = {fn(n) for n in self.held}

    def state_dict(self) -> dict[str, Any]:
        return {"no_grow": dict(self.no_grow), "no_shrink": dict(self.no_shrink), "held": sorted(self.held)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.no_grow = dict(state.get("no_grow", {}))
        self.no_shrink = {k: int(v) for k, v in state.get("no_shrink", {}).items()}
        self.held = set(state.get("held", []))
