"""Net2DeeperNet: insert a layer that starts as the identity after an existing layer.

After ``h = phi(W x)`` the new layer U = I (identity matrix, or a conv kernel whose centre tap is
the identity) gives ``phi(U phi(W x)) = phi(W x)`` exactly when phi is idempotent (ReLU). For other
activations (GELU, tanh, ...) ``residual=True`` inserts ``x + f(x)`` whose last layer starts at
zero, which is exact for any phi; without it the request is refused. With no activation after the
layer, the identity layer is inserted directly (a product of linear maps: exact).

The new block replaces a module by ``nn.Sequential(module, *new)``: the activation module when it is
called once (no parameter changes its name), else the module before the activation (its parameters
gain a ``.0`` in their names; the :class:`~autogrow.Growth` records the renames).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.optim import Optimizer

from autogrow.errors import AutogrowError
from autogrow.graph import _is_shape_query, call_sites, describe, trace
from autogrow.growth import Growth, make_seed
from autogrow.registry import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    FUNCTION_MODULES,
    IDEMPOTENT_FUNCTIONS,
    IDEMPOTENT_METHODS,
    channel_spec,
    identity_kernel_size,
    is_elementwise,
    is_idempotent,
    layer_spec,
)

INITS = ("identity", "random")
_NOT_ACTIVATIONS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
                    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


class Residual(nn.Module):
    """``x + body(x)``. autogrow inserts it with the body's last layer at zero: the identity."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@dataclass
class DeepenPlan:
    """Where :func:`plan_deepen` will insert what. Nothing is changed until :meth:`apply`."""

    model: nn.Module = field(repr=False)
    after: str
    wrap: str  # module replaced by Sequential(module, *new)
    activation: str | None  # what follows ``after`` (description), None if nothing
    act_first: bool  # the new block starts with a copy of the activation (wrapping the module before it)
    act_factory: object = field(repr=False)
    init: str = "identity"
    residual: bool = False
    batch_norm: bool = False
    kernel_size: int | None = None
    seed: int = 0
    # The modules the plan was made for: apply refuses if either has been replaced since.
    _modules: tuple[nn.Module, nn.Module] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._modules = (self.model.get_submodule(self.after), self.model.get_submodule(self.wrap))

    def __str__(self) -> str:
        new = "Residual(layer, act, zero layer)" if self.residual else "identity layer" + (
            " + BatchNorm" if self.batch_norm else "")
        return (f"DeepenPlan: after {self.after!r} (activation: {self.activation}), replace {self.wrap!r} by "
                f"Sequential({self.wrap}, {'act copy, ' if self.act_first else ''}{new}"
                f"{', act copy' if self._act_last else ''}) (init={self.init}, seed={self.seed})")

    @property
    def param_delta(self) -> int:
        """How many parameters the plan adds."""
        after = self.model.get_submodule(self.after)
        spec = layer_spec(after)
        assert spec is not None and spec.identity is not None
        n, nd = getattr(after, spec.out_attr), after.weight.dim() - 2
        k = identity_kernel_size(after, self.kernel_size) ** nd if nd > 0 else 1
        one = n * n * k + (n if after.bias is not None else 0)
        return 2 * one if self.residual else one + (2 * n if self.batch_norm else 0)

    @property
    def _act_last(self) -> bool:
        return self.activation is not None and not self.act_first and not self.residual

    def apply(self, optimizer: Optimizer | None = None, *, state: str = "carry") -> Growth:
        """Insert the block; with ``optimizer``, add the new parameters to the group of ``after``."""
        from autogrow.optim import apply_with_optimizer

        return apply_with_optimizer(self.model, self._apply, optimizer, state)

    def _apply(self) -> Growth:
        after, wrapped = self._modules
        try:
            current = (self.model.get_submodule(self.after), self.model.get_submodule(self.wrap))
        except AttributeError:
            current = None
        if current is None or current[0] is not after or current[1] is not wrapped:
            raise AutogrowError("plan: the model changed since the plan was made; make a new plan")
        gen = torch.Generator().manual_seed(self.seed)
        new = self._build(after, gen)
        if self.act_first:
            new.insert(0, self.act_factory())
        if self._act_last:
            new.append(self.act_factory())
        seq = nn.Sequential(wrapped, *new)
        seq.train(wrapped.training)
        old_names = [n for n, _ in wrapped.named_parameters()]
        parent_name, _, child = self.wrap.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, seq)
        prefix = f"{self.wrap}."
        renames = {f"{prefix}{n}": f"{prefix}0.{n}" for n in old_names}
        anchor = next(n for n, p in self.model.named_parameters() if p is after.weight)
        new_params = {f"{prefix}{i + 1}.{n}": anchor for i, m in enumerate(new) for n, _ in m.named_parameters()}
        return Growth(
            kind="deepen", target=self.after, seed=self.seed,
            options={"init": self.init, "residual": self.residual, "batch_norm": self.batch_norm,
                     "kernel_size": self.kernel_size, "layer": type(after).__name__, "wrap": self.wrap},
            renames=renames, new_params=new_params,
        )

    def _build(self, after: nn.Module, gen: torch.Generator) -> list[nn.Module]:
        spec = layer_spec(after)
        assert spec is not None and spec.identity is not None
        layer = spec.identity(after, self.kernel_size)
        if self.residual:
            first, last = layer, spec.identity(after, self.kernel_size)
            _random_init(first, gen)
            with torch.no_grad():  # the block starts as x + 0
                for p in last.parameters():
                    p.zero_()
            if self.init == "random":
                _random_init(last, gen)
            return [Residual(nn.Sequential(first, self.act_factory(), last))]
        if self.init == "random":
            _random_init(layer, gen)
        out = [layer]
        if self.batch_norm:
            out.append(_identity_batch_norm(layer))
        return out


def _random_init(m: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default init (uniform, bound 1/sqrt(fan_in)) drawn from ``gen``, not the global RNG."""
    w = m.weight
    bound = 1.0 / math.sqrt(w[0].numel())
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)


def _identity_batch_norm(layer: nn.Module) -> nn.Module:
    nd = layer.weight.dim() - 2
    cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
    n = layer.weight.shape[0]
    bn = cls(n, device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():  # (x - 0) / sqrt(1 - eps + eps) * 1 + 0 = x in eval mode
        bn.running_var.fill_(1.0 - bn.eps)
    return bn


def _next_op(node: fx.Node) -> fx.Node | None:
    users = [u for u in node.users if not _is_shape_query(u)]
    return users[0] if len(users) == 1 else None


def plan_deepen(model: nn.Module, after: str, *, init: str = "identity", residual: bool = False,
                batch_norm: bool = False, kernel_size: int | None = None,
                generator: torch.Generator | int | None = None) -> DeepenPlan:
    """Plan inserting a new layer after module ``after`` (a ``Linear`` or ``ConvNd``).

    Args:
        init: ``"identity"`` (Net2DeeperNet, exact) or ``"random"`` (the random-init baseline).
        residual: insert ``x + f(x)`` (f's last layer zero) instead of a bare identity layer:
            exact after any activation; required after non-idempotent ones (GELU, tanh, ...).
        batch_norm: add a BatchNorm after the new layer, initialised to the identity in eval mode
            (in training mode it normalises with batch statistics and is not exact).
        kernel_size: kernel of a new conv layer (odd; default: ``after``'s, made odd).
        generator: a ``torch.Generator`` or int seed for random weights; ``None``: from the OS.

    Example:
        >>> import torch, torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(5, 4); y = net(x)
        >>> g = autogrow.deepen(net, "0", generator=0)
        >>> bool(torch.equal(net(x), y)), list(g.new_params)
        (True, ['1.1.weight', '1.1.bias'])
    """
    if init not in INITS:
        raise AutogrowError(f"init: {init!r} is not one of {INITS}")
    if kernel_size is not None and (not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0):
        raise AutogrowError(f"kernel_size: expected an odd int >= 1 or None, got {kernel_size!r}")
    graph = trace(model)
    sites = call_sites(graph)
    if after not in sites:
        names = [n for n, m in model.named_modules() if getattr(layer_spec(m), "identity", None)]
        raise AutogrowError(f"after: {after!r} is not a module called in forward; layers that can be deepened: {names}")
    module = model.get_submodule(after)
    spec = layer_spec(module)
    if spec is None or spec.identity is None:
        raise AutogrowError(f"after: {after!r} is a {type(module).__name__}, which has no identity construction; "
                            "deepen after a Linear or ConvNd, or register one with autogrow.register_layer")
    if len(sites[after]) != 1:
        raise AutogrowError(f"after: {after!r} is called {len(sites[after])} times in forward (shared weights); "
                            "a layer inserted after it would change every call")
    # Walk past channel-wise layers (BatchNorm) to the activation, if any.
    prev = sites[after][0]
    while (nxt := _next_op(prev)) is not None and nxt.op == "call_module" and \
            channel_spec(model.get_submodule(nxt.target)) is not None and len(sites[nxt.target]) == 1:
        prev = nxt
    act = _next_op(prev)
    kind = _activation_kind(model, act)
    if kind is None:
        act = None
    if kind == "other" and not residual:
        raise AutogrowError(
            f"after: {after!r} is followed by {describe(act, model)}, which is not idempotent (phi(phi(v)) != phi(v)), "
            "so an identity layer after it would change the function; pass residual=True for an exact "
            "x + f(x) block, or init='random' with residual=True for the baseline")
    act_module_once = act is not None and act.op == "call_module" and len(sites[act.target]) == 1
    if act_module_once:
        wrap, act_first = act.target, False
        factory = _copier(model.get_submodule(act.target))
    else:
        wrap, act_first = prev.target, act is not None and not residual
        if act is None:
            factory = nn.ReLU  # only used inside a residual body
        elif act.op == "call_module":
            factory = _copier(model.get_submodule(act.target))
        else:
            factory = FUNCTION_MODULES.get(act.target, nn.ReLU)
    return DeepenPlan(model, after, wrap, describe(act, model) if act is not None else None, act_first, factory,
                      init, bool(residual), bool(batch_norm), kernel_size, make_seed(generator))


def _copier(m: nn.Module):  # noqa: ANN202
    return lambda: copy.deepcopy(m)


def _activation_kind(model: nn.Module, node: fx.Node | None) -> str | None:
    """"idempotent", "other" (a non-idempotent activation) or None (no activation follows)."""
    if node is None:
        return None
    if node.op == "call_module":
        m = model.get_submodule(node.target)
        if not is_elementwise(m) or isinstance(m, _NOT_ACTIVATIONS):
            return None
        return "idempotent" if is_idempotent(m) else "other"
    if node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
        plain = len(node.args) == 1 and set(node.kwargs) <= {"inplace"}  # F.relu6(x) yes; hardtanh(x, a, b) no
        if node.target in IDEMPOTENT_FUNCTIONS and plain:
            return "idempotent"
        return None if node.target not in FUNCTION_MODULES else "other"
    if node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
        if node.target in IDEMPOTENT_METHODS:
            return "idempotent"
        return "other" if node.target in FUNCTION_MODULES else None
    return None


def deepen(model: nn.Module, after: str, *, optimizer: Optimizer | None = None, state: str = "carry",
           **kwargs: object) -> Growth:
    """:func:`plan_deepen` then apply; returns the :class:`Growth` record.

    Example:
        >>> import torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 2))
        >>> autogrow.deepen(net, "0", generator=0).summary()
        'deepen after 0: new Conv2d (identity), 2 new parameters'
    """
    return plan_deepen(model, after, **kwargs).apply(optimizer, state=state)  # type: ignore[arg-type]
