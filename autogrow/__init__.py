"""autogrow: networks that grow while they train, by function-preserving surgery.

The core is framework-free (plain PyTorch): plan and apply Net2WiderNet / Net2DeeperNet on traced
models, carry optimizer and scheduler state across, detect plateaus. The Lightning callback lives in
``autogrow.callbacks`` (imported only when asked for).

    >>> import torch, torch.nn as nn, autogrow
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> x = torch.randn(16, 4); before = net(x)
    >>> g1 = autogrow.widen(net, "0", 16, optimizer=opt, generator=0, example_inputs=x)
    >>> g2 = autogrow.deepen(net, "0", optimizer=opt, generator=0, example_inputs=x)
    >>> float((net(x) - before).abs().max().detach()) < 1e-6
    True
"""

from autogrow.attention import SplitAttention, unfuse_attention
from autogrow.checkpoint import load_grown
from autogrow.deepen import DeepenPlan, Residual, deepen, plan_deepen
from autogrow.errors import AutogrowError
from autogrow.growth import Growth, Transform, UnitMap, num_params
from autogrow.init import WidenInit, register_init
from autogrow.ops import OpKind, register_function
from autogrow.optim import (
    carry_scheduler,
    check_optimizer,
    grow_optimizer,
    param_names,
    register_optimizer_state,
    translate_state_dict,
)
from autogrow.plan import Plan
from autogrow.ramp import advance_ramps
from autogrow.registry import (
    ChannelSpec,
    LayerSpec,
    register_channelwise,
    register_elementwise,
    register_layer,
)
from autogrow.replay import replay
from autogrow.shrink import ShrinkPlan, plan_shrink, shrink
from autogrow.stack import StackPlan, plan_stack, stack
from autogrow.widen import WidenPlan, plan_widen, widen

__version__ = "0.1.0"

__all__ = [
    "advance_ramps", "AutogrowError", "carry_scheduler", "ChannelSpec", "check_optimizer", "deepen", "DeepenPlan",
    "grow_optimizer", "Growth", "LayerSpec", "load_grown", "num_params", "OpKind", "param_names", "Plan",
    "plan_deepen", "plan_shrink", "plan_stack", "plan_widen", "register_channelwise", "register_elementwise",
    "register_function", "register_init", "register_layer", "register_optimizer_state", "replay", "Residual",
    "shrink", "ShrinkPlan", "SplitAttention", "stack", "StackPlan", "Transform", "translate_state_dict",
    "unfuse_attention", "UnitMap", "widen", "WidenInit", "WidenPlan",
]
