"""What every node of a traced graph produced on example inputs: tensor shapes and size values.

With example inputs, autogrow knows the rank and size of every tensor and the value of every size
query (``x.size(-1)``, ``b, t, c = x.shape``), so the coupling walk never has to guess which axis
an op touches. The model runs once, in eval mode and without gradients (no running statistic
moves), and its train/eval flags are restored.

    >>> import torch, torch.nn as nn
    >>> from autogrow.trace import trace
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> g = trace(net)
    >>> [v for v in propagate(net, g, torch.zeros(3, 2, 4)).values()]
    [(3, 2, 4), (3, 2, 8), (3, 2, 8), (3, 2, 8)]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from autogrow.errors import fail

__all__ = ["as_args", "eval_mode", "propagate"]


class eval_mode:  # noqa: N801 - used like torch.no_grad
    """Context: ``module`` in eval mode; every submodule's own flag restored on exit."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        return self.module.eval()

    def __exit__(self, *exc: object) -> None:
        for m, training in self.modes:
            m.training = training


def as_args(example_inputs: Any) -> tuple:
    """Forward arguments: a tuple is the argument list, anything else one argument."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)  # torch.Size and tuples of sizes
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.meta: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.meta[n] = _meta(out)
        return out


def propagate(model: nn.Module, graph: fx.Graph, example_inputs: Any) -> dict[fx.Node, Any]:
    """Shape (tuple) of every tensor node, value of every size node, ``None`` for anything else.

    Raises:
        AutogrowError: the model's forward fails on ``example_inputs``.
    """
    gm = fx.GraphModule(model, graph)  # shares the model's modules and parameters
    recorder = _Recorder(gm)
    try:
        with torch.no_grad(), eval_mode(model):
            recorder.run(*as_args(example_inputs))
    except Exception as e:
        fail(f"example_inputs: the model's forward failed on them ({type(e).__name__}: {str(e).splitlines()[0]})")
    return recorder.meta
