"""Net2WiderNet: give a layer more units without changing what the network computes.

New unit j > n copies a random old unit g(j) (its incoming weights, bias and normalisation entries);
every consumer's weights from unit g(j)'s copies are split so that they sum to the old weight:
evenly (divided by the replication count, as in the paper) or, with ``split > 0``, unevenly, which
is still exact and also breaks the symmetry between copies. ``noise > 0`` adds keras-style noise to
the copies' outgoing weights instead: that is *not* exact. ``init="random"`` is the baseline: new
units get random incoming and outgoing weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.optim import Optimizer

from autogrow.errors import AutogrowError
from autogrow.graph import BASE, CatMap, CouplingWalk
from autogrow.growth import Growth, Transform, UnitMap, make_seed
from autogrow.registry import channel_spec, layer_spec

INITS = ("net2wider", "random")
MAPPINGS = ("auto", "random", "uniform")


@dataclass
class TensorChange:
    """One parameter or buffer of one module and how it is re-indexed."""

    module: str
    tensor: str
    is_param: bool
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    transforms: list[Transform]
    fill: float | None = None  # value of brand-new normalisation entries (init="random")

    @property
    def name(self) -> str:
        return f"{self.module}.{self.tensor}" if self.module else self.tensor


@dataclass
class WidenPlan:
    """Everything :func:`plan_widen` decided; printing it shows every change. Nothing is changed yet."""

    model: nn.Module = field(repr=False)
    target: str
    old_width: int
    width: int
    init: str
    noise: float
    split: float
    mapping: str
    seed: int
    maps: dict[str, UnitMap] = field(repr=False)
    producers: list[str]
    channelwise: list[str]
    consumers: list[str]
    changes: list[TensorChange] = field(repr=False)
    attrs: list[tuple[str, str, int]] = field(repr=False)  # (module, attribute, new value)

    @property
    def param_delta(self) -> int:
        """How many parameters the plan adds."""
        return sum(math.prod(c.new_shape) - math.prod(c.old_shape) for c in self.changes if c.is_param)

    def __str__(self) -> str:
        base = self.maps[BASE]
        counts = torch.bincount(base.idx[~base.fresh], minlength=self.old_width) if not base.fresh.all() else None
        lines = [f"WidenPlan: {self.target!r} {self.old_width} -> {self.width} units (init={self.init}, "
                 f"mapping={self.mapping}, split={self.split}, noise={self.noise}, seed={self.seed})"]
        if self.init == "net2wider" and counts is not None:
            lines.append(f"  new units copy old units {base.idx[self.old_width:].tolist()[:16]}"
                         f"{' ...' if self.width - self.old_width > 16 else ''}; "
                         f"replication counts {counts.min().item()}..{counts.max().item()}")
        lines.append(f"  producers (output grows): {self.producers}")
        if self.channelwise:
            lines.append(f"  channel-wise (entries copied): {self.channelwise}")
        lines.append(f"  consumers (input grows): {self.consumers}")
        for c in self.changes:
            how = ", ".join(f"dim {t.dim} {t.role}" + (f" x{t.block} block" if t.block > 1 else "")
                            for t in c.transforms)
            lines.append(f"    {c.name}: {list(c.old_shape)} -> {list(c.new_shape)} ({how})")
        return "\n".join(lines)

    def apply(self, optimizer: Optimizer | None = None, *, state: str = "carry") -> Growth:
        """Perform the plan; with ``optimizer``, carry (or ``state="reset"``) its state across.

        The optimizer is checked before the model is touched: a refusal changes nothing.
        """
        from autogrow.optim import apply_with_optimizer

        return apply_with_optimizer(self.model, self._apply, optimizer, state)

    def _apply(self) -> Growth:
        modules = dict(self.model.named_modules())
        current = {c.name: getattr(modules[c.module], c.tensor) for c in self.changes}
        for c in self.changes:
            if current[c.name] is None or tuple(current[c.name].shape) != c.old_shape:
                raise AutogrowError(f"plan: {c.name} changed since the plan was made "
                                    f"({c.old_shape} planned); make a new plan")
        gen = torch.Generator().manual_seed(self.seed + 1)  # weights' randomness, apart from the maps'
        new: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for c in self.changes:
                new[c.name] = self._transform(current[c.name].detach(), c, gen)
        # Nothing above touched the model; from here on only assignments, which cannot fail.
        old_params: dict[str, torch.Tensor] = {}
        for c in self.changes:
            m, old = modules[c.module], current[c.name]
            if c.is_param:
                old_params[c.name] = old
                setattr(m, c.tensor, nn.Parameter(new[c.name], requires_grad=old.requires_grad))
            else:
                m._buffers[c.tensor] = new[c.name]
        for mod, attr, value in self.attrs:
            if attr == "__channel__":
                channel_spec(modules[mod]).attr_update(modules[mod], value)  # type: ignore[union-attr]
            else:
                setattr(modules[mod], attr, value)
        growth = Growth(
            kind="widen", target=self.target, seed=self.seed,
            options={"width": self.width, "old_width": self.old_width, "init": self.init, "noise": self.noise,
                     "split": self.split, "mapping": self.mapping},
            maps=dict(self.maps),
            params={c.name: c.transforms for c in self.changes if c.is_param},
            buffers=[c.name for c in self.changes if not c.is_param],
            replaced=old_params,
        )
        return growth

    def _transform(self, t: torch.Tensor, c: TensorChange, gen: torch.Generator) -> torch.Tensor:
        needs_std = self.noise > 0 or self.init == "random"  # a full pass over t: only when used
        std = float(t.float().std()) if needs_std and t.numel() > 1 else 0.0
        for tr in c.transforms:
            um = self.maps[tr.map].expand(tr.block)
            n_old = t.shape[tr.dim]
            t = um.take(t, tr.dim)
            if tr.role == "in" and um.scaled:
                t.mul_(um.along(um.scale.to(t.dtype), t, tr.dim))
            if tr.role == "in" and self.noise > 0 and t.shape[tr.dim] > n_old:
                copies = t.narrow(tr.dim, n_old, t.shape[tr.dim] - n_old)
                eps = torch.randn(copies.shape, generator=gen).to(t.device, t.dtype) * (self.noise * std)
                t = torch.cat([t.narrow(tr.dim, 0, n_old), copies + eps], dim=tr.dim)
            if bool(um.fresh.any()):
                mask = um.along(um.fresh, t, tr.dim).expand_as(t)
                if c.fill is not None:
                    rnd = torch.full(t.shape, c.fill, dtype=t.dtype, device=t.device)
                elif t.dim() == 1:
                    rnd = torch.zeros_like(t)  # random padding: new biases start at zero
                else:
                    rnd = (torch.randn(t.shape, generator=gen) * std).to(t.device, t.dtype)
                t = torch.where(mask, rnd, t)
        return t


def _draw(n: int, width: int, init: str, mapping: str, split: float, gen: torch.Generator) -> UnitMap:
    if init == "random":
        idx = torch.cat([torch.arange(n), torch.zeros(width - n, dtype=torch.long)])
        fresh = torch.arange(width) >= n
        return UnitMap(idx, torch.ones(width, dtype=torch.float64), fresh)
    if mapping == "uniform":
        idx = torch.arange(n).repeat(width // n)
    else:  # the paper's g: j <= n -> j, j > n -> uniform over the old units
        idx = torch.cat([torch.arange(n), torch.randint(0, n, (width - n,), generator=gen)])
    if split > 0:
        r = 1 + split * (2 * torch.rand(width, generator=gen, dtype=torch.float64) - 1)
        denom = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, r)
        scale = r / denom[idx]  # shares of each old unit sum to exactly 1
    else:
        counts = torch.bincount(idx, minlength=n).to(torch.float64)
        scale = 1.0 / counts[idx]
    return UnitMap(idx, scale, torch.zeros(width, dtype=torch.bool))


def plan_widen(model: nn.Module, target: str, width: int, *, init: str = "net2wider", noise: float = 0.0,
               split: float = 0.0, mapping: str = "auto",
               generator: torch.Generator | int | None = None) -> WidenPlan:
    """Plan giving module ``target`` ``width`` output units, and every coupled layer what follows.

    Args:
        model: any ``nn.Module`` whose forward torch.fx can trace.
        target: name of a ``Linear``/``ConvNd``/``Embedding`` (or registered) module.
        width: the new number of units; larger than the current one.
        init: ``"net2wider"`` (function-preserving) or ``"random"`` (random padding baseline).
        noise: keras-style noise on the copies' outgoing weights, relative to their std (inexact).
        split: 0 splits a unit's outgoing weights evenly between its copies; ``0 < split < 1``
            draws uneven shares ``(1 +- split)`` that still sum to 1 (exact, breaks symmetry).
        mapping: ``"random"`` (the paper), ``"uniform"`` (each unit replicated width/n times;
            needed for LayerNorm), or ``"auto"`` (uniform only when a LayerNorm requires it).
        generator: a ``torch.Generator`` or int seed; ``None`` draws a seed from the OS.

    Example:
        >>> import torch, torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> plan = autogrow.plan_widen(net, "0", 12, generator=0)
        >>> plan.consumers
        ['2']
        >>> x = torch.randn(5, 4); y = net(x)
        >>> _ = plan.apply()
        >>> bool(torch.allclose(net(x), y, atol=1e-6)), net[0].out_features
        (True, 12)
    """
    if init not in INITS:
        raise AutogrowError(f"init: {init!r} is not one of {INITS}")
    if mapping not in MAPPINGS:
        raise AutogrowError(f"mapping: {mapping!r} is not one of {MAPPINGS}")
    if not isinstance(width, int) or isinstance(width, bool):
        raise AutogrowError(f"width: expected an int, got {width!r}")
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise AutogrowError(f"noise: expected a float >= 0, got {noise!r}")
    if not (isinstance(split, (int, float)) and 0 <= split < 1):
        raise AutogrowError(f"split: expected a float in [0, 1), got {split!r}")
    walk = CouplingWalk(model, target).run()
    n = walk.old_width
    assert n is not None
    if width <= n:
        raise AutogrowError(f"width: {width} is not larger than {target!r}'s current {n} units")
    if walk.uniform_only and init == "net2wider":
        if mapping == "random" or width % n:
            raise AutogrowError(
                f"width: widening {target!r} reaches {walk.uniform_only}, which normalise over the units and "
                f"stay exact only if every unit is copied equally often: use mapping='uniform' (or 'auto') and "
                f"a width that is a multiple of {n}, not {width} with mapping={mapping!r}")
        mapping = "uniform"
    elif mapping == "auto":
        mapping = "random"
    if mapping == "uniform" and width % n:
        raise AutogrowError(f"width: mapping='uniform' needs a multiple of {n}, got {width}")
    seed = make_seed(generator)
    maps = {BASE: _draw(n, width, init, mapping, float(split), torch.Generator().manual_seed(seed))}
    for key, cm in walk.maps.items():
        if isinstance(cm, CatMap):
            maps[key] = UnitMap.cat([(maps[k] if k else UnitMap.identity(w), w) for k, w in cm.parts])

    modules = dict(model.named_modules())
    by_name: dict[str, TensorChange] = {}
    attrs: list[tuple[str, str, int]] = []

    def add(mod: str, tname: str, tr: Transform, fill: float | None = None) -> None:
        t = getattr(modules[mod], tname, None)
        if t is None:  # bias=False, affine=False, track_running_stats=False
            return
        key = f"{mod}.{tname}" if mod else tname
        if key not in by_name:
            by_name[key] = TensorChange(mod, tname, isinstance(t, nn.Parameter), tuple(t.shape), tuple(t.shape),
                                        [], fill)
        ch = by_name[key]
        ch.transforms.append(tr)
        shape = list(ch.new_shape)
        shape[tr.dim] = len(maps[tr.map].idx) * tr.block
        ch.new_shape = tuple(shape)

    for mod, key in walk.producers.items():
        spec = layer_spec(modules[mod])
        for tname, d in spec.out_params.items():
            add(mod, tname, Transform(d, key, "out"))
        attrs.append((mod, spec.out_attr, len(maps[key].idx)))
    for mod, key in walk.channelwise.items():
        cspec = channel_spec(modules[mod])
        for tname, fill in cspec.tensors.items():
            add(mod, tname, Transform(0, key, "out"), fill if init == "random" else None)
        attrs.append((mod, "__channel__", len(maps[key].idx)))
        if mod in walk.uniform_only and init == "net2wider":
            counts = torch.bincount(maps[key].idx)
            if not bool((counts == counts[0]).all()):
                raise AutogrowError(f"target: {mod!r} normalises a concatenation in which only some units are "
                                    f"copied; LayerNorm stays exact only under uniform replication")
    for mod, (key, flat) in walk.consumers.items():
        spec = layer_spec(modules[mod])
        block = getattr(modules[mod], spec.in_attr) // walk.width(key) if flat else 1
        for tname, d in spec.in_params.items():
            add(mod, tname, Transform(d, key, "in", block))
        attrs.append((mod, spec.in_attr, len(maps[key].idx) * block))

    return WidenPlan(model, target, n, width, init, float(noise), float(split), mapping, seed, maps,
                     list(walk.producers), list(walk.channelwise), list(walk.consumers),
                     list(by_name.values()), attrs)


def widen(model: nn.Module, target: str, width: int, *, optimizer: Optimizer | None = None,
          state: str = "carry", **kwargs: object) -> Growth:
    """:func:`plan_widen` then apply; returns the :class:`Growth` record.

    Example:
        >>> import torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> autogrow.widen(net, "0", 16, generator=1).summary()
        'widen 0: 8 -> 16 units (net2wider), 3 parameters reshaped'
    """
    return plan_widen(model, target, width, **kwargs).apply(optimizer, state=state)  # type: ignore[arg-type]
