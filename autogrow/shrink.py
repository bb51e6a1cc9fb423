"""Shrinking a layer: exactly, by merging duplicate units (the inverse of Net2WiderNet), or
approximately, by pruning the least important units and correcting the consumers by least squares.

**Merge** (``mode="merge"``, exact). Units whose incoming weights, bias and normalisation entries
(running statistics included) are identical compute identical activations everywhere in the coupled
region (:func:`~autogrow.coupling.couple`: residual streams, concatenations, flatten blocks, BatchNorm
and LayerNorm). Merging a group keeps its first member's incoming weights and gives the kept unit the
*sum* of the group's consumer columns: ``sum_j W[:, j] h = (sum_j W[:, j]) h``. The copies made by
widening (with any ``split``) are such groups, so widening and then merging returns the original
shapes and function. Two units count as identical when every entry differs by at most ``tol`` times
the largest magnitude in its tensor; the default, 8 machine epsilons of the weights' dtype, accepts
exact copies and the rounding of copies trained side by side, nothing else. A LayerNorm/RMSNorm over
the units stays exact only when every kept unit stands for the same number of old ones.

**Prune** (``mode="prune"``, approximate). On a batch (``example_inputs``), each unit's activation at
each consumer (centred when the consumer has a bias, which absorbs a constant) is scaled by the norm of
its consumer columns. ``select="span"`` (default) keeps the ``width`` units whose scaled activations
span the others best: a greedy column-pivoted Cholesky of their Gram matrix (pivoted QR) picks, one at
a time, the unit with the most not yet explained by those kept, so near-copies (what widening leaves)
go first; these are what the least-squares correction below can rebuild the removed units from.
``select="magnitude"`` keeps the units of largest norm x RMS activation, summed over consumers (blind
to redundancy). With ``correct=True`` each consumer's columns of
the kept features are re-fitted by least squares: each removed input feature ``a_d`` is regressed on
the kept features (and a constant when the consumer has a bias), ``a_d ~ sum_k C[d, k] a_k + o_d``,
and its column is folded into the kept ones: ``W'_k = W_k + sum_d W_d C[d, k]``, ``b' = b + sum_d W_d
o_d``. For a linear consumer this is the least-squares solution of ``min ||W A + b - W' A_kept - b'||``
itself (the projection of ``W A`` onto the span of the kept features and the constant); for convs and
flattened blocks it is the best per-feature (shared over positions) correction. ``ridge > 0`` penalises
the coefficients (ridge regression): with about as many kept features as samples the plain fit matches
the batch exactly and is far off elsewhere. The relative change of the output on the batch is measured
at planning time (``plan.error``, and ``options["error"]`` in the record).

Optimizer state follows with the inverse of the widening rule (``autogrow.optim``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
from torch.optim import Optimizer

from autogrow.capture import traced
from autogrow.coupling import Coupling, couple
from autogrow.errors import AutogrowError, check, check_bool, check_choice, check_float, check_int, fail
from autogrow.growth import Growth, Transform, UnitMap, merge_members, merge_units, shrunk_width
from autogrow.plan import Plan, Undo, outputs, register_plan, relative_error
from autogrow.ramp import is_ramped
from autogrow.registry import channel_spec, layer_spec
from autogrow.shapes import as_args, eval_mode
from autogrow.trace import unwrap
from autogrow.widen import BASE, TensorChange, map_name, planned_tensors, rebinds, swap_tensors, tie_changes

__all__ = ["MODES", "ShrinkChange", "ShrinkPlan", "default_tol", "plan_shrink", "shrink"]

MODES = ("merge", "prune")
SELECTS = ("span", "magnitude")


def default_tol(dtype: torch.dtype) -> float:
    """The default duplicate tolerance: 8 machine epsilons of ``dtype`` (relative to a tensor's largest entry).

        >>> default_tol(torch.float64) < default_tol(torch.float32)
        True
    """
    return 8 * torch.finfo(dtype).eps


@dataclass
class ShrinkChange(TensorChange):
    """A :class:`~autogrow.widen.TensorChange` plus a pruned consumer's least-squares correction.

    ``mix`` (on a consumer's weight): per removed input feature, its coefficients on the kept ones.
    ``offset`` and ``offset_from`` (on a consumer's bias): the removed features' constants, and the
    weight whose removed columns carry them into the bias.
    """

    mix: list[list[float]] | None = None
    offset: list[float] | None = None
    offset_from: str | None = None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ShrinkChange:
        base = TensorChange.from_dict(d)
        return ShrinkChange(**{f.name: getattr(base, f.name) for f in fields(TensorChange)},
                            mix=d.get("mix"), offset=d.get("offset"), offset_from=d.get("offset_from"))


@dataclass(kw_only=True)
class ShrinkPlan(Plan):
    """Everything :func:`plan_shrink` decided; printing it shows every change. Nothing is changed yet."""

    kind = "shrink"
    model: nn.Module = field(repr=False)
    target: str
    mode: str
    old_width: int
    width: int
    tol: float
    correct: bool
    ridge: float = 0.0
    select: str = "span"
    maps: dict[str, UnitMap] = field(repr=False)  # merge maps: old unit -> new unit (fresh: removed)
    producers: list[str]
    channelwise: list[str]
    consumers: list[str]
    changes: list[ShrinkChange] = field(repr=False)
    resizes: list[tuple[str, str, int]] = field(repr=False)  # (module, "out" | "in" | "channel", new size)
    error: float | None = None  # prune: relative output change measured on example_inputs
    example_inputs: Any = field(default=None, repr=False)

    @property
    def param_delta(self) -> int:
        """How many parameters the plan adds (negative: it removes them)."""
        return sum(math.prod(c.new_shape) - math.prod(c.old_shape) for c in self.changes if c.is_param)

    @property
    def exact(self) -> bool:
        return self.mode == "merge"

    def __str__(self) -> str:
        lines = [f"ShrinkPlan: {self.target!r} {self.old_width} -> {self.width} units (mode={self.mode}, "
                 f"tol={self.tol:.3g}{self._prune_options() if self.mode == 'prune' else ''})"]
        base = self.maps[BASE]
        unit = self.old_width // len(base.idx)  # > 1: the units are attention heads of that many features
        units = "units" if unit == 1 else f"heads (of {unit} units)"
        if self.mode == "merge":
            groups = [[u for u in g if u >= 0] for g in merge_members(base).tolist()]
            groups = [g for g in groups if len(g) > 1]
            lines.append(f"  merges {len(groups)} groups of copied {units}: {groups[:8]}"
                         f"{' ...' if len(groups) > 8 else ''}")
        else:
            gone = torch.nonzero(base.fresh).flatten().tolist()
            err = f"; relative output change {self.error:.3g} on the example inputs" if self.error is not None else ""
            lines.append(f"  removes {units} {gone[:16]}{' ...' if len(gone) > 16 else ''}{err}")
        lines.append(f"  producers (output shrinks): {self.producers}")
        if self.channelwise:
            lines.append(f"  channel-wise (entries merged): {self.channelwise}")
        lines.append(f"  consumers (input shrinks): {self.consumers}")
        for c in self.changes:
            how = ", ".join(f"dim {t.dim} {t.role}" + (f" x{t.block} block" if t.block > 1 else "")
                            for t in c.transforms)
            fix = " + least-squares correction" if c.mix is not None or c.offset is not None else ""
            lines.append(f"    {c.name}: {list(c.old_shape)} -> {list(c.new_shape)} ({how or 'values'}{fix})")
        return "\n".join(lines)

    def _apply(self, undo: Undo) -> Growth:
        modules, current = planned_tensors(self.model, self.changes)
        with torch.no_grad():
            new = {c.name: self._transform(c, current) for c in self.changes}
        replaced = swap_tensors(modules, self.changes, current, new, self.resizes, undo)
        return Growth(
            kind=self.kind, target=self.target, seed=0, options=self._options(), maps=dict(self.maps),
            params={c.name: c.transforms for c in self.changes if c.is_param},
            buffers=[c.name for c in self.changes if not c.is_param], replaced=replaced,
            tensors=[c.to_dict() for c in self.changes], resizes=[list(r) for r in self.resizes])

    def _prune_options(self) -> str:
        return f", select={self.select}, correct={self.correct}" + (
            f", ridge={self.ridge:g}" if self.correct and self.ridge else "")

    def _options(self) -> dict[str, Any]:
        return {"mode": self.mode, "width": self.width, "old_width": self.old_width, "tol": self.tol,
                "correct": self.correct, "ridge": self.ridge, "select": self.select, "error": self.error}

    def _transform(self, c: ShrinkChange, current: dict[str, torch.Tensor]) -> torch.Tensor:
        t = current[c.name].detach()
        if c.offset_from is not None:  # a pruned consumer's bias absorbs the removed features' constants
            w = next(ch for ch in self.changes if ch.name == c.offset_from)
            tr = next(tr for tr in w.transforms if tr.role == "sum")
            t = t + _bias_shift(current[w.name].detach(), tr, self.maps[tr.map], c.offset, _out_dim(self.model, w))
        for tr in c.transforms:
            um = self.maps[tr.map]
            merged = merge_units(t, tr.dim, um.expand(tr.block), "first" if tr.role == "merge" else "sum")
            if tr.role == "sum" and c.mix is not None:  # pruned consumer: fold removed columns into kept ones
                merged = merged + _mixed(t, tr, um, c.mix)
            t = merged
        return t

    @classmethod
    def summarize(cls, record: Growth) -> str:
        o = record.options
        err = f", output change {o['error']:.3g}" if o.get("error") is not None else ""
        return (f"shrink {record.target}: {o['old_width']} -> {o['width']} units ({o['mode']}{err}), "
                f"{sum(1 for t in record.tensors if t['is_param'])} parameters changed")

    @classmethod
    def replay(cls, model: nn.Module, record: Growth) -> Growth:
        """The recorded tensors, maps and corrections, re-applied without tracing."""
        o = record.options
        resizes = [(m, kind, int(v)) for m, kind, v in record.resizes]
        by_kind = {k: [m for m, kind, _ in resizes if kind == k] for k in ("out", "channel", "in")}
        plan = ShrinkPlan(model=unwrap(model, "")[0], target=record.target, mode=o["mode"], old_width=o["old_width"],
                          width=o["width"], tol=o["tol"], correct=o["correct"], ridge=o.get("ridge", 0.0),
                          select=o.get("select", "magnitude"), maps=dict(record.maps),
                          producers=by_kind["out"], channelwise=by_kind["channel"], consumers=by_kind["in"],
                          changes=[ShrinkChange.from_dict(t) for t in record.tensors], resizes=resizes,
                          error=o.get("error"))
        try:
            return plan.apply()
        except AutogrowError as e:
            fail(f"growths: the shrinking of {record.target!r} does not fit this model ({e})")


register_plan(ShrinkPlan)


# --- tensors viewed unit by unit --------------------------------------------------------------------

def _unit_view(t: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """``t`` with its feature axis ``dim`` (``block`` consecutive entries per unit) as ``(..., block, units)``."""
    v = t.movedim(dim, -1)
    return v.unflatten(-1, (v.shape[-1] // block, block)).transpose(-1, -2)


def _from_unit_view(v: torch.Tensor, dim: int) -> torch.Tensor:
    return v.transpose(-1, -2).flatten(-2).movedim(-1, dim)


def _mixed(t: torch.Tensor, tr: Transform, um: UnitMap, mix: list[list[float]]) -> torch.Tensor:
    """``sum_d W_d C[d, k]``: the removed columns of ``t`` folded onto the kept ones (computed in float64)."""
    removed = torch.nonzero(um.fresh).flatten().to(t.device)
    coef = torch.tensor(mix, dtype=torch.float64, device=t.device)
    v = _unit_view(t, tr.dim, tr.block).index_select(-1, removed).double() @ coef
    return _from_unit_view(v, tr.dim).to(t.dtype)


def _bias_shift(w: torch.Tensor, tr: Transform, um: UnitMap, offset: list[float] | None, out_dim: int
                ) -> torch.Tensor:
    """``sum_d W_d o_d`` per output unit: what the removed features' constant parts contributed."""
    removed = torch.nonzero(um.fresh).flatten().to(w.device)
    o = torch.tensor(offset, dtype=torch.float64, device=w.device)
    v = (_unit_view(w, tr.dim, tr.block).index_select(-1, removed).double() @ o).sum(-1)
    keep = out_dim if out_dim < tr.dim % w.dim() else out_dim - 1  # where the output axis sits in the view
    return v.sum(dim=[d for d in range(v.dim()) if d != keep]).to(w.dtype) if v.dim() > 1 else v.to(w.dtype)


def _out_dim(model: nn.Module, w: ShrinkChange) -> int:
    spec = layer_spec(model.get_submodule(w.module))
    assert spec is not None
    return spec.out_params.get(w.tensor, 0)


# --- which old unit becomes which new one ------------------------------------------------------------

def _merge_map(new_of: torch.Tensor, removed: torch.Tensor) -> UnitMap:
    return UnitMap(new_of, torch.ones(len(new_of), dtype=torch.float64), removed)


def _cat_maps(c: Coupling, base: UnitMap) -> dict[str, UnitMap]:
    """The merge map of every concatenation: its parts' maps side by side, new units offset by new widths."""
    maps = {BASE: base}
    for key, cp in c.cats.items():
        parts = [maps[map_name(k)] if k is not False else _merge_map(torch.arange(w), torch.zeros(w, dtype=torch.bool))
                 for k, w in cp.parts]
        offsets = torch.tensor([0] + [shrunk_width(p) for p in parts[:-1]]).cumsum(0).tolist()
        maps[map_name(key)] = UnitMap(torch.cat([p.idx + o for p, o in zip(parts, offsets)]),
                                      torch.cat([p.scale for p in parts]), torch.cat([p.fresh for p in parts]))
    return maps


def _labels(c: Coupling) -> dict[str, torch.Tensor]:
    """Per mapping key, the target's unit behind each feature (-1: a concatenated tensor that does not shrink)."""
    labels = {BASE: torch.arange(c.old_width)}
    for key, cp in c.cats.items():
        labels[map_name(key)] = torch.cat([labels[map_name(k)] if k is not False else torch.full((w,), -1)
                                           for k, w in cp.parts])
    return labels


def _unit_features(model: nn.Module, c: Coupling, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(units, values)``: everything indexed by each unit (rows, bias, normalisation entries), each tensor
    scaled by its largest magnitude, in float64."""
    n, cols = c.old_width, []

    def add(t: torch.Tensor) -> None:
        t = t.detach().double().reshape(n, -1)
        cols.append(t / t.abs().max().clamp_min(1e-300))

    for mod, key in c.producers.items():
        m, parts = model.get_submodule(mod), c.parts if key is not None else 1  # fused: rows (part, unit, ...)
        rows = None if key is None or not c.fixed else torch.nonzero(  # unequal pieces: the grown one's rows
            labels[map_name(key)].repeat_interleave(c.block(mod)) >= 0).flatten()
        for tname, d in layer_spec(m).out_params.items():  # type: ignore[union-attr]
            t = getattr(m, tname, None)
            if t is not None and rows is not None:
                add(t.movedim(d, 0).index_select(0, rows.to(t.device)))
            elif t is not None:
                add(t.movedim(d, 0).unflatten(0, (parts, -1)).transpose(0, 1))
    for (mod, tname), (_, axis) in c.tensors.items():  # bare parameters (base mapping only)
        add(getattr(model.get_submodule(mod), tname).movedim(axis, 0))
    for mod, key in c.channelwise.items():
        m = model.get_submodule(mod)
        lab = labels[map_name(key)]
        pos = torch.nonzero(lab >= 0).flatten()
        pos = pos[torch.argsort(lab[pos] * len(lab) + pos)]  # by unit, then position: (units, occurrences)
        for tname in channel_spec(m).tensors:  # type: ignore[union-attr]
            t = getattr(m, tname, None)
            if t is not None:
                add(t.index_select(0, pos.to(t.device)))
    return torch.cat(cols, dim=1).cpu()


def _duplicate_groups(feats: torch.Tensor, tol: float) -> torch.Tensor:
    """Group id of each unit (numbered by first member): units within ``tol`` of their group's first member.

    Candidates are found by sorting the row sums (units within ``tol`` entrywise have sums within
    ``values * tol``): about ``n log n`` plus the comparisons with near neighbours.
    """
    n, width = feats.shape
    sums = feats.sum(1)
    order = torch.argsort(sums)
    ordered = sums[order]
    slack = width * (tol + 1e-12)  # plus the rounding of the sums themselves
    gid = torch.full((n,), -1, dtype=torch.long)
    m = 0
    for u in range(n):
        if gid[u] >= 0:
            continue
        lo = int(torch.searchsorted(ordered, sums[u] - slack))
        hi = int(torch.searchsorted(ordered, sums[u] + slack, right=True))
        cand = order[lo:hi]
        cand = cand[gid[cand] < 0]
        close = cand[(feats[cand] - feats[u]).abs().amax(1) <= tol]
        gid[close] = m
        gid[u] = m
        m += 1
    return gid


def _merge_base(gid: torch.Tensor, width: int | None) -> UnitMap:
    """Merge ``old - width`` copies into their group's first member (all copies when ``width`` is None),
    the highest-numbered copies first: they are the most recently widened ones."""
    n = len(gid)
    ar = torch.arange(n)
    first = torch.full((int(gid.max()) + 1,), n).scatter_reduce(0, gid, ar, "amin")
    copies = torch.nonzero(ar != first[gid]).flatten().flip(0)
    merged = torch.zeros(n, dtype=torch.bool)
    merged[copies[: n - width if width is not None else n]] = True
    rep = torch.where(merged, first[gid], ar)  # the old unit whose new unit each old unit joins
    return _merge_map(torch.searchsorted(torch.unique(rep), rep), torch.zeros(n, dtype=torch.bool))


def _plan_merge(model: nn.Module, c: Coupling, width: int | None, tol: float) -> UnitMap:
    gid = _duplicate_groups(_unit_features(model, c, _labels(c)), tol)
    groups, unit = int(gid.max()) + 1, c.unit_features
    what = "units" if unit == 1 else f"heads of {unit}"
    if groups == c.old_width:
        fail(f"target: {c.target!r} has no duplicate units to merge: its {c.old_width} {what} differ pairwise by more "
             f"than tol={tol:.3g} (relative) in their incoming weights, bias or normalisation entries; "
             "mode='prune' removes units approximately")
    check("width", width, width is None or width >= groups * unit + c.fixed,
          f"at least {groups * unit + c.fixed}: {c.target!r} has {groups} distinct {what}, and exact merges reach no "
          "fewer")
    return _merge_base(gid, (width - c.fixed) // unit if width is not None else None)


def _recorder(store: list[torch.Tensor]) -> Any:
    def hook(module: nn.Module, args: tuple) -> None:
        store.append(args[0].detach())
    return hook


def _consumer_inputs(model: nn.Module, c: Coupling, example_inputs: Any) -> dict[str, torch.Tensor]:
    """Per consumer, its input on ``example_inputs`` as ``(samples, features)`` in float64 on the CPU: one
    column per feature of its mapping (a flattened block's positions and a conv's pixels are samples)."""
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in c.consumers}
    handles = [model.get_submodule(m).register_forward_pre_hook(_recorder(seen[m])) for m in c.consumers]
    try:
        with torch.no_grad(), eval_mode(model):
            model(*as_args(example_inputs))
    except Exception as e:
        fail(f"example_inputs: the model's forward failed on them ({type(e).__name__}: {str(e).splitlines()[0]})")
    finally:
        for h in handles:
            h.remove()
    out = {}
    for mod, (key, flat) in c.consumers.items():
        m = model.get_submodule(mod)
        spec = layer_spec(m)
        assert spec is not None and spec.in_attr is not None
        units = c.width(key)
        block = getattr(m, spec.in_attr) // units if flat else 1
        out[mod] = torch.cat([x.movedim(spec.in_dim, -1).reshape(-1, units, block).transpose(1, 2).reshape(-1, units)
                              for x in seen[mod]]).double().cpu()
    return out


def _in_weight(m: nn.Module) -> tuple[str, int, torch.Tensor]:
    spec = layer_spec(m)
    assert spec is not None
    tname, d = next(iter(spec.in_params.items()))
    return tname, d, getattr(m, tname)


def _plan_prune(model: nn.Module, c: Coupling, width: int, inputs: dict[str, torch.Tensor],
                select: str = "span") -> UnitMap:
    """The units (heads) kept: see the module docstring (ties: lower index)."""
    labels = _labels(c)
    importance = torch.zeros(c.old_width, dtype=torch.float64)
    gram = torch.zeros(c.old_width, c.old_width, dtype=torch.float64) if select == "span" else None
    for mod, (key, _) in c.consumers.items():
        m = model.get_submodule(mod)
        _, d, w = _in_weight(m)
        block = w.shape[d] // c.width(key)
        v = _unit_view(w.detach().double(), d, block)
        col = v.reshape(-1, v.shape[-1]).pow(2).sum(0).sqrt().cpu()
        a = inputs[mod]
        lab = labels[map_name(key)]
        sel = lab >= 0
        importance.index_add_(0, lab[sel], (col * a.pow(2).mean(0).sqrt())[sel])
        if gram is not None:
            if getattr(m, "bias", None) is not None:
                a = a - a.mean(0)
            scaled = torch.zeros(len(a), c.old_width, dtype=torch.float64).index_add_(1, lab[sel], (a * col)[:, sel])
            gram += scaled.T @ scaled
    order = torch.sort(-importance, stable=True).indices
    keep = _span_keep(gram, width) if gram is not None else torch.zeros(c.old_width, dtype=torch.bool)
    keep[order[~keep[order]][: width - int(keep.sum())]] = True  # "magnitude", or what the span leaves open
    return _merge_map((keep.cumsum(0) - 1).clamp_min(0), ~keep)


def _span_keep(gram: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy column-pivoted Cholesky of ``gram``: up to ``k`` columns, each the one with the largest part not
    spanned by those already picked; stops early once the rest is spanned (to rounding).

        >>> a = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 2.1, 0.0]], dtype=torch.float64)
        >>> _span_keep(a.T @ a, 2).tolist()   # columns 0 and 1 are near-copies: one goes
        [False, True, True]
    """
    n = len(gram)
    keep = torch.zeros(n, dtype=torch.bool)
    residual = gram.diagonal().clone()
    floor = 1e-12 * float(residual.max()) if n else 0.0
    factor = torch.zeros(n, k, dtype=gram.dtype)
    for i in range(k):
        j = int(torch.where(keep, -math.inf, residual).argmax())
        if residual[j] <= floor:
            break
        col = (gram[:, j] - factor[:, :i] @ factor[j, :i]) / residual[j].sqrt()
        factor[:, i] = col
        residual = (residual - col * col).clamp_min(0.0)
        keep[j] = True
    return keep


def _solve(design: torch.Tensor, target: torch.Tensor, ridge: float, constant: bool) -> torch.Tensor:
    """``argmin ||design @ X - target||^2 + ridge * mean(diag(design^T design)) * ||X||^2`` (the constant
    column, last when ``constant``, unpenalised); ``ridge=0``: the minimum-norm least-squares solution."""
    if ridge == 0:
        return torch.linalg.lstsq(design, target, driver="gelsd").solution
    gram = design.T @ design
    penalty = torch.full((len(gram),), ridge * float(gram.diagonal().mean()), dtype=gram.dtype)
    if constant:
        penalty[-1] = 0.0
    return torch.linalg.lstsq(gram + torch.diag(penalty), design.T @ target, driver="gelsd").solution


def _correct(model: nn.Module, c: Coupling, maps: dict[str, UnitMap], inputs: dict[str, torch.Tensor],
             changes: list[ShrinkChange], ridge: float) -> list[ShrinkChange]:
    """Least-squares corrections of every consumer (``mix`` on its weight; ``offset`` on its bias)."""
    by_name = {ch.name: ch for ch in changes}
    out = list(changes)
    for mod, (key, _) in c.consumers.items():
        m = model.get_submodule(mod)
        spec = layer_spec(m)
        assert spec is not None
        if len(spec.in_params) != 1:
            fail(f"correct: consumer {mod!r} has several input-indexed tensors {list(spec.in_params)}; "
                 "pass correct=False")
        um = maps[map_name(key)]
        a = inputs[mod]
        design = a[:, ~um.fresh]
        bias = getattr(m, "bias", None) if "bias" in spec.out_params else None
        if bias is not None:  # a constant column: its coefficient goes into the bias
            design = torch.cat([design, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
        sol = _solve(design, a[:, um.fresh], ridge, constant=bias is not None)
        tname, _, _ = _in_weight(m)
        weight = f"{mod}.{tname}" if mod else tname
        by_name[weight].mix = sol[: int((~um.fresh).sum())].T.tolist()
        if bias is not None:
            name = f"{mod}.bias" if mod else "bias"
            if name not in by_name:
                by_name[name] = ShrinkChange(mod, "bias", isinstance(bias, nn.Parameter), tuple(bias.shape),
                                             tuple(bias.shape), [])
                out.append(by_name[name])
            by_name[name].offset, by_name[name].offset_from = sol[-1].tolist(), weight
    return out


# --- the plan ------------------------------------------------------------------------------------------

def _shrink_changes(model: nn.Module, c: Coupling, maps: dict[str, UnitMap]
                    ) -> tuple[list[ShrinkChange], list[tuple[str, str, int]]]:
    """Every tensor that changes shape (and how), and every size attribute to update."""
    modules = dict(model.named_modules())
    by_name: dict[str, ShrinkChange] = {}
    resizes: list[tuple[str, str, int]] = []

    def add(mod: str, tname: str, tr: Transform) -> None:
        t = getattr(modules[mod], tname, None)
        if t is None:  # bias=False, affine=False, track_running_stats=False
            return
        key = f"{mod}.{tname}" if mod else tname
        ch = by_name.setdefault(key, ShrinkChange(mod, tname, isinstance(t, nn.Parameter), tuple(t.shape),
                                                  tuple(t.shape), []))
        ch.transforms.append(tr)
        shape = list(ch.new_shape)
        shape[tr.dim] = shrunk_width(maps[tr.map]) * tr.block
        ch.new_shape = tuple(shape)

    for mod, key in c.producers.items():  # whole heads (with their group's query heads) of that many rows
        for tname, d in layer_spec(modules[mod]).out_params.items():  # type: ignore[union-attr]
            add(mod, tname, Transform(d, map_name(key), "merge", c.block(mod)))
        resizes.append((mod, "out", shrunk_width(maps[map_name(key)]) * c.block(mod)))
    for mod, key in c.channelwise.items():
        for tname in channel_spec(modules[mod]).tensors:  # type: ignore[union-attr]
            add(mod, tname, Transform(0, map_name(key), "merge"))
        resizes.append((mod, "channel", shrunk_width(maps[map_name(key)])))
    for (mod, tname), (key, axis) in c.tensors.items():  # bare parameters: their entries follow the units
        add(mod, tname, Transform(axis, map_name(key), "merge"))
    for mod, (key, flat) in c.consumers.items():
        spec = layer_spec(modules[mod])
        assert spec is not None and spec.in_attr is not None
        block = getattr(modules[mod], spec.in_attr) // c.width(key) if flat else 1
        for tname, d in spec.in_params.items():
            add(mod, tname, Transform(d, map_name(key), "sum", block))
        resizes.append((mod, "in", shrunk_width(maps[map_name(key)]) * block))
    return list(by_name.values()), resizes + rebinds(c)


_REWORDED = (("cannot widen", "cannot shrink"), ("Widen a hidden layer", "Shrink a hidden layer"),
             ("widening would", "shrinking would"), ("would not grow with it", "would not shrink with it"),
             ("or widen a layer", "or shrink a layer"), ("Widen to a multiple", "Shrink to a multiple"))


def _reworded(e: AutogrowError) -> AutogrowError:
    """The same refusal (same class: NeedsShapes stays NeedsShapes), in the words of shrinking."""
    msg = str(e)
    for a, b in _REWORDED:
        msg = msg.replace(a, b)
    return type(e)(msg)


def _tied(model: nn.Module, changes: list[ShrinkChange]) -> list[ShrinkChange]:
    """:func:`autogrow.widen.tie_changes` (tied parameters shrink once and stay one Parameter), keeping corrections."""
    try:
        tied = tie_changes(model, changes)  # type: ignore[arg-type]
    except AutogrowError as e:
        raise _reworded(e) from None
    by_transforms = {id(ch.transforms): ch for ch in changes}  # tie_changes re-creates a tied change around its list
    renamed = {by_transforms[id(t.transforms)].name: t.name for t in tied}
    out = []
    for t in tied:
        orig = by_transforms[id(t.transforms)]
        out.append(ShrinkChange(**{f.name: getattr(t, f.name) for f in fields(TensorChange)}, mix=orig.mix,
                                offset=orig.offset, offset_from=renamed.get(orig.offset_from, orig.offset_from)
                                if orig.offset_from else None))
    return out


def _couple(model: nn.Module, target: str, width: int | None, graph: Any, shapes: Any) -> Coupling:
    try:
        c = couple(model, target, width, graph=graph, shapes=shapes)
    except AutogrowError as e:
        raise _reworded(e) from None
    if c.grouped:
        fail(f"target: cannot shrink {target!r}: {list(c.grouped)} act on groups of channels, and removing "
             "channels splits their groups (only widening grows them, by whole groups)")
    if c.channel_blocks:
        fail(f"target: cannot shrink {target!r}: {list(c.channel_blocks)} act on the features of all its heads "
             "together (a norm over the whole projection); only widening grows them, head by head")
    return c


def _current_width(model: nn.Module, target: str) -> int | None:
    """The target's current number of output features: a safe first guess of the new width for the coupling walk
    (a whole number of heads; the walk is repeated at the final width), ``None`` where the walk will refuse."""
    try:
        m = model.get_submodule(target)
    except AttributeError:
        return None
    spec = layer_spec(m)
    return getattr(m, spec.out_attr, None) if spec is not None else None


def _check_uniform(c: Coupling, maps: dict[str, UnitMap]) -> None:
    """A LayerNorm over the units keeps its mean and variance only if every new unit stands for as many old ones."""
    for mod in c.uniform_only:
        um = maps[map_name(c.channelwise[mod])]
        counts = torch.bincount(um.idx[~um.fresh])
        if not bool((counts == counts[0]).all()):
            fail(f"width: merging {c.target!r} to {shrunk_width(maps[BASE])} units leaves {mod!r}, which normalises "
                 f"over the units, with {int(counts.min())}..{int(counts.max())} old units per new one; it stays "
                 "exact only when every new unit stands for the same number of old ones (merge all copies of a "
                 "uniformly widened layer: width=None)")


def _measure(plan: ShrinkPlan) -> float:
    """The relative output change of ``plan`` on its example inputs: applied, measured, undone exactly."""
    before = outputs(plan.model, plan.example_inputs)
    undo = Undo()
    try:
        plan._apply(undo)
        after = outputs(plan.model, plan.example_inputs)
    except AutogrowError:
        raise
    except Exception as e:
        fail(f"target: the model pruned at {plan.target!r} fails on example_inputs ({type(e).__name__}: {e})")
    finally:
        undo.restore()
    err = relative_error(before, after)
    if err is None:
        fail(f"target: pruning {plan.target!r} would change the shape of the model's output")
    return err


def _check_args(mode: str, width: int | None, tol: float | None, correct: bool, ridge: float,
                example_inputs: Any, select: str = "span") -> None:
    check_choice("mode", mode, MODES)
    check_choice("select", select, SELECTS)
    check_int("width", width, 1, optional=True)
    check_float("tol", tol, 0.0, optional=True)
    check_bool("correct", correct)
    check_float("ridge", ridge, 0.0)
    if mode == "prune":
        check("width", width, width is not None, "an int >= 1 (mode='prune' removes units down to a given width)")
        check("example_inputs", example_inputs, example_inputs is not None,
              "a batch (mode='prune' ranks the units and corrects the consumers on its activations)")


def _tolerance(module: nn.Module, tol: float | None) -> float:
    weight = next(iter(module.parameters()), None)
    return default_tol(weight.dtype if weight is not None else torch.float32) if tol is None else float(tol)


def plan_shrink(model: nn.Module, target: str, width: int | None = None, *, mode: str = "merge",
                tol: float | None = None, correct: bool = True, ridge: float = 0.0,
                example_inputs: Any = None, select: str = "span") -> ShrinkPlan:
    """Plan giving module ``target`` fewer output units, and every coupled layer what follows.

    Args:
        model: any ``nn.Module`` whose forward torch.fx can trace.
        target: name of a ``Linear``/``ConvNd``/``Embedding`` (or registered) module, not the output layer.
        width: the new number of units. ``mode="merge"``: ``None`` merges every group of duplicates; a
            width between the number of distinct units and the current width merges only some copies
            (the highest-numbered first). ``mode="prune"``: required.
        mode: ``"merge"`` (exact: duplicate units merged, their consumer columns summed) or ``"prune"``
            (approximate: the least important units removed; see the module docstring).
        tol: ``"merge"``: two units are duplicates when every entry of every tensor indexed by them differs
            by at most ``tol`` times that tensor's largest magnitude; ``None``: :func:`default_tol`.
        correct: ``"prune"``: re-fit the consumers' weights (and biases) by least squares on the batch.
        ridge: ``"prune"``: the correction's ridge penalty, relative to the mean squared kept feature (0: plain
            least squares). With about as many kept features as samples plain least squares fits the batch
            exactly and generalises badly; ``1e-2`` keeps it stable (``Shrink`` uses that).
        select: ``"prune"``: which units stay: ``"span"`` (those that best span the removed ones, pivoted QR)
            or ``"magnitude"`` (largest consumer-column norm x activation); see the module docstring.
        example_inputs: a batch (or tuple of forward arguments). ``"merge"``: optional;
            :meth:`~autogrow.plan.Plan.apply` then checks that the output is unchanged and undoes the
            merge otherwise. ``"prune"``: required; the plan is tried on it once (and undone exactly) to
            measure the relative output change, ``plan.error``.

    Raises:
        AutogrowError: a bad argument, nothing to merge, a width exact merges cannot reach, a layer whose
            shrinking cannot follow (the message names the graph node); nothing is changed.

    Example:
        >>> import torch, torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
        >>> x = torch.randn(5, 4, dtype=torch.float64); y = net(x)
        >>> _ = autogrow.widen(net, "0", 7, split=0.3, generator=0)
        >>> plan = autogrow.plan_shrink(net, "0", example_inputs=x)
        >>> plan.width, plan.param_delta
        (3, -28)
        >>> _ = plan.apply()
        >>> net[0].out_features, bool(torch.allclose(net(x), y, rtol=0, atol=1e-12))
        (3, True)
    """
    _check_args(mode, width, tol, correct, ridge, example_inputs, select)
    model, target = unwrap(model, target)
    graph, shapes = traced(model, example_inputs)
    c = _couple(model, target, width if width is not None else _current_width(model, target), graph, shapes)
    unit = c.unit_features  # > 1: the units are attention heads of that size, or a fused output's parts
    old = c.old_width * unit + c.fixed  # c.fixed: features of unequal parts that keep their size
    ramped = [n for n in (*c.channelwise, *c.consumers) if is_ramped(model.get_submodule(n))]
    check("target", target, not ramped, f"a layer whose units no norm or reader is ramping in ({ramped} still weigh "
          "the units of a growth); shrink once the ramp has ended")
    check("width", width, width is None or (c.fixed < width < old and (width - c.fixed) % unit == 0),
          f"fewer than {target!r}'s current {old} units" + c.width_rule())
    tol = _tolerance(model.get_submodule(target), tol)
    inputs = _consumer_inputs(model, c, example_inputs) if mode == "prune" else {}
    base = _plan_merge(model, c, width, tol) if mode == "merge" else \
        _plan_prune(model, c, (width - c.fixed) // unit, inputs, select)
    new = shrunk_width(base) * unit + c.fixed
    if new != width:  # re-check the size-dependent ops at the final width
        c = _couple(model, target, new, graph, shapes)
    maps = _cat_maps(c, base)
    if mode == "merge":
        _check_uniform(c, maps)
    changes, resizes = _shrink_changes(model, c, maps)
    if mode == "prune" and correct:
        changes = _correct(model, c, maps, inputs, changes, ridge)
    plan = ShrinkPlan(model=model, target=target, mode=mode, old_width=old, width=new, tol=tol,
                      correct=correct, ridge=ridge, select=select, maps=maps, producers=list(c.producers),
                      channelwise=list(c.channelwise), consumers=list(c.consumers), changes=_tied(model, changes),
                      resizes=resizes, example_inputs=example_inputs)
    if mode == "prune":
        plan.error = _measure(plan)
    return plan


def shrink(model: nn.Module, target: str, width: int | None = None, *, optimizer: Optimizer | None = None,
           state: str = "carry", **kwargs: Any) -> Growth:
    """:func:`plan_shrink` then apply (carrying ``optimizer``'s state); returns the :class:`~autogrow.Growth` record.

    Example:
        >>> import torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = autogrow.widen(net, "0", 16, generator=1)
        >>> autogrow.shrink(net, "0").summary()
        'shrink 0: 16 -> 8 units (merge), 3 parameters changed'
    """
    return plan_shrink(model, target, width, **kwargs).apply(optimizer, state=state)
