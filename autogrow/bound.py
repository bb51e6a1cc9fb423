"""Sizes a forward reads from its module's attributes (``self.num_heads``, ``self.split_size``).

Model code written for a fixed size often keeps it in an attribute set in ``__init__``: timm's attention reshapes
its fused q/k/v with ``reshape(B, N, 3, self.num_heads, self.head_dim)``, GPT-2's splits it with
``split(self.split_size, dim=2)``. To torch.fx and to the recorder these are plain ints, sizes fixed in the code,
so widening the heads was refused. While autogrow traces a model, every int attribute of a module that has
children (the code composing layers, not a layer itself) is swapped for a :class:`BoundSize`: the same int,
remembering which attribute held it. A layout rule that meets one where the widened units need another value
(the number of heads after adding heads, a fused output's part size) asks for it to be *rebound*
(``Context.rebind``); size expressions computed from it are then evaluated with the new value, whether they are
graph nodes (``C // self.n_head`` with ``C`` read from a tensor) or arithmetic on attributes alone
(``self.num_heads * self.head_dim``: a :class:`BoundExpr`, which remembers how it was computed). Where such a size
would change an axis that must keep its size (Falcon's group size ``self.num_heads // self.num_kv_heads + 2``), an
attribute in it that equals the number of units counts them too (``num_kv_heads``, the key/value groups) and is
rewritten with them. A count of copies of one key/value head (multi-query ``repeat_kv(k,
self.num_key_value_groups)``) becomes the new number of query heads; under SDPA's ``enable_gqa`` nothing reads that
count, and an attribute that may hold it, unread, is refused by name rather than left stale. The plan writes the new
values into the attributes with the new tensors (an undo puts the old ones back, a shrink and a replayed record write
theirs), and the grown model is checked on the example inputs like any growth. Nothing else is rewritten: a head
size stays what it is.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Mapping

import torch.nn as nn

__all__ = ["BoundExpr", "BoundSize", "bound_sizes", "leaves", "resolve"]


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


class BoundExpr(int):
    """An int computed from :class:`BoundSize`\\ s (``self.num_heads * self.head_dim``): it remembers how, so
    that :func:`resolve` recomputes it with the rewritten values."""

    fn: Callable[..., int]
    args: tuple[object, ...]

    def __new__(cls, value: int, fn: Callable[..., int], args: tuple[object, ...]) -> BoundExpr:
        out = int.__new__(cls, value)
        out.fn, out.args = fn, args
        return out

    def __reduce__(self) -> tuple:
        return BoundExpr, (int(self), self.fn, self.args)


def resolve(x: object, rebinds: Mapping[tuple[str, str], int]) -> object:
    """``x`` with the attributes in ``rebinds`` (``(module, attribute) -> value``) rewritten.

        >>> h = BoundSize(2, "attn", "heads")
        >>> resolve(h * 8, {("attn", "heads"): 4}), resolve(h * 8, {})
        (32, 16)
    """
    if isinstance(x, BoundSize):
        return rebinds.get((x.owner, x.attr), int(x))
    if isinstance(x, BoundExpr):
        return x.fn(*(resolve(a, rebinds) for a in x.args))
    return x


def leaves(x: object) -> list[BoundSize]:
    """The attributes ``x`` is computed from (``x`` a size, or a list or tuple of them, as a graph node's arguments).

        >>> h, k = BoundSize(4, "attn", "heads"), BoundSize(2, "attn", "kv")
        >>> [b.attr for b in leaves(h // k + 2)], [b.attr for b in leaves((3, [k], "x"))]
        (['heads', 'kv'], ['kv'])
    """
    if isinstance(x, BoundSize):
        return [x]
    if isinstance(x, (list, tuple)):
        return [b for a in x for b in leaves(a)]
    return [b for a in x.args for b in leaves(a)] if isinstance(x, BoundExpr) else []


def _defer(name: str) -> object:
    base = getattr(int, name)
    reflected = name.startswith("__r")

    def op(self: int, other: object) -> object:
        if type(other) not in (int, bool, BoundSize, BoundExpr) and isinstance(other, int):
            return NotImplemented  # another int that tracks its origin (a size read from a tensor): it computes
        value = base(self, other)
        if value is NotImplemented or not isinstance(value, int):
            return value
        fn = getattr(operator, name.replace("__r", "__", 1).strip("_"))
        return BoundExpr(value, fn, (other, self) if reflected else (self, other))
    return op


for _name in ("add", "sub", "mul", "floordiv", "mod", "pow"):
    for _n in (f"__{_name}__", f"__r{_name}__"):
        setattr(BoundSize, _n, _defer(_n))
        setattr(BoundExpr, _n, _defer(_n))
for _n in ("__truediv__", "__rtruediv__"):  # a float: not a size
    setattr(BoundSize, _n, getattr(int, _n))


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
            if vars(module).get(attr) is bound:
                vars(module)[attr] = value
        for module in model.modules():  # a value the forward wrote meanwhile (a counter) stays, as a plain int
            for attr, value in list(vars(module).items()):
                if isinstance(value, (BoundSize, BoundExpr)):
                    vars(module)[attr] = int(value)
