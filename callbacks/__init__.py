"""Lightning adapters over the framework-free ``autogrow`` core (installed as ``autogrow.callbacks``).

Works with ``pytorch_lightning`` and with the unified ``lightning`` package (whichever is installed).
"""

from autogrow.checkpoint import load_grown
from autogrow.policy import TryCandidates
from autogrow.resize import Shrink

from .auto_grow import AutoGrow
from .mixin import GrowableMixin

__all__ = ["AutoGrow", "GrowableMixin", "Shrink", "TryCandidates", "load_grown"]
