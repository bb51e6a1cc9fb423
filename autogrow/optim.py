"""Carry optimizer state across growth, exactly.

The rule (checked by the gradient-replay test, not only derived): after Net2WiderNet a new unit j
that carries the share ``s_j`` of old unit g(j)'s outgoing weights receives ``s_j`` times the
teacher's gradient on everything indexed by the unit itself (its incoming weights and bias, its
normalisation entries), while a consumer's weight from unit j receives exactly the teacher's
gradient for g(j). So the state the student's own history would have built is the teacher's state
re-indexed like the parameter and, along the unit's own dimension, multiplied by ``s_j`` for
first-moment buffers (momentum, ``exp_avg``), ``s_j**2`` for second moments (``exp_avg_sq``,
Adagrad ``sum``) and left alone for scale-free buffers; step counters are kept. Parameters created by
Net2DeeperNet start with no state (zero state with an old step count makes Adam's first update far
too large).

Shrinking (``autogrow.shrink``) runs the rule backwards. When the copies of a unit were made with
shares ``s_j`` (summing to 1) and the state was built while they were copies, copy j holds
``s_j**p`` times the teacher's state along the unit's own dimension, so the merged unit's state is
``(sum_j state_j**(1/p))**p``: the plain sum for first moments, ``(sum_j sqrt(v_j))**2`` for second
moments (the sum of the ``v_j`` would be ``sum_j s_j**2`` times too small, 1/k for an even split),
the mean for scale-free buffers. The shares need not be known. A consumer's columns from the copies
all received the teacher's gradient: their states are equal and the merged column takes their mean.
Removed (pruned) units' state is dropped and kept units keep theirs: approximate, as pruning is.

Two paths share this transform:

* :func:`grow_optimizer` updates a live optimizer in place (plain PyTorch loops);
* :func:`translate_state_dict` maps an old ``optimizer.state_dict()`` onto an optimizer freshly built
  over the grown model, matching parameters by *name* (frameworks that rebuild optimizers).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.optim import Optimizer

from autogrow.errors import AutogrowError, check_choice, fail
from autogrow.growth import SHRINK_ROLES, Growth, Transform, UnitMap, merge_units

__all__ = ["NEW_STATES", "STATES", "carry_scheduler", "check_optimizer", "grow_optimizer", "optimizer_holds_model",
           "param_names", "register_optimizer_state", "translate_state_dict"]

STATES = ("carry", "reset")
NEW_STATES = ("zero", "mean")  # fresh units' optimizer state: empty, or second moments at the old units' mean
PARAM = "param"  # a state buffer holding parameter values (ASGD's average): transformed like the parameter

# How each per-parameter state buffer scales with the gradient: 1 (first moment), 2 (second
# moment), 0 (scale-free: copied), or PARAM. Keys not listed are re-indexed and copied, with a warning.
_DEFAULT_POWERS: dict[str, int | str] = {
    "momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2, "square_avg": 2,
    "grad_avg": 1, "sum": 2, "exp_inf": 1, "acc_delta": 0, "mu_product": 0,
}
_POWERS: dict[type, dict[str, int | str]] = {
    # RMSprop's momentum buffer accumulates g / sqrt(v): scale-free (exact up to eps).
    torch.optim.RMSprop: {"momentum_buffer": 0},
    torch.optim.ASGD: {"ax": PARAM},
}
_REFUSED: dict[type, str] = {
    torch.optim.LBFGS: "keeps its history as flat vectors over all parameters and caches their sizes",
}
if hasattr(torch.optim, "Adafactor"):  # torch >= 2.5
    _REFUSED[torch.optim.Adafactor] = ("keeps factored second moments (row and column statistics), which cannot be "
                                       "re-indexed unit by unit")
_WARNED: set[tuple[str, str]] = set()  # (optimizer class, state key) already warned about


def register_optimizer_state(cls: type[Optimizer], powers: Mapping[str, int | str]) -> None:
    """Declare how ``cls``'s per-parameter state buffers scale with the gradient (0, 1 or 2), or
    ``"param"`` for buffers that hold parameter values (transformed like the parameter itself).

    Example:
        >>> import torch, autogrow
        >>> class MyAdam(torch.optim.Adam): ...
        >>> autogrow.register_optimizer_state(MyAdam, {"exp_avg": 1, "exp_avg_sq": 2})
    """
    _POWERS[cls] = dict(powers)


def _powers(optimizer: Optimizer) -> dict[str, int | str]:
    out = dict(_DEFAULT_POWERS)
    for cls in reversed(type(optimizer).__mro__):
        out.update(_POWERS.get(cls, {}))
    return out


def optimizer_holds_model(optimizer: Optimizer, module: nn.Module) -> bool:
    """The optimizer-state check: the optimizer's parameters are exactly the model's (no stale tensor left
    behind by a growth, none missing or repeated), and every moment it keeps has its parameter's shape.

        >>> net = nn.Linear(2, 2); opt = torch.optim.Adam(net.parameters()); net(torch.ones(1, 2)).sum().backward()
        >>> opt.step(); optimizer_holds_model(opt, net), optimizer_holds_model(opt, nn.Linear(2, 2))
        (True, False)
    """
    held = [p for g in optimizer.param_groups for p in g["params"]]
    if len(held) != len({id(p) for p in held}) or {id(p) for p in held} != {id(p) for p in module.parameters()}:
        return False
    return all(v.shape == p.shape for p in held for v in optimizer.state.get(p, {}).values()
               if torch.is_tensor(v) and v.dim() > 0)


def check_optimizer(optimizer: Optimizer, model: nn.Module, state: str = "carry") -> None:
    """Raise :class:`AutogrowError` if ``optimizer`` cannot follow a growth of ``model``.

    Called before any surgery, so a refusal leaves model and optimizer untouched.
    """
    check_choice("state", state, STATES)
    for cls, why in _REFUSED.items():
        if isinstance(optimizer, cls):
            fail(f"optimizer: {type(optimizer).__name__} {why}; it cannot be carried across growth. "
                 "Build a new one over model.parameters() after growing, or use another optimizer.")
    owned = {id(p) for p in model.parameters()}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in owned:
                fail(f"optimizer: holds a parameter of shape {tuple(p.shape)} that is not in the model")
    if state == "reset":
        return
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and (v.dim() == 0 or v.shape == p.shape):
                continue
            if isinstance(v, (int, float)):
                continue
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            fail(
                f"optimizer: {type(optimizer).__name__} keeps state {k!r} ({shape}) for a parameter of shape "
                f"{tuple(p.shape)}; it cannot be remapped exactly. Pass state='reset' to start its state afresh.")


def _warn_unknown(owner: str, key: str) -> None:
    if (owner, key) not in _WARNED:
        _WARNED.add((owner, key))
        warnings.warn(f"optimizer: {owner} keeps state {key!r}, which autogrow does not know; it is re-indexed like "
                      "the parameter and copied unscaled. Declare how it scales with the gradient with "
                      f"autogrow.register_optimizer_state({owner}, {{{key!r}: 0, 1, 2 or 'param'}}).", stacklevel=3)


def transform_state(st: Mapping[str, Any], transforms: Sequence[Transform], maps: Mapping[str, UnitMap],
                    powers: Mapping[str, int | str], owner: str = "the optimizer", new_state: str = "zero"
                    ) -> dict[str, Any]:
    """One parameter's optimizer state after the parameter was re-indexed by ``transforms``.

    Fresh units (random new units) have no history: their buffers start at zero, or with ``new_state="mean"``
    their second moments start at the mean of the old units' (so that Adam's first steps for them are not
    several times larger than the others', as they are from zero with the tensor's step count carried).
    """
    out: dict[str, Any] = {}
    for k, v in st.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            if k not in powers:
                _warn_unknown(owner, k)
            power = powers.get(k, 0)
            for tr in transforms:
                um = maps[tr.map].expand(tr.block)
                if tr.role in SHRINK_ROLES:
                    v = merge_units(v, tr.dim, um, _merge_how(tr.role, power))
                    continue
                v = um.take(v, tr.dim)
                if power == PARAM:  # like the parameter: consumer inputs carry the unit's share
                    if tr.role == "in" and um.scaled:
                        v.mul_(um.along(um.scale.to(v.dtype), v, tr.dim))
                elif tr.role == "out" and power and um.scaled:
                    v.mul_(um.along(um.scale.to(v.dtype).pow(power), v, tr.dim))
                if bool(um.fresh.any()):  # random units: no history
                    mask = um.along(um.fresh, v, tr.dim)
                    if new_state == "mean" and power == 2:
                        old = v.masked_fill(mask, 0).sum(tr.dim, keepdim=True) / max(1, int((~um.fresh).sum()))
                        v = torch.where(mask, old.expand_as(v), v)
                    else:
                        v.masked_fill_(mask, 0)
        out[k] = v
    return out


def _merge_how(role: str, power: int | str) -> str:
    """How a merge combines a state buffer (the inverse of the widening rule, see the module docstring)."""
    if power == PARAM:  # like the parameter: own rows keep the first copy, consumer columns add up
        return "first" if role == "merge" else "sum"
    if role == "sum":  # consumer columns of copies saw identical gradients: equal states
        return "mean"
    return {0: "mean", 1: "sum", 2: "sqrtsum"}.get(power, "mean")  # type: ignore[call-overload]


def grow_named_state(state: Mapping[str, dict], groups: Sequence[list[str]], growths: Iterable[Growth],
                     powers: Mapping[str, int | str], owner: str = "the optimizer"
                     ) -> tuple[dict[str, dict], list[list[str]]]:
    """Apply growth records to optimizer state and param-group membership keyed by parameter name.

    New parameters join the group of the parameter they were derived from, with no state.
    """
    state = dict(state)
    groups = [list(g) for g in groups]
    for g in growths:
        for name, transforms in g.params.items():
            if name in state:
                state[name] = transform_state(state[name], transforms, g.maps, powers, owner,
                                              g.options.get("new_state", "zero"))
        state = {g.renames.get(k, k): v for k, v in state.items()}
        groups = [[g.renames.get(n, n) for n in grp] for grp in groups]
        for new, anchor in g.new_params.items():
            grp = next((grp for grp in groups if anchor in grp), None)
            if grp is not None:
                grp.append(new)
    return state, groups


def _load_named(optimizer: Optimizer, state: Mapping[str, dict], hyper: Sequence[dict],
                names: Callable[[torch.Tensor], str]) -> None:
    """Load name-keyed state into ``optimizer`` through its own ``load_state_dict`` (casts, checks)."""
    sd: dict[str, Any] = {"state": {}, "param_groups": []}
    i = 0
    for g, h in zip(optimizer.param_groups, hyper):
        idx = []
        for p in g["params"]:
            n = names(p)
            if n in state and state[n]:
                sd["state"][i] = state[n]
            idx.append(i)
            i += 1
        sd["param_groups"].append({**h, "params": idx})
    optimizer.load_state_dict(sd)


def grow_optimizer(optimizer: Optimizer, growth: Growth, model: nn.Module, *, state: str = "carry") -> None:
    """Update ``optimizer`` in place after ``growth`` was applied to ``model``.

    Its param groups then hold the grown parameters (new ones in the group of the layer they derive
    from), each group keeps its hyperparameters, and the state is remapped (``state="carry"``) or
    cleared (``"reset"``, the ablation baseline). A scheduler bound to it continues unchanged.

    Example:
        >>> import torch, torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = torch.optim.Adam(net.parameters())
        >>> net(torch.randn(3, 4)).sum().backward(); opt.step()
        >>> g = autogrow.widen(net, "0", 12, generator=0)
        >>> autogrow.grow_optimizer(opt, g, net)
        >>> opt.state[net[0].weight]["exp_avg"].shape
        torch.Size([12, 4])
    """
    check_choice("state", state, STATES)
    new_by_name = dict(model.named_parameters())
    new_name_of = {id(p): n for n, p in new_by_name.items()}
    replaced = {id(p): n for n, p in growth.replaced.items()}
    inverse = {v: k for k, v in growth.renames.items()}

    def old_name(p: torch.Tensor) -> str:
        if id(p) in replaced:
            return replaced[id(p)]
        if id(p) not in new_name_of:
            fail(f"optimizer: holds a parameter of shape {tuple(p.shape)} that is neither in the "
                                "model nor replaced by this growth")
        return inverse.get(new_name_of[id(p)], new_name_of[id(p)])

    named = {old_name(p): dict(optimizer.state[p]) for g in optimizer.param_groups for p in g["params"]
             if p in optimizer.state} if state == "carry" else {}
    groups = [[old_name(p) for p in g["params"]] for g in optimizer.param_groups]
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    named, groups = grow_named_state(named, groups, [growth], _powers(optimizer), type(optimizer).__name__)
    order = {n: i for i, n in enumerate(new_by_name)}
    for g, names in zip(optimizer.param_groups, groups):
        old_order = [order.get(n, -1) for n in names[: len(g["params"])]]
        if old_order == sorted(old_order):
            # The group followed the model's order (as when built from model.parameters()): keep it so,
            # so that a fresh optimizer over the grown model lines up with this one's state_dict.
            names = sorted(names, key=order.__getitem__)
        g["params"] = [new_by_name[n] for n in names]
    optimizer.state.clear()
    _load_named(optimizer, named, hyper, lambda p: new_name_of[id(p)])


def param_names(optimizer: Optimizer, model: nn.Module) -> list[str]:
    """Names of ``optimizer``'s parameters in its state-dict order (for :func:`translate_state_dict`)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    try:
        return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    except KeyError:
        raise AutogrowError("optimizer: holds a parameter that is not in the model") from None


def translate_state_dict(state_dict: Mapping[str, Any], old_names: Sequence[str], growths: Iterable[Growth],
                         optimizer: Optimizer, model: nn.Module, *, state: str = "carry") -> None:
    """Load an optimizer state saved before ``growths`` into ``optimizer``, built over the grown ``model``.

    Parameters are matched by name (``old_names[i]`` is the name of index ``i`` in ``state_dict``, see
    :func:`param_names`); each group's hyperparameters (``lr``, ``initial_lr``, ...) come from the
    saved state, matched by group position.

    Example:
        >>> import torch, torch.nn as nn, autogrow
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> net(torch.randn(3, 4)).sum().backward(); opt.step()
        >>> saved, names = opt.state_dict(), autogrow.param_names(opt, net)
        >>> g = autogrow.deepen(net, "0", generator=0)
        >>> new_opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> autogrow.translate_state_dict(saved, names, [g], new_opt, net)
        >>> len(new_opt.state)  # the new identity layer starts without momentum
        4
    """
    check_choice("state", state, STATES)
    groups_sd = state_dict["param_groups"]
    if len(groups_sd) != len(optimizer.param_groups):
        fail(f"optimizer: has {len(optimizer.param_groups)} param groups, the saved state "
                            f"{len(groups_sd)}; configure_optimizers must build the same groups after growth")
    if len(old_names) != sum(len(g["params"]) for g in groups_sd):
        fail(f"old_names: {len(old_names)} names for "
                            f"{sum(len(g['params']) for g in groups_sd)} saved parameters")
    named = {old_names[i]: dict(st) for i, st in state_dict["state"].items()} if state == "carry" else {}
    named, _ = grow_named_state(named, [], list(growths), _powers(optimizer), type(optimizer).__name__)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups_sd]
    name_of = {id(p): n for n, p in model.named_parameters()}
    _load_named(optimizer, named, hyper, lambda p: name_of[id(p)])


def carry_scheduler(old: Any, new: Any) -> None:
    """Continue ``old``'s schedule on ``new`` (bound to the rebuilt optimizer): position, counters, LRs.

    Call after the new optimizer's state was loaded (it restores each group's ``lr``/``initial_lr``).

    Example:
        >>> import torch, torch.nn as nn, autogrow
        >>> p = [nn.Parameter(torch.zeros(2))]
        >>> opt = torch.optim.SGD(p, lr=1.0); s = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        >>> opt.step(); s.step()
        >>> opt2 = torch.optim.SGD(p, lr=1.0); s2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.5)
        >>> opt2.load_state_dict(opt.state_dict()); autogrow.carry_scheduler(s, s2)
        >>> s2.last_epoch, opt2.param_groups[0]["lr"]
        (1, 0.5)
    """
    new.load_state_dict(old.state_dict())
