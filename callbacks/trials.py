"""Trying candidate growths for a few training steps each, then rolling them back exactly
(:class:`~autogrow.policy.TryCandidates`).

Each trial grows one candidate (verified on the probe batch), builds a throw-away optimizer through
``configure_optimizers`` with the real one's state translated onto it by name, runs ``training_step`` on the
cached batches (logging muted), and measures the mean loss on them in eval mode. Then the growth is undone
(:class:`~autogrow.plan.Undo`), every parameter, gradient and buffer gets its values back, plain-number
attributes of the LightningModule (counters such as ``train_flops``) and the random state too. The real
optimizer and schedulers are never touched. Everything is counted with ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import autogrow
from autogrow.actions import GrowthAction
from autogrow.plan import Undo, outputs
from autogrow.policy import Trial, TryCandidates
from autogrow.ramp import ramp_state, set_ramps
from autogrow.shapes import eval_mode

from .batches import inputs_of
from .rebuild import TrainingState

__all__ = ["ModuleState", "Option", "run_trials"]


@dataclass(frozen=True)
class Option:
    """A candidate growth: ``target`` grown by ``action``."""

    target: str
    action: GrowthAction

    @property
    def label(self) -> str:
        return f"{self.action.name} {self.target}"


class ModuleState:
    """Values of every parameter and buffer, the gradients, the module's plain-number attributes and the random
    state, to put back exactly after a trial (call after undoing its surgery)."""

    def __init__(self, module: nn.Module) -> None:
        self.tensors = [(t, t.detach().clone()) for t in chain(module.parameters(), module.buffers())]
        self.grads = [(p, p.grad) for p in module.parameters()]
        # plain immutable attributes: counters (train_flops) and caches keyed on the size (a FLOP count's key)
        self.numbers = {k: v for k, v in vars(module).items() if type(v) in (int, float, bool, str, tuple, type(None))}
        self.rng = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None

    def restore(self, module: nn.Module) -> None:
        with torch.no_grad():
            for t, value in self.tensors:
                t.copy_(value)
        for p, g in self.grads:
            p.grad = g
        vars(module).update(self.numbers)
        torch.set_rng_state(self.rng)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@contextlib.contextmanager
def _muted(module: Any) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside (trial steps are not training)."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict


def _loss(out: Any) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, dict) else out
    if not isinstance(loss, torch.Tensor):
        raise autogrow.AutogrowError("policy: TryCandidates needs training_step to return the loss (a tensor or "
                                     f"{{'loss': tensor}}), got {type(out).__name__}")
    return loss


def _eval_loss(trainer: Any, module: Any, batches: Sequence[Any]) -> float:
    with torch.no_grad(), eval_mode(module), trainer.precision_plugin.forward_context():
        losses = [float(_loss(module.training_step(b, i))) for i, b in enumerate(batches)]
    return sum(losses) / len(losses)


def _optimizer(trainer: Any, module: Any, saved: TrainingState, growths: list[autogrow.Growth],
               state: str) -> torch.optim.Optimizer:
    """A fresh optimizer from ``configure_optimizers`` holding the real one's state, translated by name."""
    package = type(trainer).__module__.rsplit(".trainer.", 1)[0]  # pytorch_lightning or lightning.pytorch
    init = importlib.import_module(f"{package}.core.optimizer")._init_optimizers_and_lr_schedulers
    opt = init(module)[0][0]
    autogrow.translate_state_dict(copy.deepcopy(saved.optimizer), saved.names, growths, opt, module, state=state)
    return opt


def _train(cb: Any, trainer: Any, module: Any, saved: TrainingState, growths: list[autogrow.Growth],
           batches: Sequence[Any]) -> float:
    """``steps`` training steps on ``batches`` (in turn) with a throw-away optimizer, the norms' ramps advanced as
    the real steps would advance them (a d_model growth's new units would otherwise weigh 0 throughout and score
    as no growth); the loss on them after."""
    opt = _optimizer(trainer, module, saved, growths, cb.optimizer_state)
    for g in opt.param_groups:  # the growth-aware LR multiplier, as the real step would apply it
        g["lr"] = g["lr"] * cb.schedule.multiplier()
    for step in range(cb.policy.steps):
        autogrow.advance_ramps(module, trainer.global_step + step)
        opt.zero_grad(set_to_none=True)
        with trainer.precision_plugin.forward_context():
            loss = _loss(module.training_step(batches[step % len(batches)], step))
        loss.backward()
        opt.step()
    return _eval_loss(trainer, module, batches)


def _forward_flops(counter: FlopCounterMode, module: nn.Module, x: Any) -> float:
    start = counter.get_total_flops()
    outputs(module, x)
    return float(counter.get_total_flops() - start)


def _trial(cb: Any, trainer: Any, module: Any, option: Option, seed: int, ctx: dict[str, Any]) -> Trial | None:
    """Grow ``option``, train, measure, undo everything; ``None`` when it cannot grow (refused, over budget)."""
    undo = Undo()
    try:
        action = option.action.for_run(cb.schedule.total_steps)
        plan = action.plan(module, option.target, seed, max_width=cb.budget.max_width, example_inputs=cb.probe.inputs)
        if not cb.budget.fits(ctx["params"], plan.param_delta):
            return None
        growth = plan.apply(record=undo)
    except autogrow.AutogrowError:
        return None
    try:
        added = _forward_flops(ctx["counter"], module, ctx["one"]) - ctx["base_flops"]
        loss = _train(cb, trainer, module, ctx["saved"], [growth], ctx["batches"])
    finally:
        undo.restore()
        _restore(module, ctx)
    return Trial(option.target, option.action.name, loss, added)


def _restore(module: nn.Module, ctx: dict[str, Any]) -> None:
    """Values, gradients, counters, random state and the norms' ramps as they were before the trials (a trial may
    have ended a ramp, making its norm plain)."""
    ctx["state"].restore(module)
    set_ramps(module, ctx["ramps"])


def run_trials(cb: Any, trainer: Any, module: Any, options: Sequence[Option], seed: int, batches: Sequence[Any]
               ) -> tuple[Option | None, float, str]:
    """Try ``cb.policy``'s shortlist of ``options`` on ``batches``; returns the best (``None``: none could grow),
    the FLOPs spent and a line describing the trials. Without cached batches the first shortlisted option
    is returned untried. Under DDP every rank trains on its own batches and rank 0's choice is taken."""
    policy: TryCandidates = cb.policy
    shortlist = policy.shortlist(options)
    if not batches or not shortlist:
        return (options[shortlist[0]] if shortlist else None), 0.0, "no trials (no cached batches yet)"
    x = cb.probe.inputs if cb.probe.inputs is not None else inputs_of(batches[0])
    counter = FlopCounterMode(display=False)
    ctx = {"params": autogrow.num_params(module), "saved": TrainingState.capture(trainer, module, deep=True),
           "state": ModuleState(module), "ramps": ramp_state(module), "batches": list(batches), "counter": counter,
           "one": x[:1]}
    trials: list[Trial] = []
    tried: list[Option] = []
    with counter, _muted(module), torch.enable_grad():
        ctx["base_flops"] = _forward_flops(counter, module, ctx["one"])
        reference = _eval_loss(trainer, module, batches)
        if policy.baseline:
            try:
                reference = _train(cb, trainer, module, ctx["saved"], [], batches)
            finally:
                _restore(module, ctx)
        for i in shortlist:
            trial = _trial(cb, trainer, module, options[i], seed, ctx)
            if trial is not None:
                trials.append(trial)
                tried.append(options[i])
    best = int(trainer.strategy.broadcast(policy.best(trials, reference), src=0))
    notes = f"tried {len(trials)} (reference loss {reference:.4g}): " + ", ".join(
        f"{t.action} {t.target}: loss {t.loss:.4g}, +{t.flops:.3g} FLOPs/example" for t in trials)
    return (tried[best] if best >= 0 else None), float(counter.get_total_flops()), notes
