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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.optim import Optimizer

from autogrow.capture import traced
from autogrow.errors import SHAPES_HINT, UNFUSE_HINT, NeedsShapes, check, check_bool, check_choice, check_int, fail
from autogrow.growth import Growth, make_seed
from autogrow.ops import Op, OpKind, classify
from autogrow.plan import Plan, Undo, register_plan
from autogrow.registry import identity_kernel_size, identity_spec
from autogrow.trace import call_sites, describe, not_called, unwrap

__all__ = ["INITS", "DeepenPlan", "Residual", "deepen", "plan_deepen"]

INITS = ("identity", "random")


class Residual(nn.Module):
    """``x + body(x)``. autogrow inserts it with the body's last layer at zero: the identity."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@dataclass(kw_only=True)
class DeepenPlan(Plan):
    """Where :func:`plan_deepen` will insert what. Nothing is changed until :meth:`apply`."""

    kind = "deepen"
    model: nn.Module = field(repr=False)
    after: str
    wrap: str  # module replaced by Sequential(module, *new)
    activation: str | None  # what follows ``after`` (description), None if nothing
    act_first: bool  # the new block starts with a copy of the activation (wrapping the module before it)
    act_factory: Callable[[], nn.Module] = field(repr=False)
    init: str = "identity"
    residual: bool = False
    batch_norm: bool = False
    kernel_size: int | None = None
    seed: int = 0
    example_inputs: Any = field(default=None, repr=False)
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
        after = self.model.get_submodule(self.after)
        spec = identity_spec(after)
        assert spec is not None and spec.identity is not None
        n, nd = getattr(after, spec.out_attr), after.weight.dim() - 2
        k = identity_kernel_size(after, self.kernel_size) ** nd if nd > 0 else 1
        one = n * n * k + (n if after.bias is not None else 0)
        return 2 * one if self.residual else one + (2 * n if self.batch_norm else 0)

    @property
    def exact(self) -> bool:
        return self.init == "identity"

    @property
    def _act_last(self) -> bool:
        return self.activation is not None and not self.act_first and not self.residual

    def _apply(self, undo: Undo) -> Growth:
        after, wrapped = self._modules
        try:
            current = (self.model.get_submodule(self.after), self.model.get_submodule(self.wrap))
        except AttributeError:
            current = None
        if current is None or current[0] is not after or current[1] is not wrapped:
            fail("plan: the model changed since the plan was made; make a new plan")
        new = self._build(after, torch.Generator().manual_seed(self.seed))
        if self.act_first:
            new.insert(0, self.act_factory())
        if self._act_last:
            new.append(self.act_factory())
        seq = nn.Sequential(wrapped, *new)
        seq.train(wrapped.training)
        old_names = [n for n, _ in wrapped.named_parameters()]
        parent_name, _, child = self.wrap.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        undo.save(parent)
        setattr(parent, child, seq)
        prefix = f"{self.wrap}."
        renames = {f"{prefix}{n}": f"{prefix}0.{n}" for n in old_names}
        anchor = next(n for n, p in self.model.named_parameters() if p is after.weight)
        new_params = {f"{prefix}{i + 1}.{n}": anchor for i, m in enumerate(new) for n, _ in m.named_parameters()}
        return Growth(
            kind=self.kind, target=self.after, seed=self.seed,
            options={"init": self.init, "residual": self.residual, "batch_norm": self.batch_norm,
                     "kernel_size": self.kernel_size, "layer": type(after).__name__, "wrap": self.wrap},
            renames=renames, new_params=new_params,
        )

    def _build(self, after: nn.Module, gen: torch.Generator) -> list[nn.Module]:
        spec = identity_spec(after)
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

    @classmethod
    def summarize(cls, record: Growth) -> str:
        o = record.options
        return f"deepen after {record.target}: new {o['layer']} ({o['init']}), {len(record.new_params)} new parameters"

    @classmethod
    def replay(cls, model: nn.Module, record: Growth) -> Growth:
        o = record.options
        # The BatchNorm's axis was checked when the growth was first applied: no example inputs needed now.
        plan = plan_deepen(model, record.target, init=o["init"], residual=o["residual"], batch_norm=o["batch_norm"],
                           kernel_size=o["kernel_size"], generator=record.seed, _check_axis=False)
        if plan.wrap != o["wrap"]:
            fail(f"growths: deepening after {record.target!r} would wrap {plan.wrap!r}, recorded {o['wrap']!r}; "
                 "the model differs from the recorded one")
        return plan.apply()


register_plan(DeepenPlan)


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


def _next_op(node: fx.Node, model: nn.Module) -> fx.Node | None:
    users = [u for u in node.users if classify(u, model).kind is not OpKind.SHAPE]
    return users[0] if len(users) == 1 else None


def _activation_after(model: nn.Module, sites: dict[str, list[fx.Node]], after: str
                      ) -> tuple[fx.Node, fx.Node | None, Op | None]:
    """(the last node of ``after``'s block, the activation that follows or None, its classification).

    The block is ``after`` and the channel-wise layers (BatchNorm) called once right after it.
    """
    prev = sites[after][0]
    while (nxt := _next_op(prev, model)) is not None and nxt.op == "call_module" and \
            classify(nxt, model).kind is OpKind.CHANNELWISE and len(sites[nxt.target]) == 1:
        prev = nxt
    act = _next_op(prev, model)
    op = classify(act, model) if act is not None else None
    if op is None or op.kind is not OpKind.ELEMENTWISE or op.elementwise is None or not op.elementwise.activation:
        return prev, None, None
    return prev, act, op


def _factory(model: nn.Module, act: fx.Node | None, op: Op | None) -> Callable[[], nn.Module] | None:
    """How to build a copy of the activation (``None``: cannot be copied faithfully)."""
    if act is None:
        return nn.ReLU  # only used inside a residual body
    if act.op == "call_module":
        m = model.get_submodule(act.target)
        return lambda: copy.deepcopy(m)
    return op.factory if op is not None else None


def _check_deepen_args(model: nn.Module, after: str, init: str, residual: bool | None, batch_norm: bool,
                       kernel_size: int | None, sites: dict[str, list[fx.Node]]) -> None:
    check_choice("init", init, INITS)
    if residual is not None:
        check_bool("residual", residual)
    check_bool("batch_norm", batch_norm)
    check("batch_norm", batch_norm, not (batch_norm and residual), "False with residual=True (a residual block "
          "starts as x + 0 and has no BatchNorm)")
    check_int("kernel_size", kernel_size, 1, optional=True)
    check("kernel_size", kernel_size, kernel_size is None or kernel_size % 2 == 1, "an odd int >= 1 or None")
    if after not in sites:
        fail("after: " + not_called(model, after, sites, "growable layers"))
    parent = after.rpartition(".")[0]
    holder = model.get_submodule(parent) if parent else model
    if isinstance(holder, nn.TransformerEncoderLayer) and isinstance(holder.self_attn, nn.MultiheadAttention):
        fail(f"after: {after!r} is in {parent!r}, an nn.TransformerEncoderLayer whose fused fast path (eval mode, "
             "no gradients) reads its weight directly, so a layer after it would break that path (an unfused layer "
             f"skips it). {UNFUSE_HINT}")
    module = model.get_submodule(after)
    spec = identity_spec(module)
    if spec is None or spec.identity is None:
        fail(f"after: {after!r} is a {type(module).__name__}, which has no identity construction; "
             "deepen after a Linear or ConvNd, or register one with autogrow.register_layer")
    check("kernel_size", kernel_size, kernel_size is None or hasattr(module, "kernel_size"),
          f"None: {after!r} is a {type(module).__name__}, which has no kernel")
    if len(sites[after]) != 1:
        fail(f"after: {after!r} is called {len(sites[after])} times in forward (shared weights); "
             "a layer inserted after it would change every call")


def _check_batch_norm_axis(model: nn.Module, site: fx.Node, after: str, shapes: dict[fx.Node, Any] | None) -> None:
    """A new BatchNorm normalises axis 1: the layer's units must sit there (not in a (B, T, C) output)."""
    spec = identity_spec(model.get_submodule(after))
    if spec.out_dim != -1:
        return  # a convolution: channels are axis 1
    if shapes is None:
        raise NeedsShapes(f"batch_norm: True after {after!r} needs example_inputs: a BatchNorm normalises axis 1, "
                          f"which holds {after!r}'s units only if its output is 2-D. {SHAPES_HINT}")
    shape = shapes.get(site)
    check("batch_norm", True, isinstance(shape, tuple) and len(shape) == 2,
          f"False: {after!r}'s output has shape {shape}; a BatchNorm would normalise axis 1, not its units")


def plan_deepen(model: nn.Module, after: str, *, init: str = "identity", residual: bool | None = False,
                batch_norm: bool = False, kernel_size: int | None = None,
                generator: torch.Generator | int | None = None, example_inputs: Any = None,
                _check_axis: bool = True) -> DeepenPlan:
    """Plan inserting a new layer after module ``after`` (a ``Linear`` or ``ConvNd``).

    Args:
        init: ``"identity"`` (Net2DeeperNet, exact) or ``"random"`` (the random-init baseline).
        residual: insert ``x + f(x)`` (f's last layer zero) instead of a bare identity layer:
            exact after any activation; required after non-idempotent ones (GELU, tanh, ...).
            ``None``: a residual block exactly where the activation needs one.
        batch_norm: add a BatchNorm after the new layer, initialised to the identity in eval mode
            (in training mode it normalises with batch statistics and is not exact).
        kernel_size: kernel of a new conv layer (odd; default: ``after``'s, made odd).
        generator: a ``torch.Generator`` or int seed for random weights; ``None``: from the OS.
        example_inputs: a batch (or tuple of forward arguments) on which ``apply`` verifies the result.

    Raises:
        AutogrowError: a bad argument or a place where no layer can be inserted exactly; nothing changes.

    Example:
        >>> import torch, torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(5, 4); y = net(x)
        >>> g = autogrow.deepen(net, "0", generator=0)
        >>> bool(torch.equal(net(x), y)), list(g.new_params)
        (True, ['1.1.weight', '1.1.bias'])
    """
    seed = make_seed(generator)
    model, after = unwrap(model, after)
    graph, shapes = traced(model, example_inputs, shapes=batch_norm and _check_axis)  # run it only to check BN
    sites = call_sites(graph)
    _check_deepen_args(model, after, init, residual, batch_norm, kernel_size, sites)
    if batch_norm and _check_axis:
        _check_batch_norm_axis(model, sites[after][0], after, shapes)
    prev, act, op = _activation_after(model, sites, after)
    factory = _factory(model, act, op)
    idempotent = op is not None and op.elementwise is not None and op.elementwise.idempotent and factory is not None
    if residual is None:
        residual = act is not None and not idempotent
    check("batch_norm", batch_norm, not (batch_norm and residual), "False with a residual block (it starts as "
          f"x + 0 and has no BatchNorm; {after!r} is followed by {describe(act, model) if act else 'no activation'})")
    if act is not None and not idempotent and not residual:
        fail(f"after: {after!r} is followed by {describe(act, model)}, which is not idempotent (phi(phi(v)) != "
             "phi(v)), so an identity layer after it would change the function; pass residual=True for an exact "
             "x + f(x) block, or init='random' with residual=True for the baseline")
    if act is not None and act.op == "call_module" and len(sites[act.target]) == 1:
        wrap, act_first = act.target, False
    else:
        wrap, act_first = prev.target, act is not None and not residual
    return DeepenPlan(model=model, after=after, wrap=wrap,
                      activation=describe(act, model) if act is not None else None, act_first=act_first,
                      act_factory=factory or nn.ReLU, init=init, residual=bool(residual), batch_norm=bool(batch_norm),
                      kernel_size=kernel_size, seed=seed, example_inputs=example_inputs)


def deepen(model: nn.Module, after: str, *, optimizer: Optimizer | None = None, state: str = "carry",
           **kwargs: Any) -> Growth:
    """:func:`plan_deepen` then apply; returns the :class:`~autogrow.Growth` record.

    Example:
        >>> import torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 2))
        >>> autogrow.deepen(net, "0", generator=0).summary()
        'deepen after 0: new Conv2d (identity), 2 new parameters'
    """
    return plan_deepen(model, after, **kwargs).apply(optimizer, state=state)
