"""Growth history on a module and in checkpoints: how a grown model is rebuilt from a small one.

A module that grew carries its history (a list of :meth:`Growth.to_dict` records) in the attribute
``_autogrow_history``; checkpoints carry it under ``checkpoint["autogrow"]["history"]``. Loading a
grown checkpoint means: build the original (small) model, replay the history, then load the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autogrow.errors import fail
from autogrow.ramp import set_ramps
from autogrow.replay import replay

__all__ = ["CHECKPOINT_KEY", "history_from", "history_of", "load_grown", "ramps_from", "restore_history",
           "set_history"]

CHECKPOINT_KEY = "autogrow"
_ATTR = "_autogrow_history"


def history_from(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The growth records saved in a checkpoint dict (empty for a model that never grew).

        >>> history_from({"state_dict": {}}), history_from({"autogrow": {"history": [{"kind": "widen"}]}})
        ([], [{'kind': 'widen'}])
    """
    return [dict(h) for h in checkpoint.get(CHECKPOINT_KEY, {}).get("history", [])]


def ramps_from(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The norms ramping new units in when the checkpoint was saved (:func:`autogrow.ramp.ramp_state`); ``None`` for
    a checkpoint that does not say (saved before ramps existed: every norm plain).

        >>> ramps_from({"autogrow": {"history": [], "ramps": {}}}), ramps_from({})
        ({}, None)
    """
    ramps = checkpoint.get(CHECKPOINT_KEY, {}).get("ramps")
    return None if ramps is None else dict(ramps)


def history_of(module: nn.Module) -> list[dict[str, Any]]:
    """The growth records applied to ``module`` so far (oldest first)."""
    return list(getattr(module, _ATTR, []))


def set_history(module: nn.Module, history: Sequence[Mapping[str, Any]]) -> None:
    object.__setattr__(module, _ATTR, [dict(h) for h in history])  # a plain attribute, not a submodule


def restore_history(module: nn.Module, history: Sequence[Mapping[str, Any]],
                    reset: Callable[[nn.Module], None] | None = None,
                    ramps: Mapping[str, Mapping[str, Any]] | None = None) -> int:
    """Replay the records of ``history`` that ``module`` does not have yet, then put its norms' ramps as in
    ``ramps`` (:func:`ramps_from`; ``None``: every norm plain); returns how many records were replayed.

    A module that grew differently (or further: a checkpoint saved before the last growth) is first
    put back to its original architecture by ``reset`` when given, then grown by the whole history.

    Raises:
        AutogrowError: the module grew differently and there is no ``reset``.

    Example:
        >>> import torch.nn as nn, autogrow
        >>> from autogrow.checkpoint import restore_history
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> restore_history(net, [{"kind": "deepen", "target": "0", "seed": 0, "options": {"init": "identity",
        ...     "residual": False, "batch_norm": False, "kernel_size": None, "layer": "Linear", "wrap": "1"},
        ...     "maps": {}, "params": {}, "renames": {}, "new_params": {}, "buffers": []}])
        1
    """
    done = history_of(module)
    if len(done) > len(history) or any(a != b for a, b in zip(done, history)):
        if reset is None:
            fail(f"history: the module already grew differently ({len(done)} records) from the "
                 f"checkpoint's history ({len(history)} records)")
        reset(module)
        set_history(module, [])
        done = []
    todo = list(history[len(done):])
    replay(module, todo)
    set_history(module, history)
    set_ramps(module, ramps or {})
    return len(todo)


def load_grown(model_class: type[nn.Module] | Callable[..., nn.Module], path: str | Path, *,
               map_location: str | torch.device = "cpu", strict: bool = True, **kwargs: Any) -> nn.Module:
    """Load a checkpoint of a grown model for inference, without a Trainer.

    ``model_class`` is the model class (or a factory): it is built from the checkpoint's
    ``hyper_parameters`` (Lightning's ``save_hyperparameters``) plus ``kwargs``, grown by replaying the
    saved history, loaded with the weights and put in eval mode. Only load checkpoints you trust:
    like Lightning's own loader, this unpickles the file.

    Example:
        >>> import tempfile, os, torch, torch.nn as nn, autogrow
        >>> from autogrow.checkpoint import load_grown, set_history
        >>> class Net(nn.Sequential):
        ...     def __init__(self, hidden=8):
        ...         super().__init__(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        >>> net = Net(); g = autogrow.widen(net, "0", 12)
        >>> path = os.path.join(tempfile.mkdtemp(), "grown.ckpt")
        >>> torch.save({"state_dict": net.state_dict(), "hyper_parameters": {"hidden": 8},
        ...             "autogrow": {"history": [g.to_dict()]}}, path)
        >>> load_grown(Net, path)[0].out_features
        12
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    module = model_class(**{**ckpt.get("hyper_parameters", {}), **kwargs})
    restore_history(module, history_from(ckpt), ramps=ramps_from(ckpt))
    module.load_state_dict(ckpt["state_dict"], strict=strict)
    return module.eval()
