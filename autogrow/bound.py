"""Sizes a forward reads from its module's attributes (``self.num_heads``, ``self.split_size``).

Model code written for a fixed size often keeps it in an attribute set in ``__init__``: timm's attention reshapes
its fused q/k/v with ``reshape(B, N, 3, self.num_heads, self.head_dim)``, GPT-2's splits it with
``split(self.split_size, dim=2)``. To torch.fx and to the recorder these are plain ints, sizes fixed in the code,
so widening the heads was refused. While autogrow traces a model, every int attribute of a module that has
children (the code composing layers, not a layer itself) is swapped for a :class:`BoundSize`: the same int,
remembering which attribute held it. A layout rule that meets one where the widened units need another value
(the number of heads after adding heads, a fused output's part size) asks for it to be *rebound*
(``Context.rebind``); size expressions computed from it (``C // self.n_head``) are then evaluated with the new
value. The plan writes the new value into the attribute with the new tensors (an undo puts the old one back, a
shrink and a replayed record write theirs), and the grown model is checked on the example inputs like any growth.
Nothing else is rebound: a head size stays what it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn

__all__ = ["BoundSize", "bound_sizes"]


class BoundSize(int):
    """An int held in attribute ``attr`` of module ``owner`` (its name in the traced model)."""

    owner: str
    attr: str

    def __new__(cls, value: int, owner: str, attr: str) -> BoundSize:
        out = int.__new__(cls, value)
        out.owner, out.attr = owner, attr
        return out

    def __reduce__(self) -> tuple:  # deep copies and pickles of a graph keep where the size came from
        return BoundSize, (int(self), self.owner, self.attr)


def _defer(name: str) -> object:
    base = getattr(int, name)

    def op(self: BoundSize, other: object) -> object:
        if type(other) not in (int, bool, BoundSize) and isinstance(other, int):
            return NotImplemented  # another int that tracks its origin (a size read from a tensor): it computes
        return base(self, other)
    return op


for _name in ("add", "sub", "mul", "floordiv", "truediv", "mod", "pow"):
    for _n in (f"__{_name}__", f"__r{_name}__"):
        setattr(BoundSize, _n, _defer(_n))


@contextlib.contextmanager
def bound_sizes(model: nn.Module) -> Iterator[None]:
    """Within the block, the int attributes (not bools) of ``model``'s modules that have children are
    :class:`BoundSize`\\ s; afterwards they are the plain ints they were (or what the forward wrote meanwhile).

    Example:
        >>> import torch.nn as nn
        >>> block = nn.Sequential(nn.Linear(4, 4)); block.heads = 2
        >>> with bound_sizes(block):
        ...     (type(block.heads).__name__, block.heads.owner, block.heads.attr, block.heads + 1)
        ('BoundSize', '', 'heads', 3)
        >>> type(block.heads).__name__
        'int'
    """
    swapped: list[tuple[nn.Module, str, int, BoundSize]] = []
    for name, module in model.named_modules():
        if next(iter(module.children()), None) is None:
            continue
        for attr, value in list(vars(module).items()):
            if type(value) is int:  # written into the instance dict: no property setter runs
                bound = BoundSize(value, name, attr)
                swapped.append((module, attr, value, bound))
                vars(module)[attr] = bound
    try:
        yield
    finally:
        for module, attr, value, bound in swapped:
            if vars(module).get(attr) is bound:  # a value the forward wrote meanwhile (a counter) stays
                vars(module)[attr] = value
