"""Lightning adapters over the framework-free ``autogrow`` core (installed as ``autogrow.callbacks``).

Works with ``pytorch_lightning`` and with the unified ``lightning`` package (whichever is installed).
"""

from autogrow.checkpoint import load_grown

from .auto_grow import AutoGrow
from .mixin import GrowableMixin

__all__ = ["AutoGrow", "GrowableMixin", "load_grown"]
