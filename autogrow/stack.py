"""Deeper by whole blocks: insert a copy of a residual block right after it, starting as the identity.

A pre-norm residual block computes ``x + f(x)`` (often twice: attention, then MLP). Its copy with
every layer that writes into the residual stream set to zero computes ``x + 0``: inserting it keeps
the function exactly (the depth growth of staged training, bert2BERT, G_stack). Which layers write
into the stream is read off the traced graph: a layer of the block whose output is coupled (by the
residual adds) to layers outside the block. The copy goes into the block's parent ``nn.ModuleList`` or
``nn.Sequential``; later blocks shift by one (the growth record lists the renamed parameters). The
insertion is checked on example inputs (required), so a post-norm block (``LN(x + f(x))``, not the
identity with zero branches) is refused, not inserted wrongly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.optim import Optimizer

from autogrow.capture import traced
from autogrow.coupling import couple
from autogrow.errors import AutogrowError, NeedsShapes, check, check_choice, fail
from autogrow.growth import Growth, make_seed
from autogrow.plan import Plan, Undo, register_plan
from autogrow.registry import layer_spec
from autogrow.trace import call_sites, unwrap

__all__ = ["INITS", "StackPlan", "plan_stack", "stack"]

INITS = ("copy", "random", "duplicate")


@dataclass(kw_only=True)
class StackPlan(Plan):
    """Insert a copy of block ``block`` after it, its stream-writing layers at zero."""

    kind = "stack"
    model: nn.Module = field(repr=False)
    block: str
    zeroed: list[str]  # layers of the block (relative names) whose copies start at zero
    init: str = "copy"
    seed: int = 0
    example_inputs: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        parent, _, index = self.block.rpartition(".")
        return (f"StackPlan: insert a copy of {self.block!r} as {parent}.{int(index) + 1} (init={self.init}), "
                f"zero-initialised: {self.zeroed}")

    @property
    def param_delta(self) -> int:
        return sum(p.numel() for p in self.model.get_submodule(self.block).parameters())

    @property
    def exact(self) -> bool:
        return self.init != "duplicate"

    def _apply(self, undo: Undo) -> Growth:
        parent_name, _, index = self.block.rpartition(".")
        parent, i = self.model.get_submodule(parent_name), int(index)
        new = copy.deepcopy(parent[i])
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            if self.init == "random":
                for m in new.modules():
                    if layer_spec(m) is not None:
                        bound = 1.0 / math.sqrt(max(1, m.weight[0].numel()))
                        for p in m.parameters(recurse=False):
                            p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
            for name in self.zeroed if self.init != "duplicate" else ():
                for p in new.get_submodule(name).parameters():
                    p.zero_()
        old_names = [n for n, _ in self.model.named_parameters()]
        undo.save(parent)
        modules = list(parent)
        modules.insert(i + 1, new)
        _refill(parent, modules)
        renames = _renames(parent_name, i, len(modules), old_names)
        anchor = {f"{parent_name}.{i + 1}.{n}": f"{parent_name}.{i}.{n}" for n, _ in new.named_parameters()}
        return Growth(kind=self.kind, target=self.block, seed=self.seed,
                      options={"init": self.init, "zeroed": list(self.zeroed)}, renames=renames,
                      new_params={k: renames.get(v, v) for k, v in anchor.items()})

    @classmethod
    def summarize(cls, record: Growth) -> str:
        duplicate = record.options.get("init") == "duplicate"
        how = "an unmodified duplicate" if duplicate else "a copy starting as the identity"
        return f"stack after {record.target}: {how}, {len(record.new_params)} new parameters"

    @classmethod
    def replay(cls, model: nn.Module, record: Growth) -> Growth:
        o = record.options
        model, block = unwrap(model, record.target)
        plan = StackPlan(model=model, block=block, zeroed=list(o["zeroed"]), init=o["init"], seed=record.seed)
        return plan.apply()


register_plan(StackPlan)


def _refill(parent: nn.Module, modules: list[nn.Module]) -> None:
    """Give a ModuleList / Sequential the modules ``modules``, named 0..n-1 (in place)."""
    for key in list(parent._modules):
        del parent._modules[key]
    for j, m in enumerate(modules):
        parent._modules[str(j)] = m


def _renames(parent: str, i: int, n: int, old_names: list[str]) -> dict[str, str]:
    """Parameters of the blocks after ``i`` move up by one index."""
    out = {}
    prefix = f"{parent}." if parent else ""
    for name in old_names:
        if not name.startswith(prefix):
            continue
        head, _, rest = name[len(prefix):].partition(".")
        if head.isdigit() and int(head) > i:
            out[name] = f"{prefix}{int(head) + 1}.{rest}"
    return out


def _stream_writers(model: nn.Module, block: str, example_inputs: Any) -> list[str]:
    """Layers of ``block`` whose outputs are coupled to layers outside it: they write into the stream."""
    graph, shapes = traced(model, example_inputs)
    sites = call_sites(graph)
    module = model.get_submodule(block)
    out = []
    for rel, m in module.named_modules():
        name = f"{block}.{rel}"
        if rel and layer_spec(m) is not None and name in sites:
            try:
                c = couple(model, name, None, graph=graph, shapes=shapes)
            except AutogrowError:
                continue  # a layer whose output cannot be followed: not a residual writer we can zero
            if any(not p.startswith(f"{block}.") for p in c.producers):
                out.append(rel)
    return out


def plan_stack(model: nn.Module, block: str, *, init: str = "copy", example_inputs: Any = None,
               generator: torch.Generator | int | None = None) -> StackPlan:
    """Plan inserting a copy of residual block ``block`` (an item of a ModuleList/Sequential) after it.

    Args:
        block: e.g. ``"blocks.3"``.
        init: ``"copy"`` (the block's weights; the stream-writing layers at zero) or ``"random"`` (fresh
            weights drawn from ``generator``; the stream-writing layers at zero): both exact; or ``"duplicate"``
            (G_stack, Du et al. 2024: an unmodified copy, writes included; the function changes, so it is not
            verified against the old outputs, only that the grown model runs).
        example_inputs: a batch: required, to find the stream and check the insertion.

    Raises:
        AutogrowError: ``block`` is not an item of a ModuleList/Sequential, writes nothing into a residual
            stream, or (at apply) its zero-branch copy is not the identity (a post-norm block).

    Example:
        >>> import torch, torch.nn as nn, autogrow
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.ln, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.fc(torch.relu(self.ln(x)))
        >>> net = nn.Sequential(nn.Linear(3, 4), Block(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3); y = net(x)
        >>> g = autogrow.stack(net, "1", example_inputs=x, generator=0)
        >>> len(net), g.options["zeroed"], float((net(x) - y).abs().max()) < 1e-6
        (4, ['fc'], True)
    """
    check_choice("init", init, INITS)
    seed = make_seed(generator)
    model, block = unwrap(model, block)
    parent_name, _, index = block.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    check("block", block, isinstance(parent, (nn.ModuleList, nn.Sequential)) and index.isdigit()
          and int(index) < len(parent), "an item of an nn.ModuleList or nn.Sequential, such as 'blocks.0'")
    if example_inputs is None:
        raise NeedsShapes(f"block: stacking {block!r} needs example_inputs, to find the layers that write into the "
                          "residual stream and to check the new block starts as the identity")
    zeroed = _stream_writers(model, block, example_inputs)
    if not zeroed:
        fail(f"block: {block!r} writes nothing into a residual stream that autogrow can follow (no layer of it is "
             "coupled to layers outside it), so a copy cannot start as the identity")
    return StackPlan(model=model, block=block, zeroed=zeroed, init=init, seed=seed, example_inputs=example_inputs)


def stack(model: nn.Module, block: str, *, optimizer: Optimizer | None = None, state: str = "carry",
          **kwargs: Any) -> Growth:
    """:func:`plan_stack` then apply; returns the :class:`~autogrow.Growth` record."""
    return plan_stack(model, block, **kwargs).apply(optimizer, state=state)
