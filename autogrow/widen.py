"""Net2WiderNet: give a layer more units without changing what the network computes.

New unit j > n copies a random old unit g(j) (its incoming weights, bias and normalisation entries);
every consumer's weights from unit g(j)'s copies are split so that they sum to the old weight:
evenly (divided by the replication count, as in the paper) or, with ``split > 0``, unevenly, which
is still exact and also breaks the symmetry between copies. ``noise > 0`` adds keras-style noise to
the copies' outgoing weights instead: that is *not* exact. Other initialisers (``init=``) live in
``autogrow.init``; ``"random"`` is the random-padding baseline.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.optim import Optimizer

from autogrow.capture import traced
from autogrow.coupling import Coupling, MapKey, couple, not_single_units
from autogrow.errors import AutogrowError, check, check_choice, check_float, check_int, fail
from autogrow.growth import Growth, Transform, UnitMap, make_seed
from autogrow.init import Fade, Mix, Net2Wider, Ramp, RandomPad, WidenInit, ZeroOut, get_init
from autogrow.optim import NEW_STATES
from autogrow.plan import Plan, Undo, register_plan
from autogrow.ramp import fadeable, is_ramped, ramp_width, rampable, start_ramp
from autogrow.registry import channel_spec, layer_spec
from autogrow.tied import free_tied_readers
from autogrow.trace import unwrap

__all__ = ["MAPPINGS", "TensorChange", "WidenPlan", "plan_widen", "planned_tensors", "resize", "swap_tensors",
           "tie_changes", "unit_features", "widen"]

MAPPINGS = ("auto", "random", "uniform")
DEFAULT_RAMP_STEPS = 100  # init="ramp" without ramp_steps
BASE = "base"  # record key of the mapping drawn for the widened layer itself


def map_name(key: MapKey) -> str:
    """The record key of a coupling's mapping: ``"base"`` or ``"cat:<node>"``."""
    return BASE if key is None else f"cat:{key.name}"


@dataclass
class TensorChange:
    """One parameter or buffer of one module and how it is re-indexed."""

    module: str
    tensor: str
    is_param: bool
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    transforms: list[Transform]
    fill: float | None = None  # a normalisation's neutral value for brand-new entries
    aliases: list[tuple[str, str]] = field(default_factory=list)  # every (module, name) holding a tied tensor

    @property
    def name(self) -> str:
        return f"{self.module}.{self.tensor}" if self.module else self.tensor

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["transforms"] = [asdict(t) for t in self.transforms]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TensorChange:
        return TensorChange(d["module"], d["tensor"], d["is_param"], tuple(d["old_shape"]), tuple(d["new_shape"]),
                            [Transform(**t) for t in d["transforms"]], d["fill"],
                            [tuple(a) for a in d.get("aliases", [])])


@dataclass(kw_only=True)
class WidenPlan(Plan):
    """Everything :func:`plan_widen` decided; printing it shows every change. Nothing is changed yet."""

    kind = "widen"
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
    # (module, how to write the new size into it, the new size)
    resizes: list[tuple[str, str, int]] = field(repr=False)  # (module, "out" | "in" | "channel", new size)
    example_inputs: Any = field(default=None, repr=False)
    new_state: str = "zero"
    ramps: list[str] = field(default_factory=list)  # norms, or readers, that ramp the new units in (autogrow.ramp)
    ramp_steps: int = 0

    @property
    def param_delta(self) -> int:
        return sum(math.prod(c.new_shape) - math.prod(c.old_shape) for c in self.changes if c.is_param)

    @property
    def exact(self) -> bool:
        return get_init(self.init).exact and self.noise == 0

    def __str__(self) -> str:
        base = self.maps[BASE]
        lines = [f"WidenPlan: {self.target!r} {self.old_width} -> {self.width} units (init={self.init}, "
                 f"mapping={self.mapping}, split={self.split}, noise={self.noise}, seed={self.seed})"]
        if base.mix is not None:
            lines.append("  new units: random orthogonal mixtures of the old units (norms see the same statistics)")
        elif not base.fresh.any():
            counts = torch.bincount(base.idx, minlength=self.old_width)
            lines.append(f"  new units copy old units {base.idx[self.old_width:].tolist()[:16]}"
                         f"{' ...' if self.width - self.old_width > 16 else ''}; "
                         f"replication counts {counts.min().item()}..{counts.max().item()}")
        if self.ramps:
            by = "the readers" if isinstance(get_init(self.init), Fade) else "the norms"
            lines.append(f"  ramped in over {self.ramp_steps} steps by {by} {self.ramps}")
        lines.append(f"  producers (output grows): {self.producers}")
        if self.channelwise:
            lines.append(f"  channel-wise (entries copied): {self.channelwise}")
        lines.append(f"  consumers (input grows): {self.consumers}")
        lines += [f"  attribute {m}.{kind.removeprefix('attr:')} = {v}"  # a size the forward reads from it
                  for m, kind, v in self.resizes if kind.startswith("attr:")]
        for c in self.changes:
            how = ", ".join(f"dim {t.dim} {t.role}" + (f" x{t.block} block" if t.block > 1 else "")
                            for t in c.transforms)
            lines.append(f"    {c.name}: {list(c.old_shape)} -> {list(c.new_shape)} ({how})")
        return "\n".join(lines)

    def _apply(self, undo: Undo) -> Growth:
        modules, current = planned_tensors(self.model, self.changes)
        gen = torch.Generator().manual_seed(self.seed + 1)  # weights' randomness, apart from the maps'
        init = get_init(self.init)
        with torch.no_grad():
            new = {c.name: self._transform(current[c.name].detach(), c, init, gen) for c in self.changes}
        replaced = swap_tensors(modules, self.changes, current, new, self.resizes, undo)
        for name in self.ramps:  # saved in undo by swap_tensors: their weights grew; a reader's inputs by blocks
            m = modules[name]
            start_ramp(m, ramp_width(m) * self.old_width // self.width, self.ramp_steps)
        ramp = {"ramps": list(self.ramps), "ramp_steps": self.ramp_steps} if self.ramps else {}
        return Growth(
            kind=self.kind, target=self.target, seed=self.seed,
            options={"width": self.width, "old_width": self.old_width, "init": self.init, "noise": self.noise,
                     "split": self.split, "mapping": self.mapping, "new_state": self.new_state, **ramp},
            maps=dict(self.maps), params={c.name: c.transforms for c in self.changes if c.is_param},
            buffers=[c.name for c in self.changes if not c.is_param], replaced=replaced,
            tensors=[c.to_dict() for c in self.changes], resizes=[list(r) for r in self.resizes])

    def _transform(self, t: torch.Tensor, c: TensorChange, init: WidenInit, gen: torch.Generator) -> torch.Tensor:
        needs_std = self.noise > 0 or init.needs_std  # a full pass over t: only when used
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
                t = torch.where(mask, init.fresh(t, tr.dim, tr.role, c.fill, std, gen, um, tr.block), t)
        return t

    @classmethod
    def summarize(cls, record: Growth) -> str:
        o = record.options
        return (f"widen {record.target}: {o['old_width']} -> {o['width']} units ({o['init']}), "
                f"{len(record.params)} parameters reshaped")

    @classmethod
    def replay(cls, model: nn.Module, record: Growth) -> Growth:
        """The recorded tensors and sizes, re-applied without tracing (records of autogrow 0.1: re-planned).

        Norms that ramped the new units in are left plain (the ramp over): the weights loaded next are what
        counts, and a checkpoint saved during a ramp restores it by name (``restore_history(..., ramps=...)``)."""
        o = record.options
        if record.tensors:
            changes = [TensorChange.from_dict(t) for t in record.tensors]
            resizes = [(m, kind, int(v)) for m, kind, v in record.resizes]
            by_kind = {k: [m for m, kind, _ in resizes if kind == k] for k in ("out", "channel", "in")}
            plan = WidenPlan(model=unwrap(model, "")[0], target=record.target, old_width=o["old_width"],
                             width=o["width"], init=o["init"], noise=o["noise"], split=o["split"], mapping=o["mapping"],
                             seed=record.seed, maps=dict(record.maps), producers=by_kind["out"],
                             channelwise=by_kind["channel"], consumers=by_kind["in"], changes=changes, resizes=resizes,
                             new_state=o.get("new_state", "zero"))  # no ramp: see below
            try:
                return plan.apply()
            except AutogrowError as e:
                fail(f"growths: the widening of {record.target!r} does not fit this model ({e})")
        plan = plan_widen(model, record.target, o["width"], init=o["init"], noise=o["noise"], split=o["split"],
                          mapping=o["mapping"], generator=record.seed)
        if any(not torch.equal(plan.maps[k].idx, m.idx) for k, m in record.maps.items()):
            fail(f"growths: the widening of {record.target!r} does not fit this model "
                 "(its unit mappings differ from the recorded ones)")
        return plan.apply()


register_plan(WidenPlan)


def _choose_mapping(c: Coupling, init: str, mapping: str, width: int) -> str:
    """``mapping="auto"`` is uniform exactly when a LayerNorm needs every unit copied equally often."""
    n = c.old_width
    if isinstance(get_init(init), Mix):
        problem = _mix_problem(c, width)
        if problem:
            fail(problem)
        return "random" if mapping == "auto" else mapping
    if isinstance(get_init(init), Ramp):  # the norms ramp the fresh units in (checked by _ramp_norms)
        _check_groups(c, init, width)
        return "random" if mapping == "auto" else mapping
    fresh = get_init(init).exact and not isinstance(get_init(init), Net2Wider)
    if c.uniform_only and fresh:
        fail(f"init: {init!r} is not allowed for {c.target!r}: it adds fresh units, which would change the statistics "
             f"of {list(c.uniform_only)} (they normalise over the units); use init='net2wider'")
    if c.uniform_only and get_init(init).exact:
        if mapping == "random" or width % n:
            fail(f"width: widening {c.target!r} reaches {list(c.uniform_only)}, which normalise over the units "
                 f"and stay exact only if every unit is copied equally often: use mapping='uniform' (or 'auto') "
                 f"and a width that is a multiple of {n}, not {width} with mapping={mapping!r}")
        mapping = "uniform"
    elif mapping == "auto":
        mapping = "random"
    if mapping == "uniform" and width % n:
        fail(f"width: mapping='uniform' needs a multiple of {n}, got {width}")
    _check_groups(c, init, width)
    return mapping


def _mix_problem(c: Coupling, width: int) -> str | None:
    """Why ``init="mix"`` would not be exact at ``width`` units (``None``: it is). It is exact where the tensor is
    linear up to its norms, and under a norm only when at least as many units are added as there are (the mixing
    must keep each token's mean and mean square)."""
    if c.mix_refusal is not None:
        other = "net2wider" if c.uniform_only else "zero_out"  # what init="auto" picks there
        return f"init: 'mix' is not allowed for {c.target!r}: {c.mix_refusal}; use init={other!r}"
    if c.uniform_only and width < 2 * c.old_width:
        return (f"width: with init='mix', {list(c.uniform_only)} (they normalise over the units) stay exact only "
                f"when {c.target!r} gains at least its {c.old_width} units: at least {2 * c.old_width}, not {width}")
    return None


def _check_groups(c: Coupling, init: str, width: int) -> None:
    """GroupNorm and grouped convs stay exact when fresh units with zero outgoing weights fill whole new groups."""
    if not c.grouped:
        return
    names = list(c.grouped)
    if not isinstance(get_init(init), (ZeroOut, RandomPad)):
        fail(f"init: {init!r} is not allowed for {c.target!r}: {names} act on groups of channels, and a copied "
             "or paired unit in a new group is normalised or convolved differently from its original; use "
             "init='zero_out'")
    size = math.lcm(*c.grouped.values())
    if (width - c.old_width) % size:
        fail(f"width: {width} is not allowed for {c.target!r}: {names} act on groups of "
             f"{sorted(set(c.grouped.values()))} channels, so it grows by whole groups: {c.old_width} + a multiple "
             f"of {size} (e.g. {c.old_width + size})")


def _draw_maps(c: Coupling, width: int, init: str, mapping: str, split: float, seed: int) -> dict[str, UnitMap]:
    gen = torch.Generator().manual_seed(seed)
    maps = {BASE: get_init(init).draw(c.old_width, width, uniform=mapping == "uniform", split=split, gen=gen)}
    for key, cp in c.cats.items():
        parts = [(maps[map_name(k)] if k is not False else UnitMap.identity(w), w) for k, w in cp.parts]
        maps[map_name(key)] = UnitMap.cat(parts)
    return maps


def _changes(model: nn.Module, c: Coupling, maps: dict[str, UnitMap], exact: bool, graph: fx.Graph,
             init: WidenInit) -> tuple[list[TensorChange], list[tuple[str, str, int]]]:
    """Every tensor that changes shape (and how), and every size attribute to update."""
    modules = dict(model.named_modules())
    by_name: dict[str, TensorChange] = {}
    resizes: list[tuple[str, str, int]] = []

    def add(mod: str, tname: str, tr: Transform, fill: float | None = None) -> None:
        t = getattr(modules[mod], tname, None)
        if t is None:  # bias=False, affine=False, track_running_stats=False
            return
        key = f"{mod}.{tname}" if mod else tname
        ch = by_name.setdefault(key, TensorChange(mod, tname, isinstance(t, nn.Parameter), tuple(t.shape),
                                                  tuple(t.shape), [], fill))
        ch.transforms.append(tr)
        shape = list(ch.new_shape)
        shape[tr.dim] = len(maps[tr.map].idx) * tr.block
        ch.new_shape = tuple(shape)

    for mod, key in c.producers.items():
        spec = layer_spec(modules[mod])
        for tname, d in spec.out_params.items():  # whole heads (with their group's query heads) of that many rows
            add(mod, tname, Transform(d, map_name(key), "out", c.block(mod)))
        resizes.append((mod, "out", len(maps[map_name(key)].idx) * c.block(mod)))
    for mod, key in c.channelwise.items():
        cspec, block = channel_spec(modules[mod]), c.channel_blocks.get(mod, 1)  # > 1: entries of whole heads
        for tname, fill in cspec.tensors.items():
            add(mod, tname, Transform(0, map_name(key), "out", block), fill)
        resizes.append((mod, "channel", len(maps[map_name(key)].idx) * block))
        counts = torch.bincount(maps[map_name(key)].idx)
        mixed = maps[map_name(key)].mix is not None  # mixtures keep the statistics; copies must be uniform
        ramped = isinstance(init, Ramp)  # the norm ramps the fresh units in
        if mod in c.uniform_only and exact and not (mixed or ramped) and not bool((counts == counts[0]).all()):
            fail(f"target: {mod!r} normalises a concatenation in which only some units are copied; LayerNorm "
                 "stays exact only under uniform replication")
    for (mod, tname), (key, axis) in c.tensors.items():  # bare parameters: their entries follow the units
        add(mod, tname, Transform(axis, map_name(key), "out"))
    for mod, (key, flat) in c.consumers.items():
        spec = layer_spec(modules[mod])
        block = getattr(modules[mod], spec.in_attr) // c.width(key) if flat else 1
        for tname, d in spec.in_params.items():
            add(mod, tname, Transform(d, map_name(key), "in", block))
        resizes.append((mod, "in", len(maps[map_name(key)].idx) * block))
    if isinstance(init, (Mix, ZeroOut)):  # every new unit fresh: a norm's fill is what its new entries get
        free_tied_readers(model, c, graph, by_name)
    return tie_changes(model, list(by_name.values())), resizes + rebinds(c)


def rebinds(c: Coupling) -> list[tuple[str, str, int]]:
    """The size attributes the widened units change (:mod:`autogrow.bound`), as resizes: (module, "attr:name",
    value)."""
    return [(mod, f"attr:{attr}", value) for (mod, attr), value in c.rebinds.items()]


def tie_changes(model: nn.Module, changes: list[TensorChange]) -> list[TensorChange]:
    """Tied parameters (one Parameter held by several modules) grow once and stay one Parameter.

    Refused when the holders would need different transforms (a tied embedding and output layer on the
    widened axis: one is copied, the other split), or when a holder does not grow at all.
    """
    holders: dict[int, list[tuple[str, str]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, pname))
    canonical = {id(p): n for n, p in model.named_parameters()}
    by_tensor: dict[int, list[TensorChange]] = {}
    for ch in changes:
        t = getattr(model.get_submodule(ch.module), ch.tensor)
        by_tensor.setdefault(id(t), []).append(ch)
    out = []
    for tid, group in by_tensor.items():
        held = holders.get(tid, [])
        first = group[0]
        names = sorted({ch.name for ch in group})
        if any(ch.transforms != first.transforms for ch in group[1:]):
            how = "; ".join(f"{ch.name}: " + ", ".join(f"dim {t.dim} {t.role}" for t in ch.transforms) for ch in group)
            fail(f"target: {' and '.join(names)} are one tied Parameter, but widening would reshape them differently "
                 f"({how}); untie them, or widen a layer whose tensors are not shared")
        grown = {ch.name for ch in group}
        missing = [n for n in (f"{m}.{t}" if m else t for m, t in held) if n not in grown]
        if missing:
            fail(f"target: {first.name} is tied to {missing} (one Parameter), which would not grow with it; "
                 "untie them, or widen a layer whose tensors are not shared")
        if len(held) > 1 and tid in canonical:
            module, _, tensor = canonical[tid].rpartition(".")
            first = TensorChange(module, tensor, first.is_param, first.old_shape, first.new_shape, first.transforms,
                                 first.fill, aliases=[(m, t) for m, t in held])
        out.append(first)
    return out


def planned_tensors(model: nn.Module, changes: list[TensorChange]
                    ) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """The model's modules and the tensors a plan replaces, checked against the shapes it was planned for."""
    modules = dict(model.named_modules())
    current = {c.name: getattr(modules[c.module], c.tensor, None) if c.module in modules else None for c in changes}
    for c in changes:
        if current[c.name] is None or tuple(current[c.name].shape) != c.old_shape:
            fail(f"plan: {c.name} changed since the plan was made ({c.old_shape} planned); make a new plan")
    return modules, current  # type: ignore[return-value]


def swap_tensors(modules: dict[str, nn.Module], changes: list[TensorChange], current: dict[str, torch.Tensor],
                 new: dict[str, torch.Tensor], resizes: list[tuple[str, str, int]], undo: Undo
                 ) -> dict[str, torch.Tensor]:
    """Put the computed tensors in place (fresh Parameters, one per tied group; buffers) and the new sizes into the
    modules, saving each touched module in ``undo`` first; returns the replaced Parameters by name.

    Called once everything that can fail is done: from here on only assignments, which cannot fail.
    """
    holders = {c.name: c.aliases or [(c.module, c.tensor)] for c in changes}
    for name in {m for c in changes for m, _ in holders[c.name]} | {m for m, _, _ in resizes}:
        undo.save(modules[name])
    replaced: dict[str, torch.Tensor] = {}
    for c in changes:
        old = current[c.name]
        if c.is_param:
            replaced[c.name] = old
            param = nn.Parameter(new[c.name], requires_grad=old.requires_grad)
            for mod, tensor in holders[c.name]:  # tied: every holder gets the one new Parameter
                setattr(modules[mod], tensor, param)
        else:
            modules[c.module]._buffers[c.tensor] = new[c.name]
    for mod, kind, value in resizes:
        resize(modules[mod], kind, value)
    return replaced


def resize(module: nn.Module, kind: str, value: int) -> None:
    """Write a new size into a layer's attributes: ``"out"``/``"in"`` units of a weighted layer, or the
    features of a channel-wise one, or ``"attr:<name>"``: a size the forward reads from that attribute."""
    value = int(value)  # a plain int: sizes read from tensors or attributes carry where they came from
    if kind.startswith("attr:"):
        setattr(module, kind.removeprefix("attr:"), value)
    elif kind == "channel":
        channel_spec(module).attr_update(module, value)  # type: ignore[union-attr]
    else:
        spec = layer_spec(module)
        setattr(module, spec.out_attr if kind == "out" else spec.in_attr, value)  # type: ignore[union-attr,arg-type]


def _check_args(init: str, mapping: str, new_state: str, width: int, noise: float, split: float) -> None:
    if init != "auto":
        get_init(init)
    check_choice("mapping", mapping, MAPPINGS)
    check_choice("new_state", new_state, NEW_STATES)
    check_int("width", width)
    check_float("noise", noise, 0.0)
    check_float("split", split, 0.0, 1.0, high_open=True)


def plan_widen(model: nn.Module, target: str, width: int, *, init: str = "net2wider", noise: float = 0.0,
               split: float = 0.0, mapping: str = "auto", generator: torch.Generator | int | None = None,
               example_inputs: Any = None, new_state: str = "zero",
               traced_graph: tuple[fx.Graph, Any] | None = None, ramp_steps: int | None = None) -> WidenPlan:
    """Plan giving module ``target`` ``width`` output units, and every coupled layer what follows.

    Args:
        model: any ``nn.Module`` whose forward torch.fx can trace.
        target: name of a ``Linear``/``ConvNd``/``Embedding`` (or registered) module.
        width: the new number of units; larger than the current one. A layer whose output is split into equal
            parts (a fused q/k/v: ``qkv(x).chunk(3, -1)``) grows every part alike, so ``width`` is a multiple of the
            number of parts (times the head size where the parts are reshaped into heads). One split into unequal
            parts (a multi-query ``c_attn``: ``split((embed_dim, head_dim, head_dim))``) grows the first part that
            can stay exact (the query heads), the others keeping their size: ``width`` counts them too.
        init: a registered initialiser (``autogrow.init``): ``"net2wider"`` (copies, exact), ``"zero_out"``
            (random incoming, zero outgoing weights: new features, exact), ``"vt"`` (variance-transfer pairs,
            exact), ``"mix"`` (random orthogonal mixtures of the old units, exact where the tensor is linear up
            to a LayerNorm/RMSNorm, e.g. a transformer's residual stream), ``"random"`` (random padding
            baseline, inexact), ``"ramp"`` (``"zero_out"`` units that every LayerNorm/RMSNorm over them ramps in
            over ``ramp_steps`` steps: :mod:`autogrow.ramp`, exact), ``"fade"`` (random incoming and outgoing
            weights, faded in by every reader over ``ramp_steps`` steps, for units no norm normalises: exact), or
            ``"auto"``: ``"zero_out"``, or where a
            LayerNorm normalises over the units (fresh units would change its statistics) ``"ramp"`` when
            ``ramp_steps`` is given and the norms can ramp, else ``"mix"``, else ``"net2wider"`` copies.
        noise: keras-style noise on the copies' outgoing weights, relative to their std (inexact).
        split: 0 splits a unit's outgoing weights evenly between its copies; ``0 < split < 1``
            draws uneven shares ``(1 +- split)`` that still sum to 1 (exact, breaks symmetry).
        mapping: ``"random"`` (the paper), ``"uniform"`` (each unit replicated width/n times;
            needed for LayerNorm), or ``"auto"`` (uniform only when a LayerNorm requires it).
        generator: a ``torch.Generator`` or int seed; ``None`` draws a seed from the OS.
        example_inputs: a batch (or tuple of forward arguments): :meth:`~autogrow.plan.Plan.apply`
            then checks the grown model on it and undoes a growth that does not preserve the function.
        new_state: optimizer state of fresh units (``init="zero_out"``/``"vt"``/``"random"``): ``"zero"``, or
            ``"mean"`` (second moments at the old units' mean: no oversized first Adam steps).
        traced_graph: the ``(graph, shapes)`` :func:`autogrow.capture.traced` returned for this model (unwrapped)
            and ``example_inputs``, to skip tracing it again.
        ramp_steps: the length of a ramp in optimizer steps (``init="ramp"``/``"fade"``: default 100); it advances
            with :func:`autogrow.ramp.advance_ramps` (``AutoGrow`` calls it every step).

    Raises:
        AutogrowError: a bad argument, or a model that cannot be widened exactly there (the message names
            the graph node); nothing is changed.

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
    _check_args(init, mapping, new_state, width, noise, split)
    check_int("ramp_steps", ramp_steps, 1, optional=True)
    seed = make_seed(generator)
    model, target = unwrap(model, target)
    graph, shapes = traced_graph if traced_graph is not None else traced(model, example_inputs)
    c = couple(model, target, width, graph=graph, shapes=shapes)
    block = c.unit_features  # > 1: the units are attention heads of that many features, or a fused output's pieces
    old, units = c.old_width * block + c.fixed, (width - c.fixed) // block  # c.fixed: features of pieces not grown
    check("width", width, width > old and (width - c.fixed) % block == 0, f"more than {target!r}'s current {old} "
          "units" + c.width_rule())
    if init == "auto":
        init = _auto_init(model, c, units, ramp_steps)
    ramps = _ramp_norms(model, c, init) + _fade_readers(model, c, init)
    exact = get_init(init).exact
    mapping = _choose_mapping(c, init, mapping, units)
    maps = _draw_maps(c, units, init, mapping, float(split), seed)
    changes, resizes = _changes(model, c, maps, exact, graph, get_init(init))
    return WidenPlan(model=model, target=target, old_width=old, width=width, init=init, noise=float(noise),
                     split=float(split), mapping=mapping, seed=seed, maps=maps, producers=list(c.producers),
                     channelwise=list(c.channelwise), consumers=list(c.consumers), changes=changes,
                     resizes=resizes, example_inputs=example_inputs, new_state=new_state, ramps=ramps,
                     ramp_steps=(ramp_steps or DEFAULT_RAMP_STEPS) if ramps else 0)


def _auto_init(model: nn.Module, c: Coupling, width: int, ramp_steps: int | None) -> str:
    """``init="auto"``: new features where nothing normalises over the units; where norms do, new features that
    the norms ramp in (given ``ramp_steps``, and norms that can), else mixtures, else copies."""
    if not c.uniform_only:
        return "zero_out"
    if ramp_steps is not None and _ramp_problem(model, c) is None:
        return "ramp"
    return "mix" if _mix_problem(c, width) is None else "net2wider"


def _ramp_problem(model: nn.Module, c: Coupling) -> str | None:
    """Why the norms over ``c``'s units cannot ramp its new units in (``None``: they can). Heads can, where every norm
    over them sees their features whole (OLMo-2's q_norm over the projection: the new heads' features come last)."""
    heads = c.unit_block > 1 and not c.cats and not c.grouped and set(c.uniform_only) <= set(c.channel_blocks)
    if (why := not_single_units(c)) is not None and not heads:
        return why
    modules = dict(model.named_modules())
    return next((f"{n!r} is {why}" for n in c.uniform_only if (why := rampable(modules[n])) is not None), None)


def _fade_readers(model: nn.Module, c: Coupling, init: str) -> list[str]:
    """The readers that fade the new units in: every consumer for ``init="fade"``. While a reader fades in the
    units of an earlier growth, other initialisers are refused (their columns would weigh 0 there)."""
    readers = {n: model.get_submodule(n) for n in c.consumers}
    if not isinstance(get_init(init), Fade):
        fading = [n for n, m in readers.items() if is_ramped(m)]
        if fading:
            fail(f"init: {init!r} is not allowed for {c.target!r} while {fading} fade in the units of an earlier "
                 "growth (its new columns would weigh 0 there); use init='fade', or widen once the fade has ended")
        return []
    why = not_single_units(c) or (f"{list(c.uniform_only)} normalise over its units (use init='ramp')"
                                  if c.uniform_only else None)
    why = why or next((f"{n!r} is {w}" for n, m in readers.items() if (w := fadeable(m)) is not None), None)
    if why is not None:
        fail(f"init: 'fade' is not allowed for {c.target!r}: {why}")
    return list(c.consumers)


def _ramp_norms(model: nn.Module, c: Coupling, init: str) -> list[str]:
    """The norms that ramp the new units in: all of them for ``init="ramp"``; for mixtures, those already in a
    ramp (mixtures weigh 0 there at first, exactly, and join it)."""
    modules = dict(model.named_modules())
    ramped = [n for n in c.uniform_only if is_ramped(modules[n])]
    if isinstance(get_init(init), Ramp):
        problem = _ramp_problem(model, c) if c.uniform_only else None
        if problem is not None:
            fail(f"init: 'ramp' is not allowed for {c.target!r}: {problem}; use init='mix'")
        return list(c.uniform_only)
    if ramped and not isinstance(get_init(init), Mix):
        fail(f"init: {init!r} is not allowed for {c.target!r} while {ramped} ramp in units of an earlier growth "
             "(copies or fresh units there would not be weighed like their originals); use init='ramp' or 'mix', "
             "or widen once the ramp has ended")
    return ramped


def unit_features(model: nn.Module, target: str, example_inputs: Any = None, *,
                  traced_graph: tuple[fx.Graph, Any] | None = None) -> tuple[int, int]:
    """``(unit, fixed)``: ``target``'s widths are ``fixed`` plus a multiple of ``unit``, the output features of one
    unit that grows whole (1, an attention head's size, or that times the parts of a fused output), ``fixed`` the
    features of pieces of its output that keep their size (a multi-query ``c_attn``'s key and value head); ``(1, 0)``
    where planning would refuse (:func:`plan_widen` then says why). ``traced_graph``: as for :func:`plan_widen`.

    Example:
        >>> import torch.nn as nn
        >>> from autogrow.widen import unit_features
        >>> unit_features(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "0")
        (1, 0)
    """
    model, target = unwrap(model, target)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # plan_widen warns about a captured graph
            graph, shapes = traced_graph if traced_graph is not None else traced(model, example_inputs)
        c = couple(model, target, graph=graph, shapes=shapes)
        return c.unit_features, c.fixed
    except AutogrowError:
        return 1, 0


def widen(model: nn.Module, target: str, width: int, *, optimizer: Optimizer | None = None,
          state: str = "carry", **kwargs: Any) -> Growth:
    """:func:`plan_widen` then apply; returns the :class:`~autogrow.Growth` record.

    Example:
        >>> import torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> autogrow.widen(net, "0", 16, generator=1).summary()
        'widen 0: 8 -> 16 units (net2wider), 3 parameters reshaped'
    """
    return plan_widen(model, target, width, **kwargs).apply(optimizer, state=state)
