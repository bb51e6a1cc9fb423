"""Both Lightning distributions: ``pytorch_lightning`` and the unified ``lightning`` package.

Whichever are installed, the callback derives from each one's ``Callback`` (so either ``Trainer``
accepts it) and recognises each one's strategies, loggers and exceptions.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__all__ = ["CALLBACK_BASES", "DDP_STRATEGIES", "SINGLE_DEVICE_STRATEGIES", "TENSORBOARD_LOGGERS",
           "MisconfigurationError", "check_supported", "info", "warn"]

_PACKAGES = []
for _name in ("pytorch_lightning", "lightning.pytorch"):
    try:
        _PACKAGES.append(importlib.import_module(_name))
    except ImportError:
        pass
if not _PACKAGES:
    raise ImportError("autogrow.callbacks needs pytorch_lightning or lightning: pip install 'autogrow[lightning]'")


def _all(path: str) -> tuple[type, ...]:
    """The class at ``path`` (relative to each installed package), from every package that has it."""
    out = []
    for pkg in _PACKAGES:
        module_name, _, cls = path.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(f"{pkg.__name__}.{module_name}"), cls))
        except (ImportError, AttributeError):
            pass
    return tuple(out)


CALLBACK_BASES = _all("callbacks.Callback")
DDP_STRATEGIES = _all("strategies.DDPStrategy")
SINGLE_DEVICE_STRATEGIES = _all("strategies.SingleDeviceStrategy")
TENSORBOARD_LOGGERS = _all("loggers.TensorBoardLogger")


class MisconfigurationError(*_all("utilities.exceptions.MisconfigurationException")):  # type: ignore[misc]
    """An unsupported setup, raised in ``setup``/``on_fit_start``; caught as either package's
    ``MisconfigurationException``."""


def _logger(trainer: Any) -> logging.Logger:
    # The trainer's own package logger: Lightning shows its INFO lines on the console.
    return logging.getLogger(type(trainer).__module__.rsplit(".trainer", 1)[0])


def info(trainer: Any, message: str) -> None:
    """Log ``message`` once (rank 0)."""
    if trainer.is_global_zero:
        _logger(trainer).info(message)


def warn(trainer: Any, message: str) -> None:
    """Warn once (rank 0)."""
    if trainer.is_global_zero:
        import warnings

        warnings.warn(message, UserWarning, stacklevel=3)


def check_supported(trainer: Any, module: Any) -> None:
    """Refuse, before training starts, the setups AutoGrow cannot follow.

    Raises:
        MisconfigurationError: a sharded or spawn-based strategy, or manual optimization.
    """
    strategy = trainer.strategy
    start = getattr(strategy, "_start_method", "popen")
    if isinstance(strategy, DDP_STRATEGIES) and start != "popen":
        raise MisconfigurationError(
            f"AutoGrow: strategy {type(strategy).__name__} is not supported with start method {start!r} (as in "
            "strategy='ddp_spawn'): Lightning copies the spawned workers' weights back into the original, smaller "
            "model; use strategy='ddp'")
    if not isinstance(strategy, DDP_STRATEGIES + SINGLE_DEVICE_STRATEGIES):
        raise MisconfigurationError(
            f"AutoGrow: strategy {type(strategy).__name__} is not supported; use a single device or strategy='ddp' "
            "(sharded strategies such as FSDP/DeepSpeed cannot follow a model that changes shape)")
    if not module.automatic_optimization:
        raise MisconfigurationError("AutoGrow: manual optimization is not supported (the callback "
                                    "rebuilds the optimizer through configure_optimizers)")
