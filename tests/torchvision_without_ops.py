"""Import torchvision's Python code without its compiled ops (the CUDA build fails on a CPU torch)."""

from __future__ import annotations

import inspect

__all__ = ["SOURCE", "import_torchvision_without_ops"]


def import_torchvision_without_ops() -> None:
    """Import torchvision if installed; when its ops fail to register, import it again without them."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
        import torchvision  # noqa: F401


SOURCE = inspect.getsource(import_torchvision_without_ops)  # for a subprocess's sitecustomize
