"""``GrowableMixin``: ``load_from_checkpoint`` of a grown model, without the callback."""

from __future__ import annotations

from typing import Any

from autogrow.checkpoint import history_from, restore_history

__all__ = ["GrowableMixin"]


class GrowableMixin:
    """Mix into a LightningModule so that ``load_from_checkpoint`` rebuilds a grown model.

    ``class Model(GrowableMixin, pl.LightningModule): ...`` then ``Model.load_from_checkpoint(path)``:
    the saved growth history is replayed on the freshly built model before the weights load.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_history(self, history_from(checkpoint))  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
