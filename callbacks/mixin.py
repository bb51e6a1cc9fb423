"""``GrowableMixin``: ``load_from_checkpoint`` of a grown model, without the callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autogrow.checkpoint import history_from, ramps_from, restore_history

__all__ = ["GrowableMixin", "unwrap_load_hook", "wrap_load_hook"]


class GrowableMixin:
    """Mix into a LightningModule so that ``load_from_checkpoint`` rebuilds a grown model.

    ``class Model(GrowableMixin, pl.LightningModule): ...`` then ``Model.load_from_checkpoint(path)``:
    the saved growth history is replayed on the freshly built model before the weights load.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_history(self, history_from(checkpoint), ramps=ramps_from(checkpoint))  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]


def wrap_load_hook(module: Any, reset: Callable[[Any], None] | None = None) -> None:
    """Replay a checkpoint's growth history in ``module.on_load_checkpoint`` (``ckpt_path=...`` of fit,
    validate, test and predict); ``reset`` rebuilds the original architecture for a checkpoint taken
    before the module's last growth.

    Lightning loads the weights right after the module's ``on_load_checkpoint`` and long before any
    callback hook: the history must be replayed there.
    """
    original = module.on_load_checkpoint
    if getattr(original, "_autogrow", False):
        return

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        restore_history(module, history_from(checkpoint), reset, ramps_from(checkpoint))
        original(checkpoint)

    on_load_checkpoint._autogrow = True  # type: ignore[attr-defined]
    module.on_load_checkpoint = on_load_checkpoint


def unwrap_load_hook(module: Any) -> None:
    """Remove :func:`wrap_load_hook`'s wrapper: a closure, which would make the module unpicklable."""
    if getattr(module.__dict__.get("on_load_checkpoint"), "_autogrow", False):
        del module.on_load_checkpoint
