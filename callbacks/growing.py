"""One growth event's surgery: each chosen layer planned, checked on the probe, applied (or undone)."""

from __future__ import annotations

from typing import Any

import autogrow
from autogrow.actions import width_of
from autogrow.events import Change
from autogrow.plan import Undo

from ._compat import warn

__all__ = ["grow_layers", "renamed"]


def renamed(name: str, growth: autogrow.Growth) -> str:
    """A module's name after ``growth`` (deepening wraps modules: ``fc1`` -> ``fc1.0``; stacking shifts the
    blocks after the new one: ``blocks.1`` -> ``blocks.2``)."""
    new = growth.renames.get(f"{name}.weight")
    if new:
        return new.rsplit(".", 1)[0]
    for old, new in growth.renames.items():  # a module without its own weight: follow any parameter below it
        if old.startswith(f"{name}."):
            return new[: len(new) - (len(old) - len(name))]
    return name


def grow_layers(cb: Any, trainer: Any, module: Any, chosen: list[str], seed: int, n_params: int,
                action: Any = None) -> tuple[list[autogrow.Growth], list[Change], list[str]]:
    """Grow ``chosen`` layers of ``module`` by ``action`` (``None``: ``cb.action``) within ``cb``'s budget; returns
    the growths, the changes and the callback's targets afterwards (renamed; without layers that failed, with
    ``on_error="skip"``).

    Raises:
        AutogrowError: a growth failed its check and ``cb.on_error == "raise"``: every layer grown in this
            event is undone first, so the model is exactly as before.
    """
    growths, changes, event, targets = [], [], Undo(), list(cb.targets)
    action = (cb.action if action is None else action).for_run(cb.schedule.total_steps)
    chosen = list(chosen)
    for i in range(len(chosen)):
        name = chosen[i]
        try:
            plan = action.plan(module, name, seed + i, max_width=cb.budget.max_width,
                                  example_inputs=cb.probe.inputs)
            delta = plan.param_delta
            if not cb.budget.fits(n_params, delta):
                continue
            width = width_of(module.get_submodule(name))
            growth = plan.apply(record=event)  # checked on the probe; undone if it fails
        except autogrow.AutogrowError as e:
            if cb.on_error == "raise":
                event.restore()  # the layers grown earlier in this event too: the model is as before
                raise autogrow.AutogrowError(f"AutoGrow: growing {name!r} failed and was undone: {e}") from e
            warn(trainer, f"AutoGrow: {name!r} will not grow any more: {e}")
            targets = [t for t in targets if t != name]
            continue
        n_params += delta
        growths.append(growth)
        changes.append(Change(name, width, width_of(module.get_submodule(renamed(name, growth))), growth.summary()))
        targets = [renamed(t, growth) for t in targets]
        chosen[i + 1:] = [renamed(c, growth) for c in chosen[i + 1:]]  # stacking shifts later blocks
    return growths, changes, targets
