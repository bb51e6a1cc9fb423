"""The one way a growth is carried out: plan, check, apply, verify; or refuse with everything put back.

:class:`Plan` is the base of every kind of growth (``WidenPlan``, ``DeepenPlan``). A plan is made
without touching the model; :meth:`Plan.apply` then

1. checks that the optimizer (if any) can follow, before anything changes;
2. performs the surgery (the subclass's ``_apply``), recording every module it touches;
3. carries the optimizer state across (``autogrow.optim``);
4. with ``example_inputs``, runs the grown model on them and compares with the output before:
   if the forward raises, or an exact growth changed the output by more than a dtype-aware
   tolerance, the model and optimizer are restored exactly and :class:`AutogrowError` says what
   changed where.

A kind registers itself (``@register_plan``) so that growth records can be summarised and replayed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.optim import Optimizer
from torch.utils._pytree import tree_leaves

from autogrow.errors import fail
from autogrow.growth import Growth, register_kind
from autogrow.optim import check_optimizer, grow_optimizer
from autogrow.shapes import as_args, eval_mode

__all__ = ["Plan", "Undo", "outputs", "register_plan", "relative_error", "tolerance"]


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative change of the output an exact growth may cause, for a computation in ``dtype``.

        >>> tolerance(torch.float64) < tolerance(torch.float32) < tolerance(torch.bfloat16)
        True
    """
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 5e-2)


class Undo:
    """Shallow snapshots of the modules (and optimizer) a surgery touches, to put them back exactly."""

    def __init__(self) -> None:
        self._modules: list[tuple[nn.Module, type[nn.Module], dict[str, Any]]] = []
        self._optimizer: tuple[Optimizer, list[dict], list[list], dict] | None = None

    def save(self, module: nn.Module) -> None:
        """Remember ``module``'s class (a ramped norm's is swapped), attributes, parameters, buffers and children as
        they are now."""
        if any(m is module for m, _, _ in self._modules):
            return
        state = {k: dict(v) if k in ("_parameters", "_buffers", "_modules") else v for k, v in vars(module).items()}
        self._modules.append((module, type(module), state))

    def merge(self, other: Undo) -> None:
        """Also remember what ``other`` saved (earlier saves win: they hold the older state)."""
        for module, cls, state in other._modules:
            if not any(m is module for m, _, _ in self._modules):
                self._modules.append((module, cls, state))

    def save_optimizer(self, optimizer: Optimizer) -> None:
        groups = optimizer.param_groups
        self._optimizer = (optimizer, groups, [list(g["params"]) for g in groups], dict(optimizer.state))

    def restore(self) -> None:
        """Put every saved module (and the optimizer) back as it was when saved."""
        for module, cls, state in reversed(self._modules):
            module.__class__ = cls
            vars(module).clear()
            vars(module).update({k: dict(v) if k in ("_parameters", "_buffers", "_modules") else v
                                 for k, v in state.items()})
        if self._optimizer is not None:
            opt, groups, params, st = self._optimizer
            for g, p in zip(groups, params):
                g["params"] = p
            opt.param_groups = groups
            opt.state = defaultdict(dict, st)


class Plan:
    """What a growth will do; printing it shows every change. Nothing is changed until :meth:`apply`.

    Subclasses set ``kind`` and implement ``_apply(undo)`` (save each module with ``undo.save`` before
    changing it), ``param_delta``, ``exact``, ``summarize`` and ``replay``.
    """

    kind: ClassVar[str]
    model: nn.Module
    example_inputs: Any

    @property
    def param_delta(self) -> int:
        """How many parameters the plan adds."""
        raise NotImplementedError

    @property
    def exact(self) -> bool:
        """Whether the plan preserves the function (verified on ``example_inputs`` when given)."""
        raise NotImplementedError

    def apply(self, optimizer: Optimizer | None = None, *, state: str = "carry", record: Undo | None = None
              ) -> Growth:
        """Perform the plan; with ``optimizer``, carry (or ``state="reset"``) its state across.

        ``record`` (an :class:`Undo`) also collects what this growth changed, so that a caller can undo
        several growths together.

        Raises:
            AutogrowError: the optimizer cannot follow, the plan is stale, or (with ``example_inputs``)
                the grown model fails or computes another function; the model and optimizer are then
                exactly as before the call.
        """
        if optimizer is not None:
            check_optimizer(optimizer, self.model, state)
        for name, p in self.model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                fail(f"model: parameter {name!r} holds NaN/inf values; growing would copy them into new units "
                     "(fix the divergence first: lower the learning rate, clip gradients)")
        before = outputs(self.model, self.example_inputs) if self.example_inputs is not None else None
        undo = Undo()
        if optimizer is not None:
            undo.save_optimizer(optimizer)
        growth = self._apply(undo)
        try:
            if optimizer is not None:
                grow_optimizer(optimizer, growth, self.model, state=state)
            if before is not None:
                self._verify(before)
        except BaseException:
            undo.restore()
            raise
        if record is not None:
            record.merge(undo)
        return growth

    def _verify(self, before: list[torch.Tensor]) -> None:
        what = str(self).splitlines()[0]
        try:
            after = outputs(self.model, self.example_inputs)
        except Exception as e:
            fail(f"{what}: the grown model's forward raised {type(e).__name__}: {e}; the growth was undone")
        err = relative_error(before, after)
        if err is None:
            fail(f"{what}: the grown model's output changed shape; the growth was undone")
        dtype = next((b.dtype for b in before if b.is_floating_point()), torch.float32)
        if self.exact and err > tolerance(dtype):
            fail(f"{what}: changed the model's output by {err:.3g} (relative), more than the {dtype} tolerance "
                 f"{tolerance(dtype):.0e}: some op in the forward does not follow the growth; the growth was undone")

    def _apply(self, undo: Undo) -> Growth:
        raise NotImplementedError

    @classmethod
    def summarize(cls, record: Growth) -> str:
        raise NotImplementedError

    @classmethod
    def replay(cls, model: nn.Module, record: Growth) -> Growth:
        raise NotImplementedError


def register_plan(cls: type[Plan]) -> type[Plan]:
    """Class decorator: records of ``cls.kind`` are summarised and replayed by ``cls``."""
    register_kind(cls.kind, cls)
    return cls


def outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """The model's outputs (flattened) on ``inputs``, in eval mode, without touching train/eval flags."""
    with torch.no_grad(), eval_mode(model):
        out = model(*as_args(inputs))
    return [t.detach() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def relative_error(before: list[torch.Tensor], after: list[torch.Tensor]) -> float | None:
    """``max |f - g| / max |f|`` over floating outputs; ``None`` if the outputs' shapes differ.

        >>> relative_error([torch.tensor([1.0, -2.0])], [torch.tensor([1.0, -2.5])])
        0.25
    """
    if len(after) != len(before) or any(a.shape != b.shape for a, b in zip(after, before)):
        return None
    err = 0.0
    for a, b in zip(after, before):
        if b.is_floating_point():
            err = max(err, float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)))
    return err

