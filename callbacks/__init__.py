"""Lightning adapters over the framework-free ``autogrow`` core."""

from autogrow.checkpoint import load_grown
from callbacks.autogrow import AutoGrow, GrowableMixin

__all__ = ["AutoGrow", "GrowableMixin", "load_grown"]
